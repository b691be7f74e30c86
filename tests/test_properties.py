"""Property-based tests (hypothesis): invariants every option must keep, over random shapes, masks, layouts,
configs, dtypes and non-finite values. A new option added to `configs()` inherits all of them.

Mostly against the reference; a few examples on the Triton kernel (CUDA tensors when a GPU is present, else the
interpreter on CPU), so CI time stays small. The fixtures `run_policy_loss` and `on_backend_device` come from
conftest.py; hypothesis fills the arguments after them.
"""

import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptr_kernels import PolicyLossConfig, policy_loss
from ptr_kernels.config import LOSS_AGG_MODES

REFERENCE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRITON = settings(max_examples=6, deadline=None, derandomize=True,  # the same few examples in every CI run
                  suppress_health_check=[HealthCheck.too_slow])
INPUTS = ("log_prob", "old_log_prob", "advantages", "rollout_is_weights")
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


needs_triton = pytest.mark.skipif(not _importable("triton"), reason="the Triton kernel: triton exists for Linux only")


@st.composite
def configs(draw) -> PolicyLossConfig:
    """Any valid config: every option, with the numbers that switch behaviour on and off."""
    return PolicyLossConfig(
        method=draw(st.sampled_from(["cppo", "dppo", "ppo"])),
        divergence=draw(st.sampled_from(["binary_tv", "binary_kl"])),
        delta=draw(st.sampled_from([0.01, 0.15, 0.3])),
        w_min=draw(st.sampled_from([0.3, 0.8, 1.0])),
        delta_b=draw(st.sampled_from([0.0, 0.02])),
        delta_b_quantile=draw(st.sampled_from([None, 0.0, 0.9, 1.0])),
        length_mode=draw(st.sampled_from(["sequence", "padded", 3])),
        gate=draw(st.sampled_from(["hard", "soft"])),
        surrogate=draw(st.sampled_from(["ratio", "logp"])),
        log_ratio_clamp=draw(st.sampled_from([None, 0.5, 20.0])),
        clip_ratio_c=draw(st.sampled_from([None, 1.5])),
        loss_agg_mode=draw(st.sampled_from(LOSS_AGG_MODES)),
        loss_scale_factor=draw(st.sampled_from([None, 7.0])),
    )


@st.composite
def batches(draw, dtype=torch.float64):
    """A padded batch `[B, T]` (values from a drawn seed, structure from hypothesis) and a config.

    Returns (kwargs for policy_loss, per-token advantages?).
    """
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 7))
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))).view(B, T)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.01
    lp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.01, 0.3, 2.0])))
    lp = lp.clamp(max=0)
    per_token = draw(st.booleans())
    adv = torch.randn((B, T) if per_token else (B,), generator=g, dtype=torch.float64)
    adv = torch.where(torch.rand(adv.shape, generator=g) < 0.2, 0.0, adv)  # zero advantages too
    rw = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    kwargs = dict(log_prob=lp.to(dtype), old_log_prob=old.to(dtype), advantages=adv.to(dtype),
                  response_mask=mask, rollout_is_weights=None if rw is None else rw.to(dtype),
                  config=draw(configs()))
    return kwargs


def to_packed(kwargs):
    """The same rows packed: every row a sequence of the full width T (so positions and T_w agree)."""
    B, T = kwargs["log_prob"].shape
    out = {k: (v.reshape(-1) if isinstance(v, torch.Tensor) and v.shape == (B, T) else v) for k, v in kwargs.items()}
    out["cu_seqlens"] = torch.arange(0, B * T + 1, T, dtype=torch.int64)
    if kwargs["config"].loss_agg_mode == "seq-mean-token-sum-norm" and kwargs["config"].loss_scale_factor is None:
        out["config"] = kwargs["config"].replace(loss_scale_factor=float(T))  # the padded default
    return out


def assert_same(a, b, exact=True):
    check = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=1e-12, atol=1e-15, equal_nan=True))
    assert check(a[0], b[0]), (a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert check(a[1][k], b[1][k]), (k, a[1][k], b[1][k])
    assert check(a[2], b[2])


def with_garbage(kwargs, data):
    """The batch with non-finite or huge values drawn at every masked position of every input."""
    out = dict(kwargs)
    masked = ~kwargs["response_mask"]
    for name in INPUTS:
        t = kwargs[name]
        if t is None or t.shape != masked.shape:
            continue
        junk = torch.tensor(data.draw(st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -3e38]),
                                               min_size=t.numel(), max_size=t.numel())), dtype=t.dtype)
        out[name] = torch.where(masked, junk.view_as(t), t)
    return out


