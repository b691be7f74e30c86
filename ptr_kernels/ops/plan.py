"""A `PolicyLossConfig` encoded for the kernels, once per config (cached), and its one list form.

`kernel_plan(config)` gives the token kernel's branch ids (the aggregation mode included) and its float32 `params`
(made once per device); `layout_constexprs` adds what depends on the batch's layout. The custom op of the compiled path
carries a config as `encode_config(config)` (one list of floats: Dynamo traces its making, and torch's custom-op
machinery costs time per argument) and `decode_config` reads it back, cached, so both paths launch from the
same plan.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import (DIVERGENCES, GATES, LENGTH_MODES, LOGIT_DIVERGENCES, LOSS_AGG_MODES, METHODS, SURROGATES,
                      PolicyLossConfig)
from . import ids, reduce, token

METHOD_IDS = {"cppo": ids.METHOD_CPPO.value, "dppo": ids.METHOD_DPPO.value, "ppo": ids.METHOD_PPO.value}
DIVERGENCE_IDS = {"binary_tv": ids.DIV_BINARY_TV.value, "binary_kl": ids.DIV_BINARY_KL.value}
GATE_IDS = {"hard": ids.GATE_HARD.value, "soft": ids.GATE_SOFT.value}
SURROGATE_IDS = {"ratio": ids.SURROGATE_RATIO.value, "logp": ids.SURROGATE_LOGP.value}


@dataclass(frozen=True)
class KernelPlan:
    """What the kernels need of a config: compile-time branch ids and run-time numbers."""

    config: PolicyLossConfig
    token_constexprs: dict  # METHOD, DIVERGENCE, GATE, SURROGATE, BUDGET (the calibrated or fixed delta_b), MODE
    param_values: tuple  # the float32 `params` of the token kernel, in common.P_* order
    horizon: Optional[int]  # T_w of ids.HORIZON_ARG: an int length_mode, or None
    aux_size: int  # entries of aux: the backward scale and the method's metrics (ops/reduce.py)

    def __hash__(self):  # the config decides everything else
        return hash(self.config)

    def params(self, device: torch.device) -> torch.Tensor:
        """`param_values` as a float32 tensor on `device`, made once per (config, device)."""
        return _params(self, device)


@functools.lru_cache(maxsize=256)
def _params(plan: KernelPlan, device: torch.device) -> torch.Tensor:
    values = torch.tensor(plan.param_values, dtype=torch.float32)
    if device.type == "cuda":  # from pinned memory, asynchronously: a copy from pageable memory waits for the stream
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


@functools.lru_cache(maxsize=256)
def kernel_plan(config: PolicyLossConfig, given_divergence: bool = False) -> KernelPlan:
    """The plan of `config`; `given_divergence`: D is read from memory (the from-logits path)."""
    inf = float("inf")
    constexprs = dict(
        METHOD=METHOD_IDS[config.method],
        DIVERGENCE=ids.DIV_GIVEN.value if given_divergence else DIVERGENCE_IDS[config.divergence],
        GATE=GATE_IDS[config.gate], SURROGATE=SURROGATE_IDS[config.surrogate],
        BUDGET=(ids.BUDGET_QUANTILE if config.calibrates_delta_b else ids.BUDGET_FIXED).value,
        MODE=LOSS_AGG_MODES.index(config.loss_agg_mode),
    )
    horizon = config.length_mode if isinstance(config.length_mode, int) else None
    values = {  # common.P_* -> value
        ids.P_DELTA: config.delta,
        ids.P_DELTA_LOW: config.delta_low_value,
        ids.P_DELTA_HIGH: config.delta_high_value,
        ids.P_W_MIN: config.w_min,
        ids.P_DELTA_B: config.delta_b,
        ids.P_QUANTILE: config.delta_b_quantile or 0.0,
        ids.P_QUANTILE_SCALE: config.delta_b_quantile_scale,
        ids.P_DELTA_B_HI: config.delta_b_max_mult * config.delta_b,
        ids.P_RATIO_CAP: config.ratio_cap,
        ids.P_LOG_RATIO_CLAMP: inf if config.log_ratio_clamp is None else config.log_ratio_clamp,
        ids.P_RATIO_LO: 1.0 - config.clip_ratio_low,
        ids.P_RATIO_HI: 1.0 + config.clip_ratio_high,
        ids.P_CLIP_C: inf if config.clip_ratio_c is None else config.clip_ratio_c,
        ids.P_HORIZON: horizon or 0,
    }
    param_values = tuple(float(value) for _, value in sorted((index.value, v) for index, v in values.items()))
    assert len(param_values) == ids.NUM_PARAMS.value
    return KernelPlan(config, constexprs, param_values, horizon, reduce.aux_size(config.method))


@functools.lru_cache(maxsize=1024)
def layout_constexprs(plan: KernelPlan, packed: bool, adv_per_seq: bool, given_horizon: bool, given_delta_b: bool,
                      block: int) -> dict:
    """Every keyword of the token kernel's launch: the plan's branch ids, those that depend on the layout (T_w's
    source, delta_b_i's), ADV_PER_SEQ, BLOCK positions per block and num_warps, merged once per combination. The
    kernel reads the rest of the layout from which pointers are None (mask, weights, D, cu_seqlens, shard).

    A shard of a longer sequence (docs/math.md section 8): `given_horizon` (T_w per sequence from
    `sequence_length`), `given_delta_b` (delta_b_i per sequence, which replaces the quantile).
    """
    config = plan.config
    cppo = config.method == "cppo"
    if cppo and given_horizon:
        horizon = ids.HORIZON_GIVEN
    elif cppo and config.length_mode == "padded":
        horizon = ids.HORIZON_MAX_LEN if packed else ids.HORIZON_WIDTH
    elif cppo and config.length_mode != "sequence":  # an int horizon
        horizon = ids.HORIZON_ARG
    else:
        horizon = ids.HORIZON_LAST
    budget = plan.token_constexprs["BUDGET"]
    if cppo and given_delta_b:
        budget = ids.BUDGET_GIVEN.value
    return dict(plan.token_constexprs, BUDGET=budget, HORIZON=horizon.value, ADV_PER_SEQ=adv_per_seq, BLOCK=block,
                num_warps=token.NUM_WARPS)


# every field of PolicyLossConfig in order, with the choices of those that hold a string (length_mode: an int
# horizon too)
_CONFIG_CHOICES = {"method": METHODS, "divergence": DIVERGENCES + LOGIT_DIVERGENCES, "length_mode": LENGTH_MODES,
                   "gate": GATES, "surrogate": SURROGATES, "loss_agg_mode": LOSS_AGG_MODES}
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(PolicyLossConfig))


def encode_config(config: PolicyLossConfig) -> list:
    """`config` as one exact list of floats, the custom ops' config argument: a choice as minus one minus its
    index, an int horizon as itself, a number as itself, None as -inf (no field holds an infinite number).
    Plain attribute reads and arithmetic, so Dynamo traces it, including a config built inside the compiled
    region (the values it tracks)."""
    numbers = []
    for name in _CONFIG_FIELDS:
        value = getattr(config, name)
        if value is None:  # -inf, not NaN: decode_config's cache needs keys equal to themselves
            numbers.append(-math.inf)
        elif isinstance(value, str):
            numbers.append(-1.0 - _CONFIG_CHOICES[name].index(value))
        else:
            numbers.append(float(value))
    return numbers


def decode_config(numbers) -> PolicyLossConfig:
    """Inverse of `encode_config`."""
    return _decode_config(tuple(numbers))


@functools.lru_cache(maxsize=256)
def _decode_config(numbers: tuple) -> PolicyLossConfig:
    fields = {}
    for name, value in zip(_CONFIG_FIELDS, numbers):
        if value == -math.inf:
            fields[name] = None
        elif value < 0 and name in _CONFIG_CHOICES:
            fields[name] = _CONFIG_CHOICES[name][int(-1.0 - value)]
        elif name == "length_mode":  # an int horizon
            fields[name] = int(value)
        else:
            fields[name] = value
    return PolicyLossConfig(**fields)
