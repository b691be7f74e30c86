"""`PolicyLossConfig`: every hyperparameter of docs/math.md, with its names and defaults."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

METHODS = ("cppo", "dppo", "ppo")
# the metrics each method reports (docs/math.md section 9), in this order on every backend: the three every method
# reports first, then the method's own
METHOD_METRICS = {
    "cppo": ("mask_frac", "ppo_kl", "divergence_mean", "ratio_cap_frac", "mask_frac_token", "mask_frac_budget",
             "delta_b_mean"),
    "dppo": ("mask_frac", "ppo_kl", "divergence_mean", "ratio_cap_frac"),
    "ppo": ("mask_frac", "ppo_kl", "divergence_mean", "clip_frac_low", "clip_frac_high", "clip_frac_dual"),
}
DIVERGENCES = ("binary_tv", "binary_kl")
LOGIT_DIVERGENCES = ("topk_tv", "topk_kl")  # need full distributions (logits), see docs/math.md
LENGTH_MODES = ("sequence", "padded")
GATES = ("hard", "soft")
SURROGATES = ("ratio", "logp")
# Every backend computes in float32 (at least): a hyperparameter beyond its range would become inf there.
FLOAT32_MAX = 3.4028234663852886e38
MAX_HORIZON = 2**31 - 1  # an int length_mode is an int32 position
LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
# the choices of every field that holds a string (length_mode: an int horizon too)
CHOICES = {"method": METHODS, "divergence": DIVERGENCES + LOGIT_DIVERGENCES, "length_mode": LENGTH_MODES,
           "gate": GATES, "surrogate": SURROGATES, "loss_agg_mode": LOSS_AGG_MODES}


def _fail(field: str, value, allowed: str) -> None:
    raise ValueError(f"PolicyLossConfig.{field}={value!r} is invalid: expected {allowed}")


def _check_choice(field: str, value) -> None:
    if value not in CHOICES[field]:
        _fail(field, value, "one of " + ", ".join(repr(c) for c in CHOICES[field]))


def _check_number(field: str, value, *, low=None, high=None, low_open=False, high_open=False,
                  optional=False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or abs(value) > FLOAT32_MAX:
        _fail(field, value, "a finite number within float32's range (|x| <= 3.4e38)"
              + (" or None" if optional else ""))
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        rng = f"{lo or '(-inf'}, {hi or 'inf)'}"
        _fail(field, value, f"a number in {rng}" + (" or None" if optional else ""))


FLOAT_FIELDS = ("delta", "delta_low", "delta_high", "w_min", "delta_b", "delta_b_quantile", "delta_b_quantile_scale",
                "delta_b_max_mult",
                "ratio_cap", "log_ratio_clamp", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "loss_scale_factor")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyperparameters of the policy loss. Validated on construction (ValueError names the field); every
    number must be finite and within float32's range, since every backend computes in float32 at least.

    method: "cppo" (position-weighted threshold + prefix budget), "dppo" (divergence mask), "ppo" (ratio clip).
    divergence: D_t for cppo/dppo, "binary_tv" |pi - mu| or "binary_kl" KL(mu || pi) on {y_t, rest};
        "topk_tv" / "topk_kl" (docs/math.md section 7) only through `policy_loss_from_logits`.
    delta: token threshold (cppo, and dppo's default for both sides); delta_low / delta_high: dppo's
        thresholds for A < 0 / A > 0 (None: delta).
    w_min: position weight at the last position (cppo); 1 disables the position weight.
    delta_b, delta_b_quantile, delta_b_quantile_scale, delta_b_max_mult: prefix budget per unit weight; with a
        quantile q and scale k the per-sequence budget is clamp(k * Quantile_q(D), delta_b, max_mult * delta_b);
        a quantile of None keeps delta_b fixed.
    length_mode: T_w of the position weight: "sequence" (last valid position), "padded" (row width, or the
        longest packed sequence) or an int horizon.
    gate: "hard" (0/1 mask) or "soft" (min(1, 1/z), paper App. C).
    surrogate: "ratio" (-A r M) or "logp" (-A sg(min(r, ratio_cap)) log_prob M).
    log_ratio_clamp: |log_prob - old_log_prob| is clamped to this before exp (None: no clamp).
    clip_ratio_low, clip_ratio_high, clip_ratio_c: ppo clip range and dual-clip constant (None: off).
    loss_agg_mode, loss_scale_factor: verl's aggregation; loss_scale_factor divides seq-mean-token-sum-norm
        (None: the padded width T; required for packed input).
    """

    method: str = "cppo"
    divergence: str = "binary_tv"
    delta: float = 0.15
    delta_low: Optional[float] = None
    delta_high: Optional[float] = None
    w_min: float = 0.8
    delta_b: float = 0.02
    delta_b_quantile: Optional[float] = 0.9
    delta_b_quantile_scale: float = 1.0
    delta_b_max_mult: float = 2.0
    length_mode: Union[str, int] = "sequence"
    gate: str = "hard"
    surrogate: str = "ratio"
    ratio_cap: float = 20.0
    log_ratio_clamp: Optional[float] = 20.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: Optional[float] = None
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: Optional[float] = None

    def __post_init__(self) -> None:
        _check_choice("method", self.method)
        _check_choice("divergence", self.divergence)
        _check_number("delta", self.delta, low=0, low_open=True)
        _check_number("delta_low", self.delta_low, low=0, low_open=True, optional=True)
        _check_number("delta_high", self.delta_high, low=0, low_open=True, optional=True)
        _check_number("w_min", self.w_min, low=0, high=1, low_open=True)
        _check_number("delta_b", self.delta_b, low=0)
        _check_number("delta_b_quantile", self.delta_b_quantile, low=0, high=1, optional=True)
        _check_number("delta_b_quantile_scale", self.delta_b_quantile_scale, low=0, low_open=True)
        _check_number("delta_b_max_mult", self.delta_b_max_mult, low=1)
        if isinstance(self.length_mode, str):
            _check_choice("length_mode", self.length_mode)
        elif isinstance(self.length_mode, bool) or not isinstance(self.length_mode, int) \
                or not 1 <= self.length_mode <= MAX_HORIZON:
            _fail("length_mode", self.length_mode, f"'sequence', 'padded' or an int horizon in [1, {MAX_HORIZON}]")
        _check_choice("gate", self.gate)
        _check_choice("surrogate", self.surrogate)
        _check_number("ratio_cap", self.ratio_cap, low=0, low_open=True)
        _check_number("log_ratio_clamp", self.log_ratio_clamp, low=0, low_open=True, optional=True)
        _check_number("clip_ratio_low", self.clip_ratio_low, low=0, high=1, high_open=True)
        _check_number("clip_ratio_high", self.clip_ratio_high, low=0)
        _check_number("clip_ratio_c", self.clip_ratio_c, low=1, low_open=True, optional=True)
        _check_choice("loss_agg_mode", self.loss_agg_mode)
        _check_number("loss_scale_factor", self.loss_scale_factor, low=0, low_open=True, optional=True)
        for name in FLOAT_FIELDS:  # numbers as Python floats (an int of 2**64 or a numpy scalar would not do in torch)
            value = getattr(self, name)
            if value is not None and type(value) is not float:
                object.__setattr__(self, name, float(value))

    def __hash__(self) -> int:  # cached: the kernels' plan is looked up by config on every call
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    @property
    def calibrates_delta_b(self) -> bool:
        """cppo with a per-sequence delta_b_i calibrated on the sequence's divergences (docs/math.md section 3)."""
        return self.method == "cppo" and self.delta_b_quantile is not None

    @property
    def delta_low_value(self) -> float:
        return self.delta if self.delta_low is None else self.delta_low

    @property
    def delta_high_value(self) -> float:
        return self.delta if self.delta_high is None else self.delta_high

    def replace(self, **overrides) -> "PolicyLossConfig":
        """A copy with some fields changed (validated again); unknown names raise ValueError."""
        return resolve_config(self, overrides)


