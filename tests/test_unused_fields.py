"""`unused_fields`: which PolicyLossConfig fields a configuration never reads (the callers warn about them)."""

import pytest

from ptr_kernels.config import METHODS, PolicyLossConfig, unused_fields


@pytest.mark.parametrize("method", METHODS)
def test_defaults_leave_nothing_unused(method):
    # this looks up every field in the table: a field added to PolicyLossConfig but not to it fails here
    assert unused_fields(PolicyLossConfig(method=method)) == ()


@pytest.mark.parametrize("method, overrides, unused", [
    ("dppo", {"w_min": 0.7}, ("w_min",)),
    ("dppo", {"delta_b": 0.01, "length_mode": "padded", "gate": "soft"}, ("delta_b", "length_mode", "gate")),
    ("dppo", {"delta_low": 0.1, "delta_high": 0.3, "delta": 0.2}, ("delta",)),  # both sides given: delta unread
    ("dppo", {"delta_low": 0.1, "delta": 0.2}, ()),  # delta is still the A > 0 side
    ("cppo", {"delta_low": 0.1, "clip_ratio_c": 3.0}, ("delta_low", "clip_ratio_c")),
    ("cppo", {"delta_b_quantile": None, "delta_b_quantile_scale": 1.5, "delta_b_max_mult": 3.0},
     ("delta_b_quantile_scale", "delta_b_max_mult")),  # a fixed delta_b has no quantile to scale or cap
    ("cppo", {"delta_b_quantile_scale": 1.5, "delta_b_max_mult": 3.0}, ()),
    ("cppo", {"ratio_cap": 5.0}, ()),  # the ratio surrogate has no cap, but ratio_cap_frac counts above it
    ("ppo", {"ratio_cap": 5.0}, ("ratio_cap",)),
    ("ppo", {"delta": 0.2, "surrogate": "logp", "w_min": 0.5}, ("delta", "w_min", "surrogate")),
    ("ppo", {"clip_ratio_c": 3.0, "log_ratio_clamp": None, "divergence": "binary_kl"}, ()),
    ("ppo", {"loss_scale_factor": 4.0}, ("loss_scale_factor",)),
    ("ppo", {"loss_scale_factor": 4.0, "loss_agg_mode": "seq-mean-token-sum-norm"}, ()),
])
def test_fields_another_method_reads_are_unused(method, overrides, unused):
    assert unused_fields(PolicyLossConfig(method=method, **overrides)) == unused

