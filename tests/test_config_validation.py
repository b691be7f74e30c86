"""Every invalid config field and every invalid input raises ValueError naming what is wrong."""

import re

import pytest
import torch

from ptr_kernels import PolicyLoss, PolicyLossConfig, policy_loss
from ptr_kernels.config import FIELDS, resolve_config

INVALID_FIELDS = [
    ("method", "grpo"), ("method", None),
    ("divergence", "js"),
    ("delta", 0.0), ("delta", -0.1), ("delta", float("nan")), ("delta", float("inf")), ("delta", "0.1"),
    ("delta", True), ("delta", None),
    ("delta_low", 0.0), ("delta_low", -1.0),
    ("delta_high", 0.0), ("delta_high", float("nan")),
    ("w_min", 0.0), ("w_min", 1.5),
    ("delta_b", -0.01),
    ("delta_b_quantile", -0.1), ("delta_b_quantile", 1.1),
    ("delta_b_quantile_scale", 0.0), ("delta_b_quantile_scale", -1.0), ("delta_b_quantile_scale", float("nan")),
    ("delta_b_max_mult", 0.5),
    ("length_mode", "full"), ("length_mode", 0), ("length_mode", True), ("length_mode", 1.5),
    ("gate", "sigmoid"),
    ("surrogate", "log"),
    ("ratio_cap", 0.0), ("ratio_cap", None),
    ("log_ratio_clamp", 0.0), ("log_ratio_clamp", -1.0),
    ("clip_ratio_low", 1.0), ("clip_ratio_low", -0.1),
    ("clip_ratio_high", -0.1),
    ("clip_ratio_c", 1.0), ("clip_ratio_c", 0.5),
    ("loss_agg_mode", "mean"), ("loss_agg_mode", "seq-mean"),
    ("loss_scale_factor", 0.0), ("loss_scale_factor", -2.0),
]


@pytest.mark.parametrize("field,value", INVALID_FIELDS)
def test_invalid_field_is_named(field, value):
    pattern = re.escape(f"PolicyLossConfig.{field}={value!r}")
    with pytest.raises(ValueError, match=pattern):
        PolicyLossConfig(**{field: value})
    with pytest.raises(ValueError, match=pattern):  # also through keyword overrides
        PolicyLossConfig().replace(**{field: value})


def test_every_field_has_an_invalid_example():
    assert {f for f, _ in INVALID_FIELDS} == set(FIELDS)


def test_valid_edge_values_are_accepted():
    PolicyLossConfig(w_min=1.0, delta_b=0.0, delta_b_quantile=0.0, delta_b_max_mult=1.0, length_mode=1,
                     log_ratio_clamp=None, clip_ratio_low=0.0, clip_ratio_high=0.0, clip_ratio_c=None)
    PolicyLossConfig(delta_b_quantile=1.0, delta_b_max_mult=4.0, length_mode="padded", gate="soft",
                     surrogate="logp", divergence="binary_kl", method="ppo", delta_low=0.1, delta_high=0.3)


def _inputs(B=2, T=3):
    lp = -torch.rand(B, T, dtype=torch.float64)
    return lp, lp - 0.1, torch.randn(B, dtype=torch.float64), torch.ones(B, T, dtype=torch.bool)


def test_unknown_override_keyword_is_named():
    lp, olp, adv, mask = _inputs()
    with pytest.raises(ValueError, match="bogus"):
        policy_loss(lp, olp, adv, mask, bogus=1)
    with pytest.raises(ValueError, match="delt"):
        PolicyLoss(delt=0.2)
    with pytest.raises(ValueError, match="config must be a PolicyLossConfig"):
        policy_loss(lp, olp, adv, mask, config={"delta": 0.2})


def test_overrides_apply():
    lp, olp, adv, mask = _inputs()
    a = policy_loss(lp, olp, adv, mask, method="dppo", delta=0.01)[0]
    b = policy_loss(lp, olp, adv, mask, config=PolicyLossConfig(method="dppo", delta=0.01))[0]
    assert a.item() == b.item()


def _padded(**changes):
    lp, olp, adv, mask = _inputs()
    args = dict(log_prob=lp, old_log_prob=olp, advantages=adv, response_mask=mask)
    args.update(changes)
    return args