def with_non_finite_at_a_valid_position(kwargs, data):
    valid = kwargs["response_mask"].nonzero().tolist()
    name = data.draw(st.sampled_from([n for n in INPUTS if kwargs[n] is not None]))
    out = dict(kwargs)
    t = out[name].clone()
    i, j = data.draw(st.sampled_from(valid))
    t[(i, j) if t.dim() == 2 else (i,)] = data.draw(NON_FINITE)
    out[name] = t
    return out


# reference


@REFERENCE
@given(batches(), st.data())
def test_masked_garbage_changes_nothing(run_policy_loss, kwargs, data):
    assert_same(run_policy_loss(kwargs, "reference"), run_policy_loss(with_garbage(kwargs, data), "reference"))


@REFERENCE
@given(batches())
def test_packed_equals_padded(run_policy_loss, kwargs):
    padded = run_policy_loss(kwargs, "reference")
    packed = run_policy_loss(to_packed(kwargs), "reference")
    assert_same((padded[0], padded[1], padded[2].reshape(-1)), packed, exact=False)


@REFERENCE
@given(batches(), st.data())
def test_non_finite_at_a_valid_position_shows(run_policy_loss, kwargs, data):
    if not kwargs["response_mask"].any():
        return
    loss = run_policy_loss(with_non_finite_at_a_valid_position(kwargs, data), "reference")[0]
    assert torch.isnan(loss)


@REFERENCE
@given(batches(), st.data())
def test_empty_batch_is_zero(run_policy_loss, kwargs, data):
    kwargs = with_garbage(dict(kwargs, response_mask=torch.zeros_like(kwargs["response_mask"])), data)
    loss, metrics, grad = run_policy_loss(kwargs, "reference")
    assert loss.item() == 0 and not grad.any()
    assert all(v.item() == 0 for v in metrics.values()), metrics


@REFERENCE
@given(batches())
def test_finite_inputs_give_finite_results(run_policy_loss, kwargs):
    loss, metrics, grad = run_policy_loss(kwargs, "reference")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in metrics.values()), metrics


@REFERENCE
@given(batches())
def test_gradient_only_into_log_prob(kwargs):
    leaves = {k: kwargs[k].clone().requires_grad_(True) for k in INPUTS if kwargs[k] is not None}
    loss, _ = policy_loss(**dict(kwargs, **leaves), backend="reference")
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])


@REFERENCE
@given(batches(dtype=torch.float32), st.sampled_from([torch.bfloat16, torch.float16]))
def test_low_precision_inputs_match_their_float32_values(run_policy_loss, kwargs, dtype):
    """bf16/fp16 inputs compute in float32: the same as float32 inputs holding the rounded values."""
    low = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    as_f32 = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in low.items()}
    a, b = run_policy_loss(low, "reference"), run_policy_loss(as_f32, "reference")
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert a[2].dtype == dtype and torch.equal(a[2], b[2].to(dtype))


# triton (interpreter): a few examples each, against the reference


@needs_triton
@TRITON
@given(batches(dtype=torch.float32), st.data())
def test_triton_masked_garbage_changes_nothing(run_policy_loss, kwargs, data):
    assert_same(run_policy_loss(kwargs, "triton"), run_policy_loss(with_garbage(kwargs, data), "triton"))


@needs_triton
@TRITON
@given(batches(dtype=torch.float32))
def test_triton_matches_reference_and_packed_equals_padded(run_policy_loss, kwargs):
    ref = run_policy_loss(kwargs, "reference")
    padded = run_policy_loss(kwargs, "triton")
    packed = run_policy_loss(to_packed(kwargs), "triton")
    for got in (padded, packed):
        torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[2].reshape(-1), ref[2].reshape(-1), rtol=1e-4, atol=1e-5)


@needs_triton
@TRITON
@given(batches(dtype=torch.float32), st.data())
def test_triton_non_finite_at_a_valid_position_shows(run_policy_loss, kwargs, data):
    if not kwargs["response_mask"].any():
        return
    assert torch.isnan(run_policy_loss(with_non_finite_at_a_valid_position(kwargs, data), "triton")[0])


@needs_triton
@TRITON
@given(batches(dtype=torch.float32))
def test_triton_gradient_only_into_log_prob_and_empty_is_zero(run_policy_loss, on_backend_device, kwargs):
    leaves = {k: kwargs[k].clone().requires_grad_(True) for k in INPUTS if kwargs[k] is not None}
    loss, _ = policy_loss(**on_backend_device("triton", dict(kwargs, **leaves)), backend="triton")
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])
    empty = dict(kwargs, response_mask=torch.zeros_like(kwargs["response_mask"]))
    loss, metrics, grad = run_policy_loss(empty, "triton")
    assert loss.item() == 0 and not grad.any() and all(v.item() == 0 for v in metrics.values())
