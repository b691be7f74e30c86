"""`ptr_cppo` equals the authors' verl CPPO, and `UNIRL_CONFIG` their packed implementation (docs/math.md section 11),
against the transcriptions in `ptr_kernels.testing.authors_cppo`: the reference in float64 to 1e-9, the kernel (in
Triton's interpreter on a CPU) to float32 rounding, where a mask decision may differ only at a near tie."""

from __future__ import annotations

import math

import pytest
import torch

from ptr_kernels import PolicyLossConfig, policy_loss
from ptr_kernels.config import LOSS_AGG_MODES
from ptr_kernels.integrations.verl import compute_policy_loss_cppo, cppo_fields
from ptr_kernels.testing.authors_cppo import UNIRL_CONFIG, unirl_cppo, verl_cppo

VERL_METRICS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")


def _verl_case(seed: int, B: int = 5, T: int = 16, dtype=torch.float64):
    """A padded batch with holes and whole-row zero advantages (GRPO groups of equal reward), log-probs spread
    wide enough that the budget, the token threshold and the ratio cap all bind, and random hyperparameters."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2.5
    new = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6
    new = new.clamp(max=0.0)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    adv[0] = 0.0
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[1, T // 2:] = False  # a short response
    mask[:, 0] |= True
    keys = {"clip_ratio": 0.1 + 0.2 * torch.rand((), generator=g).item(),
            "clip_ratio_c": [1.5, 3.0, 20.0][seed % 3],
            "policy_loss": {"cppo_w_min": 0.5 + 0.5 * torch.rand((), generator=g).item(),
                            "cppo_delta_b": 0.005 + 0.03 * torch.rand((), generator=g).item(),
                            "cppo_delta_b_q": [0.9, 0.5, 0.95][seed % 3],
                            "cppo_delta_b_k": [1.0, 0.5, 3.0][(seed + 1) % 3]}}
    weights = None
    if seed % 2:
        weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return (old.to(dtype), new.to(dtype), adv.to(dtype), mask, weights if weights is None else weights.to(dtype),
            keys)


def _authors(old, new, adv, mask, keys, mode, weights, info):
    pl = keys["policy_loss"]
    new = new.detach().clone().requires_grad_(True)
    loss, metrics = verl_cppo(old, new, adv, mask, mode, delta=keys["clip_ratio"], clip_ratio_c=keys["clip_ratio_c"],
                              w_min=pl["cppo_w_min"], delta_b=pl["cppo_delta_b"], delta_b_q=pl["cppo_delta_b_q"],
                              delta_b_k=pl["cppo_delta_b_k"], rollout_is_weights=weights, global_batch_info=info)
    loss.backward()
    return loss.detach(), new.grad, metrics


def _global_info(seed: int, mode: str, mask) -> dict:
    if seed % 3 == 0:
        return {}
    info = {"dp_size": 2, "batch_num_tokens": int(mask.sum()) * 2, "global_batch_size": mask.shape[0] * 2}
    if mode == "seq-mean-token-sum-norm":
        info["loss_scale_factor"] = 64
    return info


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("seed", range(6))
def test_ptr_cppo_equals_the_authors_verl_loss_reference(seed, mode):
    old, new, adv, mask, weights, keys = _verl_case(seed)
    info = _global_info(seed, mode, mask)
    want_loss, want_grad, want_metrics = _authors(old, new, adv, mask, keys, mode, weights, info)
    lp = new.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss_cppo(old, lp, adv, mask, mode, dict(keys, global_batch_info=info),
                                             rollout_is_weights=weights)
    loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=0)
    torch.testing.assert_close(lp.grad, want_grad, rtol=1e-9, atol=1e-15)
    for key in VERL_METRICS:  # verl's means divide by count + 1e-8: relative 1e-8 / count (count >= 30 here)
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=1e-9, atol=1e-15, msg=key)


def _decision_margin(old, new, adv, mask, keys) -> float:
    """The smallest relative distance of a decided token to its thresholds (float64): below ~1e-5 a float32
    computation may decide the token the other way."""
    c = PolicyLossConfig(**cppo_fields(keys))
    div = (new.exp() - old.exp()).abs()
    T = new.shape[1]
    col = torch.arange(1, T + 1, dtype=torch.float64)
    w = (1 - (1 - c.w_min) * (col - 1) / max(T - 1, 1)) * mask
    step = w * div * mask
    prefix_div = torch.cumsum(step, 1) - step
    prefix_w = torch.cumsum(w, 1) - w
    q = torch.nanquantile(torch.where(mask, div, torch.nan), c.delta_b_quantile, dim=1)
    row_budget = (c.delta_b_quantile_scale * torch.nan_to_num(q, nan=0.0)).clamp(c.delta_b,
                                                                               c.delta_b_max_mult * c.delta_b)
    threshold = torch.clamp(c.delta + row_budget[:, None] * prefix_w - prefix_div, max=c.delta)
    scale = c.delta + row_budget[:, None] * prefix_w + prefix_div
    margins = [((step - threshold).abs() / scale)[mask & (adv * (new - old) > 0)]]
    ratio = (new - old).clamp(-20, 20).exp()
    margins.append(((ratio - keys["clip_ratio_c"]).abs() / keys["clip_ratio_c"])[mask])
    return min(float(m.min()) if m.numel() else math.inf for m in margins)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed", range(3))
def test_ptr_cppo_equals_the_authors_verl_loss_kernel(seed, mode, device):
    pytest.importorskip("triton")
    old, new, adv, mask, weights, keys = _verl_case(seed, B=4, T=12)
    old, new, adv = (t.float().double() for t in (old, new, adv))  # float32 values, exact in both
    info = _global_info(seed, mode, mask)
    want_loss, want_grad, want_metrics = _authors(old, new, adv, mask, keys, mode, weights, info)
    config = PolicyLossConfig(**cppo_fields(keys), loss_agg_mode=mode,
                              loss_scale_factor=info.get("loss_scale_factor"))
    lp = new.float().to(device).requires_grad_(True)
    to = lambda t: None if t is None else t.float().to(device)  # noqa: E731
    normalizers = {k: v for k, v in info.items() if k != "loss_scale_factor"}
    loss, metrics = policy_loss(lp, to(old), to(adv), mask.to(device), config=config, backend="triton",
                                rollout_is_weights=to(weights), **normalizers)
    loss.backward()
    assert _decision_margin(old, new, adv, mask, keys) > 1e-5  # no near tie: every decision is float32-safe
    torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(lp.grad.double().cpu(), want_grad, rtol=2e-5, atol=1e-7)
    for name, key in (("mask_frac", "actor/pg_clipfrac"), ("ppo_kl", "actor/ppo_kl"),
                      ("ratio_cap_frac", "actor/pg_clipfrac_lower")):
        torch.testing.assert_close(metrics[name].double().cpu(), want_metrics[key], rtol=2e-5, atol=1e-7, msg=key)


def test_ptr_cppo_defaults_are_the_authors():
    """No `cppo_*` key: the authors' defaults (w_min 0.8, delta_b 0.02, q 0.9, k 1, padded positions, capped
    ratio times log_prob with clip_ratio_c = 20 when absent)."""
    old, new, adv, mask, _, _ = _verl_case(7)
    want, _, _ = _authors(old, new, adv, mask, {"clip_ratio": 0.2, "clip_ratio_c": 20.0, "policy_loss": {
        "cppo_w_min": 0.8, "cppo_delta_b": 0.02, "cppo_delta_b_q": 0.9, "cppo_delta_b_k": 1.0}}, "token-mean",
        None, {})
    loss, _ = compute_policy_loss_cppo(old, new, adv, mask, "token-mean", {"clip_ratio": 0.2})
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=0)


def test_one_column_row_weighs_one():
    """At T = 1 the position weight is 1 (docs/math.md section 11), where the authors' verl formula gives w_min:
    a token with w_min D <= delta < D is rejected here."""
    old = torch.tensor([[math.log(0.30)]], dtype=torch.float64)
    new = torch.tensor([[math.log(0.42)]], dtype=torch.float64)  # D = 0.12, A (r - 1) > 0
    adv = torch.ones(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    keys = {"clip_ratio": 0.1, "policy_loss": {"cppo_w_min": 0.8}}
    loss, metrics = compute_policy_loss_cppo(old, new, adv, mask, "token-mean", keys)
    assert loss.item() == 0.0 and metrics["actor/pg_clipfrac"].item() == 1.0
    _, _, theirs = _authors(old, new, adv, mask, {"clip_ratio": 0.1, "clip_ratio_c": 20.0, "policy_loss": {
        "cppo_w_min": 0.8, "cppo_delta_b": 0.02, "cppo_delta_b_q": 0.9, "cppo_delta_b_k": 1.0}}, "token-mean",
        None, {})
    assert theirs["actor/pg_clipfrac"].item() == 0.0  # 0.8 * 0.12 = 0.096 <= 0.1: kept there


def test_cppo_keys_from_the_actor_config_and_errors():
    base = {"clip_ratio": 0.15}
    assert cppo_fields({**base, "cppo_w_min": 0.7})["w_min"] == 0.7  # actor-level keys, as a dict config
    assert cppo_fields({**base, "policy_loss": {"cppo_delta_b_k": 2.0}})["delta_b_quantile_scale"] == 2.0
    assert cppo_fields({**base, "policy_loss": {"cppo_divergence": "kl"}})["divergence"] == "binary_kl"
    assert cppo_fields({**base, "policy_loss": {"cppo_length_mode": "512"}})["length_mode"] == 512
    assert cppo_fields({**base, "policy_loss": {"cppo_delta_b_q": None}})["delta_b_quantile"] is None
    with pytest.raises(ValueError, match="cppo_w_mn"):
        cppo_fields({**base, "policy_loss": {"cppo_w_mn": 0.7}})
    with pytest.raises(ValueError, match="cppo_delta_b_quantile"):  # the former name: refused, not ignored
        cppo_fields({**base, "cppo_delta_b_quantile": 0.5})
    with pytest.raises(ValueError, match="set one option twice"):
        cppo_fields({**base, "cppo_w_min": 0.7, "policy_loss": {"cppo_w_min": 0.6}})
    # the later layout of the authors' keys: a `cppo` sub-section, `cppo_w_len_mode` for the length mode
    nested = cppo_fields({**base, "policy_loss": {"cppo": {"cppo_w_min": 0.6, "cppo_w_len_mode": "sequence"}}})
    assert (nested["w_min"], nested["length_mode"]) == (0.6, "sequence")
    with pytest.raises(ValueError, match="policy_loss.cppo.w_min"):
        cppo_fields({**base, "policy_loss": {"cppo": {"w_min": 0.6}}})
    with pytest.raises(ValueError, match="set one option twice"):
        cppo_fields({**base, "policy_loss": {"cppo_length_mode": "padded", "cppo": {"cppo_w_len_mode": "sequence"}}})
    assert cppo_fields({**base, "policy_loss": {"cppo_w_len_mode": "512"}})["length_mode"] == 512
    assert cppo_fields({**base, "cppo": {"cppo_w_min": 0.5}})["w_min"] == 0.5  # the actor's own sub-section
    old, new, adv, mask, _, _ = _verl_case(2)
    with pytest.raises(ValueError, match="w_min"):
        compute_policy_loss_cppo(old, new, adv, mask, "token-mean", {**base, "policy_loss": {"cppo_w_min": 1.5}})


# ---- the authors' packed implementation ----

def _unirl_case(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + seed)
    lengths = torch.tensor([1, 2, 9, 17, 5, 30][: 3 + seed % 4])
    N = int(lengths.sum())
    old = -torch.rand(N, generator=g, dtype=torch.float64) * 2.5
    new = (old + torch.randn(N, generator=g, dtype=torch.float64) * 0.5).clamp(max=0.0)
    adv = torch.randn(len(lengths), generator=g, dtype=torch.float64)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    hyper = dict(delta=0.1 + 0.1 * (seed % 3), w_min=[0.8, 0.6, 1.0][seed % 3], delta_b=[0.02, 0.01][seed % 2])
    return old.to(dtype), new.to(dtype), adv.to(dtype), lengths, cu, hyper


def _unirl_both(seed, mode, dtype, device="cpu", backend="reference"):
    old, new, adv, lengths, cu, hyper = _unirl_case(seed, dtype)
    horizon = 48
    theirs_lp = new.clone().requires_grad_(True)
    want = unirl_cppo(theirs_lp, old, adv, lengths, loss_agg_mode=mode, horizon=horizon, **hyper)
    want.backward()
    config = UNIRL_CONFIG.replace(loss_agg_mode=mode, loss_scale_factor=horizon, **hyper)
    lp = new.clone().to(device if backend == "triton" else "cpu").requires_grad_(True)
    loss, _ = policy_loss(lp, old.to(lp.device), adv.to(lp.device), cu_seqlens=cu.to(lp.device), config=config,
                          backend=backend)
    loss.backward()
    return loss.detach().cpu(), lp.grad.cpu(), want.detach(), theirs_lp.grad


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed", range(6))
def test_unirl_config_equals_the_authors_packed_loss(seed, mode):
    loss, grad, want, want_grad = _unirl_both(seed, mode, torch.float64)
    atol = 0.0
    if mode == "seq-mean-token-mean":
        # divided by verl's n_i + 1e-8 here, by n_i there (nothing in float32, below): each sequence's term
        # L_i / n_i, at most max |A r|, moves by 1e-8 of itself, so the mean moves by at most 1e-8 max |A r|
        old, new, adv, *_ = _unirl_case(seed)
        atol = 1e-8 * float(adv.abs().max() * (new - old).clamp(-20, 20).exp().max())
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=atol)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9 if not atol else 2e-8, atol=1e-15)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unirl_config_in_float32(backend, device):
    if backend == "triton":
        pytest.importorskip("triton")
    loss, grad, want, want_grad = _unirl_both(3, "seq-mean-token-mean", torch.float32, device, backend)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