FIELDS = tuple(f.name for f in dataclasses.fields(PolicyLossConfig))
DEFAULT_CONFIG = PolicyLossConfig()  # the defaults of docs/math.md, validated once


def resolve_config(config: Optional[PolicyLossConfig], overrides: dict) -> PolicyLossConfig:
    """`config` (default: the defaults of docs/math.md) with keyword `overrides` applied, validated."""
    if config is None:
        config = DEFAULT_CONFIG
    elif not isinstance(config, PolicyLossConfig):
        raise ValueError(f"config must be a PolicyLossConfig, got {type(config).__name__}")
    if not overrides:
        return config
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown policy loss option(s) {unknown}; valid options: {', '.join(FIELDS)}")
    if torch.compiler.is_compiling():  # Dynamo traces the values it tracks; a cache would be bypassed anyway
        return dataclasses.replace(config, **overrides)
    # the type is part of the key: True == 1 and 1 == 1.0 hash alike, but a bool is refused where 1 is not
    items = tuple((name, type(value), value) for name, value in overrides.items())
    try:
        hash(items)
    except TypeError:  # an unhashable value: no cache, the validation names it
        return dataclasses.replace(config, **overrides)
    return _replaced(config, items)


@functools.lru_cache(maxsize=256)
def _replaced(config: PolicyLossConfig, items: tuple) -> PolicyLossConfig:
    """`dataclasses.replace` with validation, once per distinct (config, overrides): adapters pass the same
    keyword overrides on every call."""
    return dataclasses.replace(config, **{name: value for name, _, value in items})


def _applies(config: PolicyLossConfig) -> dict:
    """{field: whether `config` reads it}: the one table of which option applies to which method."""
    cppo, dppo, ppo = (config.method == m for m in METHODS)
    return {
        "method": True,
        "divergence": True,  # every method reports divergence_mean
        "delta": cppo or (dppo and None in (config.delta_low, config.delta_high)),
        "delta_low": dppo,
        "delta_high": dppo,
        "w_min": cppo,
        "delta_b": cppo,
        "delta_b_quantile": cppo,
        "delta_b_quantile_scale": config.calibrates_delta_b,
        "delta_b_max_mult": config.calibrates_delta_b,
        "length_mode": cppo,
        "gate": cppo,
        "surrogate": not ppo,
        "ratio_cap": not ppo,  # the logp surrogate's cap, and the ratio_cap_frac metric with either surrogate
        "log_ratio_clamp": True,
        "clip_ratio_low": ppo,
        "clip_ratio_high": ppo,
        "clip_ratio_c": ppo,
        "loss_agg_mode": True,
        "loss_scale_factor": config.loss_agg_mode == "seq-mean-token-sum-norm",
    }


def unused_fields(config: PolicyLossConfig) -> tuple:
    """The fields of `config` set away from their default that it never reads (`w_min` with dppo, a fixed
    delta_b's `delta_b_max_mult`, ...), in field order: a caller warns about them."""
    applies = _applies(config)
    return tuple(name for name in FIELDS
                 if not applies[name] and getattr(config, name) != getattr(DEFAULT_CONFIG, name))

