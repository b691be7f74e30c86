"""A `PolicyLossConfig` encoded for the kernels, once per config (cached), and its one list form.

`kernel_plan(config)` gives the token kernel's branch ids and float scalars, the reduction's mode and the
metric names; `layout_constexprs` adds what depends on the batch's layout. The custom op of the compiled path
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

from ..config import (DIVERGENCES, GATES, LENGTH_MODES, LOGIT_DIVERGENCES, LOSS_AGG_MODES, METHODS, SURROGATES,
                      PolicyLossConfig)
from . import common, reduce, token

METHOD_IDS = {"cppo": common.METHOD_CPPO.value, "dppo": common.METHOD_DPPO.value, "ppo": common.METHOD_PPO.value}
DIVERGENCE_IDS = {"binary_tv": common.DIV_BINARY_TV.value, "binary_kl": common.DIV_BINARY_KL.value}
GATE_IDS = {"hard": common.GATE_HARD.value, "soft": common.GATE_SOFT.value}
SURROGATE_IDS = {"ratio": common.SURROGATE_RATIO.value, "logp": common.SURROGATE_LOGP.value}


@dataclass(frozen=True)
class KernelPlan:
    """What the kernels need of a config: compile-time branch ids and run-time scalars."""

    config: PolicyLossConfig
    token_constexprs: dict  # METHOD, DIVERGENCE, GATE, SURROGATE, QUANTILE, PER_SEQ_MEAN
    token_scalars: tuple  # the token kernel's float arguments, in its order (delta ... clip_c)
    agg_mode: int  # index into LOSS_AGG_MODES (common.AGG_*)
    horizon: Optional[int]  # T_w of HORIZON_ARG: an int length_mode, or None for the padded width
    aux_size: int  # entries of aux: the backward scale and the method's metrics (ops/reduce.py)

    def __hash__(self):  # the config decides everything else
        return hash(self.config)


@functools.lru_cache(maxsize=256)
def kernel_plan(config: PolicyLossConfig, given_divergence: bool = False) -> KernelPlan:
    """The plan of `config`; `given_divergence`: D is read from memory (the from-logits path)."""
    inf = float("inf")
    constexprs = dict(
        METHOD=METHOD_IDS[config.method],
        DIVERGENCE=common.DIV_GIVEN.value if given_divergence else DIVERGENCE_IDS[config.divergence],
        GATE=GATE_IDS[config.gate], SURROGATE=SURROGATE_IDS[config.surrogate],
        QUANTILE=config.calibrates_delta_b,
        PER_SEQ_MEAN=config.loss_agg_mode == "seq-mean-token-mean",
    )
    scalars = (
        float(config.delta), float(config.delta_low_value), float(config.delta_high_value), float(config.w_min),
        float(config.delta_b), float(config.delta_b_quantile or 0.0), float(config.delta_b_quantile_scale),
        float(config.delta_b_max_mult * config.delta_b), float(config.ratio_cap),
        inf if config.log_ratio_clamp is None else float(config.log_ratio_clamp),
        1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high,
        inf if config.clip_ratio_c is None else float(config.clip_ratio_c),
    )
    horizon = config.length_mode if isinstance(config.length_mode, int) else None
    return KernelPlan(config, constexprs, scalars, LOSS_AGG_MODES.index(config.loss_agg_mode), horizon,
                      reduce.aux_size(config.method))


@functools.lru_cache(maxsize=1024)
def layout_constexprs(plan: KernelPlan, packed: bool, has_mask: bool, has_rw: bool, adv_per_seq: bool,
                      has_state: bool, given_horizon: bool, given_delta_b: bool, block: int) -> dict:
    """Every keyword of the token kernel's launch but the reduction's (MODE, DP, TOKENS, SEQS): the
    plan's branch ids, those that depend on the layout (T_w's source, whether pass A runs, the inputs present),
    and the tiling (BLOCK positions per block, ROWS sequences per program, num_warps), merged once per
    combination.

    A shard of a longer sequence (docs/math.md section 8): `has_state` (carried state and position offset),
    `given_horizon` (T_w per sequence from `sequence_length`), `given_delta_b` (delta_b_i per sequence, which
    replaces the quantile: QUANTILE is then overridden to False).
    """
    config = plan.config
    cppo = config.method == "cppo"
    calibrate = plan.token_constexprs["QUANTILE"] and not given_delta_b
    if cppo and given_horizon:
        horizon = common.HORIZON_GIVEN.value
    elif cppo and config.length_mode == "padded" and packed:
        horizon = common.HORIZON_MAX_LEN.value
    elif cppo and config.length_mode != "sequence":  # "padded" (the row width) or an int horizon
        horizon = common.HORIZON_ARG.value
    else:
        horizon = common.HORIZON_LAST.value
    needs_counts = plan.token_constexprs["PER_SEQ_MEAN"] or (cppo and horizon == common.HORIZON_LAST.value)
    scan_first = calibrate or (has_mask and needs_counts)
    return dict(plan.token_constexprs, QUANTILE=calibrate, HORIZON=horizon, SCAN_FIRST=scan_first, PACKED=packed,
                HAS_MASK=has_mask, HAS_RW=has_rw, ADV_PER_SEQ=adv_per_seq, HAS_STATE=has_state,
                DELTA_B_GIVEN=given_delta_b and cppo, ROWS=max(token.TILE // block, 1), BLOCK=block,
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
