"""The vectorized reference against the literal token-by-token oracle, and its invariants (float64, CPU)."""

import math

import numpy as np
import pytest
import torch

from ptr_kernels import PolicyLossConfig, policy_loss
from ptr_kernels.testing.cases import random_case
from ptr_kernels.validation import mask_as_bool, max_seqlen, packed_to_rows
from ptr_kernels.testing.oracle import policy_loss_literal
from ptr_kernels.reference import aggregate, token_terms

RTOL = 1e-9
FUZZ_SEEDS = range(320)


def reference_with_grad(inputs):
    """Reference loss, metrics (floats) and d loss / d log_prob (zeros when the loss has no path to it)."""
    log_prob = inputs["log_prob"].clone().requires_grad_(True)
    loss, metrics = policy_loss(**{**inputs, "log_prob": log_prob}, backend="reference")
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.item(), {k: v.item() for k, v in metrics.items()}, grad


def reference_gate_rows(case):
    """The reference's per-token gate M_t as rows [S, T] (packed input scattered like the reference does)."""
    inp = case.inputs()
    mask = mask_as_bool(inp["response_mask"], inp["log_prob"])
    lp, olp, adv, rw = inp["log_prob"], inp["old_log_prob"], inp["advantages"], inp["rollout_is_weights"]
    if case.packed:
        cu = inp["cu_seqlens"]
        width = max_seqlen(cu)
        rows = lambda t: None if t is None else packed_to_rows(t, cu, width)  # noqa: E731
        per_seq = adv.shape[0] == cu.numel() - 1 and adv.shape[0] != lp.shape[0]
        lp, olp, rw, adv = rows(lp), rows(olp), rows(rw), adv if per_seq else rows(adv)
        mask = packed_to_rows(mask, cu, width, fill=False)
    return token_terms(lp, olp, adv, mask, case.config, rollout_is_weights=rw).gate


def assert_close(actual, expected, what, rtol=RTOL, atol=1e-13):
    assert abs(actual - expected) <= atol + rtol * abs(expected), f"{what}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_reference_equals_literal(seed):
    case = random_case(seed)
    lit = policy_loss_literal(**case.inputs())
    # decisions within 1e-9 of flipping would make a gate comparison meaningless; none occur in these seeds
    assert not lit.near_tie.any(), f"near tie in {case.describe()}"
    loss, metrics, grad = reference_with_grad(case.inputs())
    assert_close(loss, lit.loss, f"loss ({case.describe()})")
    torch.testing.assert_close(grad, lit.grad, rtol=RTOL, atol=1e-15, msg=lambda m: f"{case.describe()}: {m}")
    assert set(metrics) == set(lit.metrics)
    for key, value in lit.metrics.items():
        assert_close(metrics[key], value, f"metric {key} ({case.describe()})")
    lit_gate = lit.gate
    if case.packed:
        lit_gate = packed_to_rows(lit.gate, case.cu_seqlens, max_seqlen(case.cu_seqlens))
    ref_gate = reference_gate_rows(case)
    if case.config.method == "cppo" and case.config.gate == "soft":
        torch.testing.assert_close(ref_gate, lit_gate, rtol=1e-12, atol=0.0)
    else:  # a 0/1 decision: exactly equal
        assert torch.equal(ref_gate, lit_gate), case.describe()


