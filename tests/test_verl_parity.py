"""Parity with what users run today (ptr_kernels.testing.baselines): verl's vanilla / dppo_tv / dppo_kl losses with
its agg_loss, and the per-sequence-loop CPPO. verl computes at every position and masks afterwards, so the
inputs here are finite everywhere. verl's seq-mean-token-mean divides by n_i + 1e-8: each sequence's term
differs from ours by a relative 1e-8 / n_i, so the gradient agrees to VERL_MEAN_RTOL per token and the loss
(a signed sum that can cancel) to 1e-8 x max |token loss| x dp_size; everything else agrees to rounding.
"""

import numpy as np
import pytest
import torch

from ptr_kernels import policy_loss
from ptr_kernels.testing.baselines import (cppo_per_sequence_loop, verl_agg_loss, verl_policy_loss_dppo_kl,
                                   verl_policy_loss_dppo_tv, verl_policy_loss_vanilla)
from ptr_kernels.testing.cases import random_case
from ptr_kernels.reference import token_terms

RTOL = 1e-12
VERL_MEAN_RTOL = 2e-8  # x / (n + 1e-8) vs x / n for n >= 1


def make_batch(seed, B=5, T=40):
    """Finite padded inputs with right padding, holes, one empty row, some large ratio moves, A != 0."""
    rng = np.random.default_rng(seed)
    old = -rng.exponential(0.7, size=(B, T))
    lp = np.minimum(old + rng.normal(0, 0.3, size=(B, T)) * np.where(rng.random((B, T)) < 0.05, 10, 1), -1e-4)
    adv = rng.choice([-1, 1], size=(B, T)) * rng.uniform(0.1, 2.0, size=(B, T))
    lengths = rng.integers(1, T + 1, size=B)
    lengths[seed % B] = 0
    mask = (np.arange(T)[None, :] < lengths[:, None]) & (rng.random((B, T)) > 0.1)
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    return t(lp), t(old), t(adv), t(mask)


