"""Public API: `policy_loss` (functional) and `PolicyLoss` (nn.Module); what every entry point shares: the backend's
choice and the kernels' import."""

from __future__ import annotations

from typing import Optional

import torch

from .carried_state import CarriedState
from .config import DEFAULT_CONFIG, LOGIT_DIVERGENCES, PolicyLossConfig, resolve_config
from .reference.tokens import reference_policy_loss
from .validation import check_inputs

BACKENDS = ("auto", "reference", "triton")


def policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                response_mask: Optional[torch.Tensor] = None, *, cu_seqlens: Optional[torch.Tensor] = None,
                config: Optional[PolicyLossConfig] = None, backend: str = "auto",
                rollout_is_weights: Optional[torch.Tensor] = None, dp_size: int = 1,
                batch_num_tokens=None, global_batch_size=None, initial_state: Optional[torch.Tensor] = None,
                output_final_state: bool = False, position_offset: Optional[torch.Tensor] = None,
                sequence_length: Optional[torch.Tensor] = None, sequence_delta_b: Optional[torch.Tensor] = None,
                **overrides):
    """Position-dependent trust-region policy loss (CPPO, DPPO, PPO clip) and its metrics.

    Args:
        log_prob: `[B, T]` (padded) or `[N]` (packed) log pi(y_t | s_t) of the policy being trained; the
            only input that receives a gradient (in its dtype): `old_log_prob`, `advantages` and
            `rollout_is_weights` get None on every backend, even when they require grad.
        old_log_prob: same shape, log mu(y_t | s_t) of the rollout policy (the anchor).
        advantages: `[B, T]` or `[B]` (padded); `[N]` or `[S]` (packed).
        response_mask: `[B, T]` or `[N]`, bool, int or float; nonzero = valid (a float mask is not a weight:
            0.5 counts as a whole valid token); None means every position is valid. Whatever a masked
            position holds never reaches the result; a NaN or +-inf at a valid position in any input gives
            a NaN loss (docs/math.md).
        cu_seqlens: `[S + 1]` int32/int64 offsets of packed sequences (FlashAttention convention).
        config: a `PolicyLossConfig`; keyword `overrides` replace its fields (`method="dppo", delta=0.2`).
        backend: "auto" (Triton kernel for CUDA tensors, reference on CPU), "reference" or "triton".
        rollout_is_weights: optional per-token factor on the loss (no gradient), shape of log_prob.
        dp_size, batch_num_tokens, global_batch_size: verl's global normalizers (docs/math.md): numbers
            (within float32's range; a count of 0 while the batch has valid tokens is a ValueError) or
            one-element tensors on the inputs' device (not checked: that would be a host sync).
        initial_state: `[S, 3]` float, the carried state of each sequence at the start of this shard when the
            inputs are shards of longer sequences (context parallelism, docs/math.md section 8): columns
            (sum w (delta_b_i - D), S = sum w D, W = sum w) over the earlier shards' valid tokens; None = zeros.
            `ptr_kernels.distributed.cp_policy_loss` computes it and the three below across ranks.
        output_final_state: also return the state after this shard, `[S, 3]` in the loss's dtype.
        position_offset: `[S]` int, the global position (0-based) of each shard's first position; None = 0.
        sequence_length: `[S]` int, T_w of each whole sequence (replaces `length_mode`); None = from the shard.
        sequence_delta_b: `[S]` float, delta_b_i of each whole sequence (replaces the fixed or calibrated
            budget; the config field `delta_b` keeps its meaning).
            These four matter for cppo only (dppo and ppo pass the state through); the aggregation stays
            this call's: give the whole batch's counts as `batch_num_tokens` / `global_batch_size`.

    Returns:
        `(loss, metrics)`: a 0-dim loss and a dict of 0-dim metric tensors on the input's device;
        `(loss, metrics, final_state)` with `output_final_state`.
    """
    if config is None and not overrides:
        config = DEFAULT_CONFIG
    elif overrides or not isinstance(config, PolicyLossConfig):  # a given config was validated when built
        config = resolve_config(config, overrides)
    carried = CarriedState(initial_state, position_offset, sequence_length, sequence_delta_b, output_final_state)
    return run_policy_loss(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                           (dp_size, batch_num_tokens, global_batch_size), carried, config, backend)


def run_policy_loss(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                    normalizers: tuple, carried: CarriedState, config: PolicyLossConfig, backend: str):
    """`policy_loss` with its keywords gathered (`normalizers` = (dp_size, batch_num_tokens, global_batch_size),
    the carried state as one value) and a validated config: the inputs validated once, then the backend."""
    if config.divergence in LOGIT_DIVERGENCES:
        raise ValueError(f"divergence={config.divergence!r} needs logits: use policy_loss_from_logits")
    backend = resolve_backend(backend, log_prob)
    layout = check_inputs(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                          normalizers, config=config, carried=carried,
                          cu_seqlens_values_in_kernel=backend == "triton")
    run = reference_policy_loss if backend == "reference" else triton_backend().triton_policy_loss
    return run(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, config=config,
               layout=layout, normalizers=normalizers, carried=carried)


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """"reference" or "triton": "auto" picks the kernels for CUDA tensors; an unknown name is a ValueError."""
    if backend == "auto":
        return "triton" if tensor.is_cuda else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: expected one of {', '.join(map(repr, BACKENDS))}")
    return backend


def triton_backend():
    """`ptr_kernels.ops.backend`, the kernels' side of every entry point. Imported on first use, so that importing
    ptr_kernels does not import triton (TRITON_INTERPRET must be set first), then kept: an import statement
    per call costs host time. Without triton (it exists for Linux only) backend="triton" raises the
    RuntimeError it raises wherever the kernels cannot run, e.g. on CPU tensors outside the Triton interpreter.
    (An import statement, not importlib: torch.compile traces this path.)"""
    global _triton_backend
    if _triton_backend is None:
        try:
            from .ops import backend
        except ImportError as error:
            if not triton_missing(error):
                raise
            raise RuntimeError(NO_TRITON) from error
        _triton_backend = backend
    return _triton_backend


_triton_backend = None
NO_TRITON = "backend='triton' needs the triton package, which is not installed (pip install triton, on Linux): " \
            "use backend='reference'"


def triton_missing(error: ImportError) -> bool:
    """Whether importing the kernels failed because triton is not installed."""
    return error.name is not None and error.name.split(".")[0] == "triton"


class PolicyLoss(torch.nn.Module):
    """`nn.Module` over `policy_loss` with a fixed config: `loss, metrics = PolicyLoss(cfg)(lp, old_lp, adv, mask)`."""

    def __init__(self, config: Optional[PolicyLossConfig] = None, backend: str = "auto", **overrides):
        super().__init__()
        self.config = resolve_config(config, overrides)
        self.backend = backend

    def forward(self, log_prob, old_log_prob, advantages, response_mask=None, **kwargs):
        fixed = sorted({"config", "backend"} & kwargs.keys())
        if fixed:
            raise ValueError(f"PolicyLoss fixes {', '.join(fixed)} at construction: PolicyLoss(config, backend=...), "
                             "or call policy_loss(...) directly")
        return policy_loss(log_prob, old_log_prob, advantages, response_mask, config=self.config,
                           backend=self.backend, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.config}, backend={self.backend!r}"
