"""Edge behaviour both backends share (docs/math.md): non-finite values, gradients, bad hyperparameters,
inconsistent global counts, float masks, overflow without the clamp, dual-clip ties.

Every test runs on the reference and on the Triton kernel (CUDA tensors when a GPU is present, else the
interpreter on CPU); the fixtures `backend` and `run_policy_loss` come from conftest.py.
"""

import math
import re

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels: triton exists for Linux only")

from ptr_kernels import PolicyLossConfig, policy_loss  # noqa: E402
from ptr_kernels.config import FIELDS  # noqa: E402
from ptr_kernels.testing.oracle import policy_loss_literal  # noqa: E402

METHODS = {  # every method, with the options that change how a token's loss is computed
    "cppo": dict(method="cppo"),
    "cppo-soft-logp-kl": dict(method="cppo", gate="soft", surrogate="logp", divergence="binary_kl"),
    "dppo": dict(method="dppo"),
    "dppo-logp": dict(method="dppo", surrogate="logp"),
    "ppo": dict(method="ppo"),
    "ppo-dual": dict(method="ppo", clip_ratio_c=3.0),
}
INPUTS = ("log_prob", "old_log_prob", "advantages", "rollout_is_weights")
NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def batch(layout: str, dtype=torch.float32):
    """Two sequences of lengths 5 and 3 with one masked hole each, as padded `[2, 6]` or packed `[8]` inputs.

    Returns (kwargs for policy_loss, flat indices of a valid and of a masked position).
    """
    g = torch.Generator().manual_seed(0)
    lengths = (5, 3)
    old = -torch.rand(2, 6, generator=g, dtype=torch.float64) * 2 - 0.05
    lp = old + 0.2 * torch.randn(2, 6, generator=g, dtype=torch.float64)
    adv = torch.tensor([[1.0, -0.5, 0.7, -1.2, 0.3, 0.9], [-0.8, 0.4, 1.1, 0.6, -0.2, 0.5]], dtype=torch.float64)
    rw = 0.5 + torch.rand(2, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    mask[0, 2] = mask[1, 1] = False  # holes inside the responses
    tensors = dict(log_prob=lp, old_log_prob=old, advantages=adv, rollout_is_weights=rw)
    if layout == "padded":
        kwargs = {k: v.to(dtype) for k, v in tensors.items()}
        kwargs["response_mask"] = mask
        return kwargs, 1, 2  # [0, 1] is valid, [0, 2] a hole
    rows = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    kwargs = {k: v[rows].to(dtype) for k, v in tensors.items()}
    kwargs["response_mask"] = mask[rows]
    kwargs["cu_seqlens"] = torch.tensor([0, 5, 8], dtype=torch.int32)
    return kwargs, 1, 2


def with_value(kwargs, name, index, value):
    out = dict(kwargs)
    t = out[name].clone()
    t.view(-1)[index] = value
    out[name] = t
    return out


# 1. NaN propagates; +-inf at a valid position is NaN too; garbage at masked positions changes nothing


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", INPUTS)
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_non_finite_at_a_valid_position_gives_nan(backend, layout, method, name, value, run_policy_loss):
    kwargs, valid, _ = batch(layout)
    loss, metrics, _ = run_policy_loss(with_value(kwargs, name, valid, value), backend, **METHODS[method])
    assert torch.isnan(loss), f"{name}={value} at a valid position gave loss {loss.item()}"
    if name in ("log_prob", "old_log_prob"):  # the metrics the log-probs enter
        assert torch.isnan(metrics["ppo_kl"]) and torch.isnan(metrics["divergence_mean"])


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", METHODS)
def test_garbage_at_masked_positions_changes_nothing(backend, layout, method, run_policy_loss):
    kwargs, _, hole = batch(layout)
    clean = run_policy_loss(kwargs, backend, **METHODS[method])
    for value in NON_FINITE + (1e30, -1e30):
        dirty = dict(kwargs)
        for name in INPUTS:
            dirty = with_value(dirty, name, hole, value)
        loss, metrics, grad = run_policy_loss(dirty, backend, **METHODS[method])
        assert torch.equal(loss, clean[0]), value  # bitwise
        assert all(torch.equal(metrics[k], clean[1][k]) for k in metrics), value
        assert torch.equal(grad, clean[2]), value
        assert grad.view(-1)[hole] == 0


def test_nan_advantage_at_a_zero_advantage_position_still_shows(backend, run_policy_loss):
    """The zero-advantage rule (exactly 0) never hides a NaN log-prob."""
    kwargs, valid, _ = batch("padded")
    kwargs = with_value(with_value(kwargs, "advantages", valid, 0.0), "log_prob", valid, float("nan"))
    assert torch.isnan(run_policy_loss(kwargs, backend)[0])


# 2. Gradient only into log_prob


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_only_into_log_prob(backend, layout, method, on_backend_device):
    kwargs, _, _ = batch(layout)
    leaves = {k: kwargs[k].clone().requires_grad_(True) for k in INPUTS}
    loss, _ = policy_loss(**on_backend_device(backend, dict(kwargs, **leaves)), backend=backend, **METHODS[method])
    grads = torch.autograd.grad(loss, [leaves[k] for k in INPUTS], allow_unused=True, retain_graph=True)
    assert grads[0] is not None and torch.isfinite(grads[0]).all()
    assert all(g is None for g in grads[1:]), [k for k, g in zip(INPUTS, grads) if g is not None]
    loss.backward()  # .grad stays None too
    assert all(leaves[k].grad is None for k in INPUTS[1:])


# 3. Hyperparameters beyond float32's range: ValueError naming the field, on both backends

BEYOND_FLOAT32 = 1e39
FLOAT_FIELDS = ("delta", "delta_low", "delta_high", "delta_b", "delta_b_quantile_scale", "delta_b_max_mult",
                "ratio_cap", "log_ratio_clamp", "clip_ratio_high", "clip_ratio_c", "loss_scale_factor")
BOUNDED_FIELDS = ("w_min", "delta_b_quantile", "clip_ratio_low")  # in [0, 1] already


def test_every_float_field_is_covered():
    numeric = {f for f in FIELDS if isinstance(getattr(PolicyLossConfig(), f), (float, type(None)))}
    assert numeric == set(FLOAT_FIELDS) | set(BOUNDED_FIELDS)


@pytest.mark.parametrize("field", FLOAT_FIELDS + BOUNDED_FIELDS)
def test_float_field_beyond_float32_is_named(backend, field, on_backend_device):
    kwargs = on_backend_device(backend, batch("padded")[0])
    with pytest.raises(ValueError, match=rf"PolicyLossConfig\.{field}=1e\+39 is invalid: .*float32"):
        policy_loss(**kwargs, backend=backend, **{field: BEYOND_FLOAT32})


@pytest.mark.parametrize("value", [2**31, 2**70])
def test_int_horizon_beyond_int32_is_named(value):
    with pytest.raises(ValueError, match=rf"PolicyLossConfig\.length_mode={value}"):
        PolicyLossConfig(length_mode=value)
    PolicyLossConfig(length_mode=2**31 - 1)


def test_float32_max_itself_is_accepted():
    PolicyLossConfig(delta=3.4e38, ratio_cap=3.4e38, loss_scale_factor=3.4e38)


@pytest.mark.parametrize("name", ["dp_size", "batch_num_tokens", "global_batch_size"])
@pytest.mark.parametrize("value", [BEYOND_FLOAT32, 2**200])
def test_normalizer_beyond_float32_is_named(backend, name, value, on_backend_device):
    kwargs = on_backend_device(backend, batch("packed")[0])
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r} is invalid: ") + ".*float32"):
        policy_loss(**kwargs, backend=backend, **{name: value})