def test_fuzz_seeds_cover_the_spec():
    """The seeds above exercise every option and shape the issue lists (else the comparison proves little)."""
    seen = set()
    for seed in FUZZ_SEEDS:
        case = random_case(seed)
        c = case.config
        seen |= {("layout", case.packed), ("method", c.method), ("divergence", c.divergence),
                 ("agg", c.loss_agg_mode), ("surrogate", c.surrogate), ("quantile", c.delta_b_quantile is None),
                 ("length_mode", c.length_mode if isinstance(c.length_mode, str) else "int"),
                 ("rollout_is", case.rollout_is_weights is not None), ("dual", c.clip_ratio_c is not None)}
        if c.method == "cppo":
            seen.add(("gate", c.gate))
        mask = mask_as_bool(case.response_mask, case.log_prob)
        if case.packed:
            lengths = (case.cu_seqlens[1:] - case.cu_seqlens[:-1]).tolist()
            seen |= {("len1", 1 in lengths), ("empty_seq", 0 in lengths)}
        else:
            valid_per_row = mask.sum(dim=1).tolist()
            seen |= {("len1", 1 in valid_per_row), ("empty_seq", 0 in valid_per_row)}
        if case.response_mask is not None and not mask.all():
            seen.add(("holes", True))
        if case.num_tokens and max(case.log_prob.shape) >= 250:
            seen.add(("long", True))
        if torch.isnan(case.log_prob).any() or torch.isinf(case.log_prob).any():
            seen.add(("garbage", True))
    required = {("layout", True), ("layout", False), ("method", "cppo"), ("method", "dppo"), ("method", "ppo"),
                ("divergence", "binary_tv"), ("divergence", "binary_kl"), ("gate", "hard"), ("gate", "soft"),
                ("surrogate", "ratio"), ("surrogate", "logp"), ("quantile", True), ("quantile", False),
                ("length_mode", "sequence"), ("length_mode", "padded"), ("length_mode", "int"),
                ("rollout_is", True), ("dual", True), ("len1", True), ("empty_seq", True), ("holes", True),
                ("long", True), ("garbage", True)}
    required |= {("agg", m) for m in ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                      "seq-mean-token-sum-norm")}
    assert required <= seen, sorted(required - seen)


def _to_packed(case):
    """The padded case as packed input: each row (padding included, masked) becomes one sequence of width T."""
    B, T = case.log_prob.shape
    inp = case.inputs()
    packed = {k: (v.reshape(-1) if isinstance(v, torch.Tensor) and v.shape == (B, T) else v)
              for k, v in inp.items()}
    if packed["response_mask"] is None:
        packed["response_mask"] = torch.ones(B * T, dtype=torch.bool)
    packed["cu_seqlens"] = torch.arange(0, (B + 1) * T, T, dtype=torch.int64)
    if case.config.loss_agg_mode == "seq-mean-token-sum-norm" and case.config.loss_scale_factor is None:
        packed["config"] = case.config.replace(loss_scale_factor=float(T))  # the padded default
    return packed


@pytest.mark.parametrize("seed", range(40))
def test_packed_equals_padded(seed):
    case = random_case(1000 + seed, layout="padded")
    padded = case.inputs()
    if padded["config"].loss_agg_mode == "seq-mean-token-sum-norm" and padded["config"].loss_scale_factor is None:
        padded["config"] = padded["config"].replace(loss_scale_factor=float(case.log_prob.shape[1]))
    loss_a, metrics_a, grad_a = reference_with_grad(padded)
    loss_b, metrics_b, grad_b = reference_with_grad(_to_packed(case))
    assert_close(loss_b, loss_a, "loss", rtol=1e-12)
    torch.testing.assert_close(grad_b, grad_a.reshape(-1), rtol=1e-12, atol=1e-16)
    for key in metrics_a:
        assert_close(metrics_b[key], metrics_a[key], key, rtol=1e-12)


@pytest.mark.parametrize("seed", range(30))
def test_cppo_without_position_weight_or_binding_budget_is_dppo(seed):
    case = random_case(2000 + seed, methods=["dppo"])
    dppo = case.inputs()
    dppo["config"] = case.config.replace(delta_low=None, delta_high=None)
    cppo = {**dppo, "config": dppo["config"].replace(method="cppo", w_min=1.0, delta_b=1e6,
                                                      delta_b_quantile=None, gate="hard")}
    loss_d, metrics_d, grad_d = reference_with_grad(dppo)
    loss_c, metrics_c, grad_c = reference_with_grad(cppo)
    assert loss_c == loss_d
    assert torch.equal(grad_c, grad_d)
    assert metrics_c["mask_frac"] == metrics_d["mask_frac"]
    assert metrics_c["mask_frac_budget"] == 0.0