def ours(lp, olp, adv, mask, **kwargs):
    lp = lp.clone().requires_grad_(True)
    loss, metrics = policy_loss(lp, olp, adv, mask, backend="reference", **kwargs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.item(), grad, {k: v.item() for k, v in metrics.items()}


def loss_tolerance(mode, dp_size, token_loss_bound):
    """Absolute tolerance on the aggregated loss (see the module docstring)."""
    return 1e-8 * token_loss_bound * dp_size if mode == "seq-mean-token-mean" else 1e-15


def theirs(fn, lp, olp, adv, mask, *args, **kwargs):
    lp = lp.clone().requires_grad_(True)
    loss, metrics = fn(olp, lp, adv, mask, *args, **kwargs)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.item(), grad, metrics


# (our loss_agg_mode, our normalizers, verl's loss_agg_mode, verl's normalizers, rtol)
AGG = [
    ("token-mean", {}, "token-mean", {}, RTOL),
    ("token-mean", dict(dp_size=4, batch_num_tokens=333), "token-mean", dict(dp_size=4, batch_num_tokens=333), RTOL),
    ("seq-mean-token-sum", {}, "seq-mean-token-sum", {}, RTOL),
    ("seq-mean-token-sum", dict(dp_size=2, global_batch_size=16), "seq-mean-token-sum",
     dict(dp_size=2, global_batch_size=16), RTOL),
    ("seq-mean-token-mean", {}, "seq-mean-token-mean", {}, VERL_MEAN_RTOL),
    ("seq-mean-token-mean", dict(dp_size=8, global_batch_size=64), "seq-mean-token-mean",
     dict(dp_size=8, global_batch_size=64), VERL_MEAN_RTOL),
    # verl's seq-mean-token-sum-norm is sum_i L_i / loss_scale_factor (no sequence count, no dp_size);
    # docs/math.md's is seq-mean-token-sum / loss_scale_factor: they coincide with global_batch_size = dp_size = 1
    ("seq-mean-token-sum-norm", dict(global_batch_size=1), "seq-mean-token-sum-norm", {}, RTOL),
    ("seq-mean-token-sum-norm", dict(global_batch_size=1, loss_scale_factor=4096.0), "seq-mean-token-sum-norm",
     dict(loss_scale_factor=4096.0), RTOL),
    # verl has no token-sum; sum-norm with loss_scale_factor = 1 / dp_size is sum_i L_i * dp_size
    ("token-sum", dict(dp_size=4), "seq-mean-token-sum-norm", dict(loss_scale_factor=0.25), RTOL),
]


def _split(our_agg):
    """Config fields vs policy_loss keywords among our normalizers."""
    cfg = {k: v for k, v in our_agg.items() if k == "loss_scale_factor"}
    return cfg, {k: v for k, v in our_agg.items() if k != "loss_scale_factor"}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("agg", AGG, ids=[f"{a[0]}-{i}" for i, a in enumerate(AGG)])
@pytest.mark.parametrize("clip", [(0.2, 0.28, 3.0), (0.2, 0.2, None), (0.1, 0.5, 1.5)])
def test_ppo_matches_verl_vanilla(seed, agg, clip):
    our_mode, our_agg, verl_mode, verl_agg, rtol = agg
    low, high, dual = clip
    lp, olp, adv, mask = make_batch(seed)
    rw = torch.rand_like(lp) + 0.5 if seed % 2 else None
    cfg, kw = _split(our_agg)
    loss_a, grad_a, met_a = ours(lp, olp, adv, mask, method="ppo", clip_ratio_low=low, clip_ratio_high=high,
                                 clip_ratio_c=dual, loss_agg_mode=our_mode, rollout_is_weights=rw, **cfg, **kw)
    # verl's dual clip is always on; a bound above the largest ratio exp(20) never binds, as our None
    loss_b, grad_b, met_b = theirs(verl_policy_loss_vanilla, lp, olp, adv, mask, verl_mode, clip_ratio_low=low,
                                   clip_ratio_high=high, clip_ratio_c=1e9 if dual is None else dual,
                                   rollout_is_weights=rw, **verl_agg)
    bound = (adv.abs() * torch.maximum(olp.new_tensor(1 + high), (lp - olp).exp())
             * (1.0 if rw is None else rw)).max().item()
    assert loss_a == pytest.approx(loss_b, rel=RTOL, abs=loss_tolerance(our_mode, our_agg.get("dp_size", 1), bound))
    torch.testing.assert_close(grad_a, grad_b, rtol=rtol, atol=1e-15)
    # verl: pg_clipfrac = clipping raised the loss (our low + high); pg_clipfrac_lower = the dual clip binds
    assert met_a["clip_frac_low"] + met_a["clip_frac_high"] == pytest.approx(met_b["actor/pg_clipfrac"], rel=1e-7)
    assert met_a["clip_frac_dual"] == pytest.approx(met_b["actor/pg_clipfrac_lower"], rel=1e-7, abs=1e-12)
    assert met_a["ppo_kl"] == pytest.approx(met_b["actor/ppo_kl"], rel=1e-7)  # no |log-ratio| reaches 20 here


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("agg", AGG, ids=[f"{a[0]}-{i}" for i, a in enumerate(AGG)])
@pytest.mark.parametrize("divergence,fn", [("binary_tv", verl_policy_loss_dppo_tv),
                                           ("binary_kl", verl_policy_loss_dppo_kl)])
@pytest.mark.parametrize("thresholds", [(0.1, None, None), (0.05, 0.02, 0.2)])
def test_dppo_matches_verl(seed, agg, divergence, fn, thresholds):
    our_mode, our_agg, verl_mode, verl_agg, rtol = agg
    delta, low, high = thresholds
    lp, olp, adv, mask = make_batch(100 + seed)
    cap = 20.0 if seed % 2 else 1.5  # verl's clip_ratio_c truncates the detached ratio: our ratio_cap
    cfg, kw = _split(our_agg)
    loss_a, grad_a, met_a = ours(lp, olp, adv, mask, method="dppo", divergence=divergence, delta=delta,
                                 delta_low=low, delta_high=high, surrogate="logp", ratio_cap=cap,
                                 loss_agg_mode=our_mode, **cfg, **kw)
    loss_b, grad_b, met_b = theirs(fn, lp, olp, adv, mask, verl_mode, clip_ratio=delta, clip_ratio_low=low,
                                   clip_ratio_high=high, clip_ratio_c=cap, **verl_agg)
    bound = (adv.abs() * (lp - olp).exp().clamp(max=cap) * lp.abs()).max().item()
    assert loss_a == pytest.approx(loss_b, rel=RTOL, abs=loss_tolerance(our_mode, our_agg.get("dp_size", 1), bound))
    torch.testing.assert_close(grad_a, grad_b, rtol=rtol, atol=1e-15)
    assert met_a["mask_frac"] == pytest.approx(met_b["actor/pg_clipfrac"], rel=1e-7, abs=1e-12)
    assert met_a["ppo_kl"] == pytest.approx(met_b["actor/ppo_kl"], rel=1e-7)
    assert 0 < met_a["mask_frac"] < 1  # both sides of the mask are exercised


def test_dppo_clip_fraction_differs_from_verl_only_at_zero_advantage():
    # verl puts A = 0 on the negative side (keep iff pi - mu >= -delta_low) and counts a token with pi well
    # below mu as masked; docs/math.md keeps it (A x = 0 <= 0). Its loss and gradient are 0 either way.
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    olp = torch.tensor([[-0.1, -2.0]], dtype=torch.float64)  # pi - mu = 0.368 - 0.905 < -0.1 at token 1
    adv = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    loss_a, grad_a, met_a = ours(lp, olp, adv, mask, method="dppo", delta=0.1, surrogate="logp")
    loss_b, grad_b, met_b = theirs(verl_policy_loss_dppo_tv, lp, olp, adv, mask, "token-mean", clip_ratio=0.1)
    assert loss_a == loss_b == 0.0 and not grad_a.any() and not grad_b.any()
    assert met_a["mask_frac"] == 0.0
    assert met_b["actor/pg_clipfrac"] == pytest.approx(0.5)


def test_verl_sum_norm_has_no_sequence_count():
    # docs/math.md's seq-mean-token-sum-norm divides by the sequence count (and multiplies dp_size); verl's does not
    loss_mat = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]], dtype=torch.float64)
    assert verl_agg_loss(loss_mat, mask, "seq-mean-token-sum-norm").item() == 15 / 2
    assert verl_agg_loss(loss_mat, mask, "seq-mean-token-sum-norm", dp_size=4).item() == 15 / 2
    with pytest.raises(ValueError, match="token-sum"):
        verl_agg_loss(loss_mat, mask, "token-sum")