# 4. A global count of 0 while the batch has valid tokens


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name,mode", [("batch_num_tokens", "token-mean"),
                                       ("global_batch_size", "seq-mean-token-mean"),
                                       ("global_batch_size", "seq-mean-token-sum")])
def test_zero_global_count_with_valid_tokens_is_named(backend, layout, name, mode):
    # CPU tensors on both backends: the ValueError is the host-side check, made before the kernel is reached (on
    # CUDA tensors the same check is an asynchronous device assert, which would end the process's CUDA context)
    kwargs, _, _ = batch(layout)
    for value in (0, 0.0):
        with pytest.raises(ValueError, match=rf"{name}=0 but the batch has valid tokens"):
            policy_loss(**kwargs, backend=backend, loss_agg_mode=mode, **{name: value})
    without_mask = {k: v for k, v in kwargs.items() if k != "response_mask"}
    with pytest.raises(ValueError, match=name):
        policy_loss(**without_mask, backend=backend, loss_agg_mode=mode, **{name: 0})


def test_zero_global_count_is_fine_without_valid_tokens(backend, run_policy_loss):
    kwargs, _, _ = batch("padded")
    kwargs["response_mask"] = torch.zeros_like(kwargs["response_mask"])
    loss, _, grad = run_policy_loss(kwargs, backend, batch_num_tokens=0, global_batch_size=0)
    assert loss.item() == 0 and not grad.any()
    empty = dict(log_prob=torch.zeros(0), old_log_prob=torch.zeros(0), advantages=torch.zeros(0),
                 cu_seqlens=torch.zeros(1, dtype=torch.int64))
    assert run_policy_loss(empty, backend, batch_num_tokens=0)[0].item() == 0