def test_each_aggregation_mode_against_its_formula():
    # two sequences in a [3, 4] batch; row 2 is empty. L_1 = 1 + 2 + 3 = 6 (n_1 = 3), L_2 = 4 + 5 = 9 (n_2 = 2)
    token_loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                              dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    cases = [  # (mode, kwargs, expected)
        ("token-mean", {}, 15 / 5),
        ("token-mean", dict(dp_size=4, batch_num_tokens=12), 15 / 12 * 4),
        ("token-sum", {}, 15.0),
        ("token-sum", dict(dp_size=2), 30.0),
        ("seq-mean-token-sum", {}, 15 / 2),  # the empty row does not count
        ("seq-mean-token-sum", dict(dp_size=2, global_batch_size=5), 15 / 5 * 2),
        # verl's n_i + 1e-8 (docs/math.md section 6)
        ("seq-mean-token-mean", {}, (6 / (3 + 1e-8) + 9 / (2 + 1e-8)) / 2),
        ("seq-mean-token-mean", dict(dp_size=4, global_batch_size=8), (6 / (3 + 1e-8) + 9 / (2 + 1e-8)) / 8 * 4),
        ("seq-mean-token-sum-norm", {}, 15 / 2 / 4),  # default loss_scale_factor: the width T = 4
        ("seq-mean-token-sum-norm", dict(loss_scale_factor=10.0, dp_size=2), 15 / 2 * 2 / 10),
    ]
    for mode, kwargs, expected in cases:
        got = aggregate(token_loss, mask, mode, **kwargs)
        assert math.isclose(got.item(), expected, rel_tol=1e-15), (mode, kwargs, got.item(), expected)
        empty = aggregate(torch.zeros_like(token_loss), torch.zeros_like(mask), mode, **kwargs)
        assert empty.item() == 0.0, (mode, kwargs)


def _smooth_inputs(seed, shape, method, cfg_kwargs, per_seq_adv=False):
    """Random inputs whose every gate decision is at least 1e-4 (relative) away from flipping."""
    rng = np.random.default_rng(seed)
    for _ in range(200):
        old = -rng.uniform(0.05, 2.0, size=shape)
        lp = np.minimum(old + rng.normal(0, 0.15, size=shape), -1e-3)
        adv = rng.normal(0, 1, size=shape[:1] if per_seq_adv else shape)
        mask = rng.random(shape) > 0.2
        t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
        inputs = dict(log_prob=t(lp), old_log_prob=t(old), advantages=t(adv), response_mask=torch.from_numpy(mask),
                      config=PolicyLossConfig(method=method, **cfg_kwargs))
        if not policy_loss_literal(**inputs, tie_rtol=1e-4).near_tie.any():
            return inputs
    raise AssertionError("no tie-free inputs found")


# Only configs whose loss is the function autograd differentiates: the soft gate g_t and the "logp"
# surrogate's capped ratio are stop-gradient (docs/math.md section 5), so finite differences see terms the gradient omits
# (their gradient is checked against the literal loop's hand derivation in test_reference_equals_literal).
GRADCHECK_CONFIGS = [
    ("cppo", dict()),
    ("cppo", dict(divergence="binary_kl", delta_b_quantile=None, length_mode="padded",
                  loss_agg_mode="seq-mean-token-mean")),
    ("cppo", dict(delta=0.05, w_min=0.5, length_mode=5, loss_agg_mode="token-sum")),
    ("dppo", dict(delta_low=0.05, delta_high=0.1, loss_agg_mode="seq-mean-token-sum")),
    ("ppo", dict(clip_ratio_c=3.0, loss_agg_mode="seq-mean-token-sum-norm")),
    ("ppo", dict(log_ratio_clamp=0.1)),
]


@pytest.mark.parametrize("method,cfg", GRADCHECK_CONFIGS)
def test_gradcheck_float64(method, cfg):
    inputs = _smooth_inputs(7, (3, 9), method, cfg, per_seq_adv=method == "dppo")
    lp = inputs.pop("log_prob").requires_grad_(True)

    def loss_of(log_prob):
        return policy_loss(log_prob, **inputs, backend="reference")[0]

    assert torch.autograd.gradcheck(loss_of, (lp,), eps=1e-7, atol=1e-9, rtol=1e-7)
    # and the hand-derived gradient of the literal loop agrees with autograd
    (grad,) = torch.autograd.grad(loss_of(lp), lp)
    torch.testing.assert_close(grad, policy_loss_literal(lp.detach(), **inputs).grad, rtol=RTOL, atol=1e-15)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("junk", [float("inf"), float("-inf"), float("nan")])
