"""A `PolicyLossConfig` encoded for the kernels, once per config (cached).

`kernel_plan(config)` gives the token kernel's branch ids (the aggregation mode included), the logits kernel's
and its float32 `params` (made once per device); `token_launch` adds what depends on the batch's layout.
The compiled path (ops/compiled.py) decodes its config into the same plan, so both paths launch from it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..config import PolicyLossConfig
from . import chunks, ids, reduce, token

# each config choice's branch id in the kernels
METHOD_IDS = {"cppo": ids.METHOD_CPPO.value, "dppo": ids.METHOD_DPPO.value, "ppo": ids.METHOD_PPO.value}
# the Top-K divergences reach the token kernel as D given: the logits kernel computes them (TOPK_IDS)
DIVERGENCE_IDS = {"binary_tv": ids.DIV_BINARY_TV.value, "binary_kl": ids.DIV_BINARY_KL.value,
                  "topk_tv": ids.DIV_GIVEN.value, "topk_kl": ids.DIV_GIVEN.value}
TOPK_IDS = {"binary_tv": ids.TOPK_NONE.value, "binary_kl": ids.TOPK_NONE.value,
            "topk_tv": ids.TOPK_TV.value, "topk_kl": ids.TOPK_KL.value}
GATE_IDS = {"hard": ids.GATE_HARD.value, "soft": ids.GATE_SOFT.value}
SURROGATE_IDS = {"ratio": ids.SURROGATE_RATIO.value, "logp": ids.SURROGATE_LOGP.value}
AGG_IDS = {"token-mean": ids.AGG_TOKEN_MEAN.value, "token-sum": ids.AGG_TOKEN_SUM.value,
           "seq-mean-token-sum": ids.AGG_SEQ_MEAN_TOKEN_SUM.value,
           "seq-mean-token-mean": ids.AGG_SEQ_MEAN_TOKEN_MEAN.value,
           "seq-mean-token-sum-norm": ids.AGG_SEQ_MEAN_TOKEN_SUM_NORM.value}


@dataclass(frozen=True)
class KernelPlan:
    """What the kernels need of a config: compile-time branch ids and run-time numbers."""

    config: PolicyLossConfig
    token_constexprs: dict  # METHOD, DIVERGENCE, GATE, SURROGATE, BUDGET (the calibrated or fixed delta_b), MODE
    param_values: tuple  # the float32 `params` of the token kernel, in ids.P_* order
    aux_size: int  # entries of aux: the backward scale and the method's metrics (ops/reduce.py)
    topk: int  # the logits kernel's TOPK: which Top-K divergence it computes, or none

    def __hash__(self):  # the config decides everything else; hashed once: the plan keys two caches per call
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
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
def kernel_plan(config: PolicyLossConfig) -> KernelPlan:
    """The plan of `config`."""
    inf = float("inf")
    constexprs = dict(
        METHOD=METHOD_IDS[config.method], DIVERGENCE=DIVERGENCE_IDS[config.divergence],
        GATE=GATE_IDS[config.gate], SURROGATE=SURROGATE_IDS[config.surrogate],
        BUDGET=(ids.BUDGET_QUANTILE if config.calibrates_delta_b else ids.BUDGET_FIXED).value,
        MODE=AGG_IDS[config.loss_agg_mode],
    )
    values = {  # ids.P_* -> value
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
        ids.P_HORIZON: config.length_mode if isinstance(config.length_mode, int) else 0,  # HORIZON_ARG's T_w
    }
    param_values = tuple(float(value) for _, value in sorted((index.value, v) for index, v in values.items()))
    assert len(param_values) == ids.NUM_PARAMS.value
    return KernelPlan(config, constexprs, param_values, reduce.aux_size(config.method),
                      TOPK_IDS[config.divergence])


class TokenLaunch(NamedTuple):
    """What a token-kernel launch takes beyond the plan, once per combination of the layout's options."""

    constexprs: dict  # every keyword of the launch
    prepass: bool  # whether a long tile's chunks run a pre-pass stage before deciding (chunks.needs_prepass)


@functools.lru_cache(maxsize=1024)
def token_launch(plan: KernelPlan, packed: bool, adv_per_seq: bool, has_mask: bool, given_horizon: bool,
                 given_delta_b: bool, block: int) -> TokenLaunch:
    """Every keyword of the token kernel's launch: the plan's branch ids, those that depend on the layout (T_w's
    source, delta_b_i's), ADV_PER_SEQ, BLOCK positions per block and num_warps, merged once per combination; and
    whether those need the pre-pass (a host call of `chunks.needs_prepass` costs microseconds). The kernel reads
    the rest of the layout from which pointers are None (mask, weights, D, cu_seqlens, shard).

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
    constexprs = dict(plan.token_constexprs, BUDGET=budget, HORIZON=horizon.value, ADV_PER_SEQ=adv_per_seq,
                      BLOCK=block, num_warps=token.NUM_WARPS)
    prepass = chunks.needs_prepass(constexprs["METHOD"], budget, horizon.value, constexprs["MODE"], has_mask)
    return TokenLaunch(constexprs, prepass)