def _packed(**changes):
    lp = -torch.rand(5, dtype=torch.float64)
    args = dict(log_prob=lp, old_log_prob=lp - 0.1, advantages=torch.randn(2, dtype=torch.float64),
                cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    args.update(changes)
    return args


INVALID_INPUTS = [
    ("old_log_prob", _padded(old_log_prob=torch.zeros(2, 4, dtype=torch.float64))),
    ("log_prob", _padded(log_prob=torch.zeros(2, 3, dtype=torch.int64))),
    ("old_log_prob", _padded(old_log_prob=torch.zeros(2, 3, dtype=torch.int32))),
    ("advantages", _padded(advantages=torch.ones(2, dtype=torch.int64))),
    ("log_prob", _padded(log_prob=[[0.0] * 3] * 2)),
    ("response_mask", _padded(response_mask=torch.ones(3, 2, dtype=torch.bool))),
    ("response_mask", _padded(response_mask=torch.ones(2, 3, dtype=torch.complex64))),
    ("rollout_is_weights", _padded(rollout_is_weights=torch.ones(2, 2, dtype=torch.float64))),
    ("rollout_is_weights", _padded(rollout_is_weights=torch.ones(2, 3, dtype=torch.int64))),
    ("advantages", _padded(advantages=torch.ones(3, dtype=torch.float64))),
    ("advantages", _padded(advantages=torch.ones(2, 4, dtype=torch.float64))),
    # neither: 1-D input without cu_seqlens; both: [B, T] input with cu_seqlens
    ("needs cu_seqlens", _packed(cu_seqlens=None)),
    ("with cu_seqlens the input is packed", _padded(cu_seqlens=torch.tensor([0, 3, 6]))),
    ("cu_seqlens must start at 0", _packed(cu_seqlens=torch.tensor([1, 2, 5]))),
    ("cu_seqlens must be non-decreasing", _packed(cu_seqlens=torch.tensor([0, 3, 2, 5]),
                                                  advantages=torch.ones(3, dtype=torch.float64))),
    ("cu_seqlens must end at N", _packed(cu_seqlens=torch.tensor([0, 2, 4]))),
    ("cu_seqlens must be a 1-D int32 or int64", _packed(cu_seqlens=torch.tensor([0.0, 2.0, 5.0]))),
    ("cu_seqlens must be a 1-D int32 or int64", _packed(cu_seqlens=torch.tensor([[0, 2, 5]]))),
    ("cu_seqlens must be a 1-D int32 or int64", _packed(cu_seqlens=torch.tensor([], dtype=torch.int64))),
    ("advantages", _packed(advantages=torch.ones(3, dtype=torch.float64))),
    ("response_mask", _packed(response_mask=torch.ones(4, dtype=torch.bool))),
    ("old_log_prob is on meta", _padded(old_log_prob=torch.zeros(2, 3, dtype=torch.float64, device="meta"))),
    ("advantages is on meta", _padded(advantages=torch.zeros(2, dtype=torch.float64, device="meta"))),
    ("response_mask is on meta", _padded(response_mask=torch.ones(2, 3, dtype=torch.bool, device="meta"))),
    ("cu_seqlens is on meta", _packed(cu_seqlens=torch.tensor([0, 2, 5], device="meta"))),
    ("loss_scale_factor is required", {**_packed(), "loss_agg_mode": "seq-mean-token-sum-norm"}),
    # the global normalizers: a finite number (dp_size > 0, counts >= 0) or a one-element real tensor there
    ("batch_num_tokens=nan", {**_padded(), "batch_num_tokens": float("nan")}),
    ("batch_num_tokens=-5", {**_padded(), "batch_num_tokens": -5}),
    ("batch_num_tokens='abc'", {**_padded(), "batch_num_tokens": "abc"}),
    ("batch_num_tokens must be a number or a one-element", {**_padded(), "batch_num_tokens": torch.ones(2)}),
    ("global_batch_size=True", {**_padded(), "global_batch_size": True}),
    ("global_batch_size is on meta", {**_padded(), "global_batch_size": torch.ones((), device="meta")}),
    ("dp_size=0", {**_padded(), "dp_size": 0}),
    ("dp_size=None", {**_padded(), "dp_size": None}),
    ("dp_size must be a number or a one-element", {**_padded(), "dp_size": torch.tensor(True)}),
    ("backend='cuda'", {**_padded(), "backend": "cuda"}),
]


@pytest.mark.parametrize("name,kwargs", INVALID_INPUTS, ids=[f"{i}-{n}" for i, (n, _) in enumerate(INVALID_INPUTS)])
def test_invalid_input_is_named(name, kwargs, backend):
    # CPU tensors on both backends: the ValueError comes from the checks made before the kernel is reached (on CUDA
    # tensors some of them, the values of cu_seqlens and the zero counts, are asynchronous device asserts instead)
    if backend == "triton":
        pytest.importorskip("triton")
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(ValueError, match=re.escape(name)):
        policy_loss(**kwargs)


def test_overrides_resolve_once_per_distinct_set():
    """Adapters pass the same keyword overrides on every call: the validated config is built once and reused,
    and a value that only compares equal (True == 1, 1 == 1.0) is not mistaken for another."""
    first = resolve_config(None, dict(method="dppo", delta=0.2))
    assert resolve_config(None, dict(method="dppo", delta=0.2)) is first
    assert resolve_config(None, dict(w_min=1)).w_min == 1.0
    with pytest.raises(ValueError, match="w_min"):
        resolve_config(None, dict(w_min=True))
    with pytest.raises(ValueError, match="delta"):
        resolve_config(None, dict(delta=[0.2]))  # unhashable: validated without the cache