def test_masked_positions_never_reach_the_result(seed, junk):
    case = random_case(3000 + seed, layout="padded" if seed % 2 else "packed",
                       methods=[("cppo", "dppo", "ppo")[seed % 3]])
    inp = case.inputs()
    mask = mask_as_bool(inp["response_mask"], inp["log_prob"])
    if mask.all():  # put holes in, so there is something to fill
        mask = mask.clone()
        mask.view(-1)[::3] = False
        inp["response_mask"] = mask

    def filled(value):
        out = dict(inp)
        for key in ("log_prob", "old_log_prob", "rollout_is_weights", "advantages"):
            t = inp[key]
            if t is not None and t.shape == mask.shape:
                out[key] = torch.where(mask, t, value)
        return out

    clean = reference_with_grad(filled(0.0))
    dirty = reference_with_grad(filled(junk))
    assert math.isfinite(clean[0]) and dirty[0] == clean[0]
    assert torch.isfinite(dirty[2]).all() and torch.equal(dirty[2], clean[2])
    assert dirty[1] == clean[1] and all(math.isfinite(v) for v in dirty[1].values())


EMPTY_BATCHES = [
    dict(log_prob=torch.zeros(3, 5), advantages=torch.ones(3), response_mask=torch.zeros(3, 5)),
    dict(log_prob=torch.zeros(2, 0), advantages=torch.ones(2), response_mask=torch.zeros(2, 0)),
    dict(log_prob=torch.zeros(0, 4), advantages=torch.ones(0), response_mask=torch.zeros(0, 4)),
    dict(log_prob=torch.zeros(4), advantages=torch.ones(2), response_mask=torch.zeros(4),
         cu_seqlens=torch.tensor([0, 1, 4])),
    dict(log_prob=torch.zeros(0), advantages=torch.ones(0), cu_seqlens=torch.tensor([0, 0, 0], dtype=torch.int32)),
    dict(log_prob=torch.zeros(0), advantages=torch.ones(0), cu_seqlens=torch.tensor([0])),
]


@pytest.mark.parametrize("batch", range(len(EMPTY_BATCHES)))
@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("method", ["cppo", "dppo", "ppo"])
def test_empty_batch_gives_zero_loss_and_gradient(batch, mode, method):
    inp = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in EMPTY_BATCHES[batch].items()}
    lp = inp.pop("log_prob").requires_grad_(True)
    loss, metrics = policy_loss(lp, lp.detach() - 1.0, **inp, method=method, loss_agg_mode=mode,
                                loss_scale_factor=7.0)
    loss.backward()  # must work even when there is nothing to differentiate
    assert loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros_like(lp))
    assert all(v.item() == 0.0 for v in metrics.values())
    assert policy_loss_literal(lp.detach(), lp.detach() - 1.0, **inp,
                               config=PolicyLossConfig(method=method, loss_agg_mode=mode,
                                                       loss_scale_factor=7.0)).loss == 0.0


def test_soft_gate_stays_in_unit_interval_when_binary_kl_rounds_below_zero():
    # pi slightly above mu, A > 0: a move away from mu with a true KL of ~1e-14, which float32 rounds to < 0.
    # min(1, 1/z) would then be a huge negative factor on the loss; z <= 1 means inside: g = 1.
    lp = torch.tensor([[-2.68933367729187]], dtype=torch.float32)
    olp = torch.tensor([[-2.6893341541290283]], dtype=torch.float32)
    adv, mask = torch.ones(1), torch.ones(1, 1, dtype=torch.bool)
    config = PolicyLossConfig(gate="soft", divergence="binary_kl")
    terms = token_terms(lp, olp, adv, mask, config)
    assert terms.divergence.item() < 0  # the rounding this test is about
    assert terms.gate.item() == 1.0
    loss, _ = policy_loss(lp, olp, adv, mask, config=config, backend="reference")
    assert loss.item() == pytest.approx(-math.exp(lp.item() - olp.item()), rel=1e-6)


def test_dppo_threshold_keeps_float64():
    # the thresholds were once built by torch.where on two Python floats, i.e. rounded to float32 first:
    # 0.1 became 0.10000000149..., deciding D in (0.1, 0.1 + 1.5e-9] the wrong way in float64
    lp = torch.tensor([[math.log(0.5 + 0.1 + 1e-9), math.log(0.5 - 0.1 - 1e-9)]], dtype=torch.float64)
    olp = torch.full_like(lp, math.log(0.5))
    config = PolicyLossConfig(method="dppo", delta_high=0.1, delta_low=0.1)
    terms = token_terms(lp, olp, torch.tensor([1.0, -1.0], dtype=torch.float64)[None, :],
                        torch.ones(1, 2, dtype=torch.bool), config)
    assert terms.threshold.tolist() == [[0.1, 0.1]]
    assert terms.gate.tolist() == [[0.0, 0.0]]  # D = 0.1 + 1e-9 > 0.1 on both sides