def test_tensor_zero_count_is_not_checked(backend, run_policy_loss):
    """A count given as a tensor is not read on the host (no sync): the loss divides by it as documented."""
    kwargs, _, _ = batch("padded")
    loss, _, _ = run_policy_loss(kwargs, backend, batch_num_tokens=torch.zeros(()))
    assert loss.item() == 0


# 5. Float masks: nonzero = valid


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16, torch.int64])
def test_mask_nonzero_means_valid(backend, layout, mask_dtype, run_policy_loss):
    kwargs, _, _ = batch(layout)
    bool_mask = kwargs["response_mask"]
    values = torch.tensor([0.5, 2.0, -1.0, 3.0, 1.0, 7.0, -4.0, 1.0, 0.25, 9.0, 1.0, 5.0])
    if not mask_dtype.is_floating_point:
        values = torch.where(values.abs() < 1, 2.0, values)
    weird = torch.where(bool_mask, values[:bool_mask.numel()].view_as(bool_mask), 0.0).to(mask_dtype)
    assert (weird != 0).equal(bool_mask)
    expected = run_policy_loss(kwargs, backend)
    got = run_policy_loss(dict(kwargs, response_mask=weird), backend)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    assert all(torch.equal(got[1][k], expected[1][k]) for k in expected[1])


# 6. Overflow without the clamp; exact dual-clip ties


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_advantage_token_contributes_zero_even_where_exp_overflows(backend, method, dtype, run_policy_loss):
    """log-ratio 1000 overflows exp in float32 and float64; with A = 0 that token adds exactly 0."""
    kwargs, valid, _ = batch("padded", dtype)
    base = with_value(kwargs, "advantages", valid, 0.0)
    clean = run_policy_loss(base, backend, log_ratio_clamp=None, **METHODS[method])
    big = with_value(base, "log_prob", valid, base["old_log_prob"].view(-1)[valid] + 1000.0)
    loss, metrics, grad = run_policy_loss(big, backend, log_ratio_clamp=None, **METHODS[method])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad.view(-1)[valid] == 0
    others = torch.ones_like(grad, dtype=torch.bool)
    others.view(-1)[valid] = False
    if METHODS[method]["method"] != "cppo":  # cppo's prefix budget sees the token's divergence: other decisions move
        torch.testing.assert_close(loss, clean[0], rtol=1e-6, atol=0)
        assert torch.equal(grad[others], clean[2][others])


def test_oracle_zero_advantage_overflow_is_zero():
    kwargs, valid, _ = batch("padded", torch.float64)
    kwargs = with_value(with_value(kwargs, "advantages", valid, 0.0), "log_prob", valid, 1000.0)
    lit = policy_loss_literal(**kwargs, config=PolicyLossConfig(method="dppo", log_ratio_clamp=None))
    assert math.isfinite(lit.loss) and lit.grad.view(-1)[valid] == 0


def test_nonzero_advantage_overflow_shows(backend, run_policy_loss):
    """Without the clamp, a ratio that overflows float32 with A != 0 is not hidden: the loss is not finite."""
    kwargs, valid, _ = batch("padded")
    big = with_value(kwargs, "log_prob", valid, kwargs["old_log_prob"].view(-1)[valid] + 100.0)
    loss = run_policy_loss(big, backend, method="ppo", log_ratio_clamp=None)[0]
    assert not torch.isfinite(loss)


def test_exact_dual_clip_tie_keeps_the_whole_gradient(run_policy_loss):
    """r = exp(1) = clip_ratio_c exactly (float64): the bound does not bind (clip_frac_dual counts bound > loss
    only), so the token keeps -A r / n, as in the oracle, not half of it (torch.minimum's split)."""
    lp = torch.tensor([1.0, 0.5], dtype=torch.float64)
    kwargs = dict(log_prob=lp, old_log_prob=torch.zeros(2, dtype=torch.float64),
                  advantages=torch.tensor([-1.0, -1.0], dtype=torch.float64),
                  cu_seqlens=torch.tensor([0, 2]))
    config = dict(method="ppo", clip_ratio_c=math.exp(1.0))
    loss, metrics, grad = run_policy_loss(kwargs, "reference", **config)
    lit = policy_loss_literal(**kwargs, config=PolicyLossConfig(**config))
    assert metrics["clip_frac_dual"].item() == 0 == lit.metrics["clip_frac_dual"]
    assert grad.tolist() == pytest.approx(lit.grad.tolist(), rel=1e-12)
    assert grad[0].item() == pytest.approx(math.exp(1.0) / 2, rel=1e-12)  # -A r / n_tok, whole
    assert loss.item() == pytest.approx(lit.loss, rel=1e-12)