@pytest.mark.parametrize("seed", range(25))
def test_cppo_per_sequence_loop_matches_reference(seed):
    case = random_case(4000 + seed, layout="padded", methods=["cppo"])
    inp = case.inputs()
    mask = inp["response_mask"]
    if mask is None:
        mask = torch.ones_like(inp["log_prob"], dtype=torch.bool)

    def finite(t, fill):  # verl-style code computes at masked positions: no garbage there
        if t is None or t.shape != mask.shape:
            return t
        return torch.where(mask, t, fill)

    lp, olp = finite(inp["log_prob"], -1.0), finite(inp["old_log_prob"], -1.0)
    adv, rw = finite(inp["advantages"], 0.0), finite(inp["rollout_is_weights"], 1.0)
    mode = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"][seed % 3]
    config = case.config.replace(loss_agg_mode=mode)
    normalizers = dict(dp_size=case.kwargs["dp_size"], global_batch_size=case.kwargs["global_batch_size"])
    loss_a, grad_a, met_a = ours(lp, olp, adv, mask, config=config, rollout_is_weights=rw, **normalizers)
    lp_b = lp.clone().requires_grad_(True)
    loss_b, gate = cppo_per_sequence_loop(lp_b, olp, adv, mask.double(), config=config, rollout_is_weights=rw,
                                          **normalizers)
    (grad_b,) = torch.autograd.grad(loss_b, lp_b)
    rtol = VERL_MEAN_RTOL if mode == "seq-mean-token-mean" else 1e-10
    bound = token_terms(lp, olp, adv, mask, config, rollout_is_weights=rw).loss.abs().max().item()
    assert loss_a == pytest.approx(loss_b.item(), rel=1e-10, abs=loss_tolerance(mode, normalizers["dp_size"], bound))
    torch.testing.assert_close(grad_a, grad_b, rtol=rtol, atol=1e-14)
    if config.gate == "hard":
        rejected = (mask & (gate == 0)).sum().item() / max(mask.sum().item(), 1)
        assert met_a["mask_frac"] == pytest.approx(rejected, rel=1e-12)
