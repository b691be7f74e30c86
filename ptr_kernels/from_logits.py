"""Public API: `policy_loss_from_logits`, the policy loss with Top-K divergences, fused over the vocabulary."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .api import BACKENDS, NO_TRITON, triton_missing
from .carried_state import check_carried_state
from .config import LOGIT_DIVERGENCES, PolicyLossConfig, resolve_config
from .validation import FLOAT_DTYPES, Layout, check_inputs

INT_DTYPES = (torch.int32, torch.int64)
FLOAT32_TINY = torch.finfo(torch.float32).tiny


def policy_loss_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, old_log_prob: torch.Tensor,
                            advantages: torch.Tensor, response_mask: Optional[torch.Tensor] = None, *,
                            cu_seqlens: Optional[torch.Tensor] = None,
                            rollout_topk_ids: Optional[torch.Tensor] = None,
                            rollout_topk_log_probs: Optional[torch.Tensor] = None, temperature: float = 1.0,
                            config: Optional[PolicyLossConfig] = None, backend: str = "auto",
                            inplace_grad: bool = False, rollout_is_weights: Optional[torch.Tensor] = None,
                            dp_size=1, batch_num_tokens=None, global_batch_size=None,
                            initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                            position_offset: Optional[torch.Tensor] = None,
                            sequence_length: Optional[torch.Tensor] = None,
                            sequence_delta_b: Optional[torch.Tensor] = None, **overrides):
    """The policy loss of `policy_loss` with log pi(y_t) and the divergence computed from the logits.

    pi = softmax(logits / temperature); log_prob_t = log pi(y_t) is the only path of the gradient (D_t is a
    mask input). Divergences: `binary_tv`, `binary_kl` (docs/math.md section 2) and `topk_tv`, `topk_kl`
    (section 7: TopK_t union {y_t} plus an "other" bucket), every method and option of `policy_loss`.

    Args:
        logits: `[B, T, V]` (padded) or `[N, V]` (packed), float32 / bfloat16 / float16, the logits of the
            policy being trained at the positions that predict y_t. Rows may be strided (a slice such as
            `logits[:, :-1]` is read in place); the last dimension should be contiguous.
        input_ids: `[B, T]` / `[N]` int32 or int64: the sampled tokens y_t, in [0, V) at valid positions
            (masked positions may hold anything, e.g. -100).
        old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, dp_size, batch_num_tokens,
            global_batch_size, config, overrides: as in `policy_loss`.
        rollout_topk_ids: `[B, T, K]` / `[N, K]` int32 or int64, the rollout engine's top-K ids (distinct per
            valid position, in [0, V)); required with K >= 1 for a Top-K divergence, unused otherwise.
        rollout_topk_log_probs: same shape, float: their log-probs under mu (-inf: probability 0).
        temperature: the sampling temperature (finite, > 0).
        backend: "auto" (Triton kernels for CUDA tensors, reference elsewhere), "reference" or "triton".
        initial_state, output_final_state, position_offset, sequence_length, sequence_delta_b: a shard of a
            longer sequence (context parallelism), as in `policy_loss` (docs/math.md section 8).
        inplace_grad: (triton) write the logits' gradient into the logits buffer instead of a new tensor,
            saving V bytes per token in the backward. The logits are gone after `backward()`: their version
            counter is bumped, so a graph that saved them for its own backward raises instead of reading the
            gradient. Needs a contiguous last dimension. The reference ignores it.

    Returns:
        `(loss, metrics)`: the metrics of `policy_loss` plus `entropy`, the mean entropy of pi over the valid
        tokens; with `output_final_state` also the carried state after the shard `[S, 3]`. Bad options or
        inputs raise ValueError naming the argument; on an accelerator the values of
        ids are checked without a host sync (an asynchronous device assert), and the kernels poison a bad id
        with NaN.
    """
    config = resolve_config(config, overrides)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: expected one of {', '.join(map(repr, BACKENDS))}")
    layout = check_logits_inputs(logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens,
                                 rollout_topk_ids, rollout_topk_log_probs, temperature, config, inplace_grad,
                                 rollout_is_weights, dp_size, batch_num_tokens, global_batch_size,
                                 values_in_kernel=backend != "reference")
    check_carried_state(layout.num_seqs, logits.device,
                        calibrated=config.calibrates_delta_b,
                        initial_state=initial_state, position_offset=position_offset,
                        sequence_length=sequence_length, sequence_delta_b=sequence_delta_b)
    if backend == "auto":
        backend = "triton" if logits.is_cuda else "reference"
    kwargs = dict(cu_seqlens=cu_seqlens, rollout_topk_ids=rollout_topk_ids,
                  rollout_topk_log_probs=rollout_topk_log_probs, temperature=temperature, config=config,
                  rollout_is_weights=rollout_is_weights, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                  global_batch_size=global_batch_size, initial_state=initial_state,
                  output_final_state=output_final_state, position_offset=position_offset,
                  sequence_length=sequence_length, sequence_delta_b=sequence_delta_b)
    if backend == "reference":
        from .reference.logits import policy_loss_from_logits_reference
        return policy_loss_from_logits_reference(logits, input_ids, old_log_prob, advantages, response_mask,
                                                 **kwargs)
    try:
        from .ops.from_logits import triton_policy_loss_from_logits  # imports triton: TRITON_INTERPRET is set by now
    except ImportError as error:
        if not triton_missing(error):
            raise
        raise RuntimeError(NO_TRITON) from error
    return triton_policy_loss_from_logits(logits, input_ids, old_log_prob, advantages, response_mask,
                                          layout=layout, inplace_grad=inplace_grad, **kwargs)


def check_per_token_rows(name: str, value, width: str, cu_seqlens) -> None:
    """`value` is a float tensor of a row of `width` per token: `[B, T, width]` padded, `[N, width]` packed."""
    if not isinstance(value, torch.Tensor) or value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got "
                         f"{getattr(value, 'dtype', type(value).__name__)}")
    expected_dim = 2 if cu_seqlens is not None else 3
    if value.dim() != expected_dim or value.shape[-1] < 1:
        raise ValueError(f"{name} has shape {tuple(value.shape)}: expected "
                         + (f"[N, {width}] (packed, with cu_seqlens)" if cu_seqlens is not None else
                            f"[B, T, {width}] (padded; packed [N, {width}] input needs cu_seqlens)")
                         + f" with {width} >= 1")


def check_logits_inputs(logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, topk_ids,
                        topk_log_probs, temperature, config: PolicyLossConfig, inplace_grad: bool,
                        rollout_is_weights, dp_size, batch_num_tokens, global_batch_size, *,
                        values_in_kernel: bool, source: str = "logits") -> Layout:
    """Validate the from-logits inputs (ValueError naming the argument); returns the token layout.

    Shapes, dtypes, devices and the temperature always; the values of ids (range, repeats) at valid positions
    eagerly on the CPU, with an asynchronous device assert elsewhere (never a host sync). `source`: the
    argument the messages name as the tensor the token shape and device come from.
    """
    check_per_token_rows("logits", logits, "V", cu_seqlens)
    if inplace_grad and logits.stride(-1) != 1:
        raise ValueError("inplace_grad=True needs logits with a contiguous last dimension (stride 1)")
    token_shape, vocab = tuple(logits.shape[:-1]), logits.shape[-1]
    _check_ids("input_ids", input_ids, token_shape, logits.device, source)
    if not isinstance(old_log_prob, torch.Tensor) or tuple(old_log_prob.shape) != token_shape:
        raise ValueError(f"old_log_prob has shape {tuple(getattr(old_log_prob, 'shape', ()))}, expected "
                         f"{token_shape} = {source}.shape[:-1]")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature < FLOAT32_TINY:
        raise ValueError(f"temperature={temperature!r} is invalid: expected a finite number >= {FLOAT32_TINY:.3g} "
                         "(float32's smallest normal number: logits / temperature is computed in float32)")
    # the token-level checks (mask, advantages, cu_seqlens, weights, normalizers) on old_log_prob's shape
    layout = check_inputs(old_log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                          dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                          cu_seqlens_values_in_kernel=values_in_kernel)
    if old_log_prob.device != logits.device:
        raise ValueError(f"old_log_prob is on {old_log_prob.device} but {source} is on {logits.device}")

    valid = None if response_mask is None else response_mask != 0
    _require(valid, (input_ids < 0) | (input_ids >= vocab), f"input_ids must lie in [0, V = {vocab}) at valid "
             "positions")
    topk = config.divergence in LOGIT_DIVERGENCES
    if topk and (topk_ids is None or topk_log_probs is None):
        raise ValueError(f"divergence={config.divergence!r} needs rollout_topk_ids and rollout_topk_log_probs "
                         "(the rollout engine's top-K ids and their log-probs under mu)")
    if topk_ids is None and topk_log_probs is None:
        return layout
    if (topk_ids is None) != (topk_log_probs is None):
        raise ValueError("rollout_topk_ids and rollout_topk_log_probs come together: got only one of them")
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != len(token_shape) + 1 \
            or tuple(topk_ids.shape[:-1]) != token_shape:
        raise ValueError(f"rollout_topk_ids has shape {tuple(getattr(topk_ids, 'shape', ()))}, expected "
                         f"{token_shape + ('K',)}")
    _check_ids("rollout_topk_ids", topk_ids, tuple(topk_ids.shape), logits.device, source)
    if not isinstance(topk_log_probs, torch.Tensor) or topk_log_probs.dtype not in FLOAT_DTYPES:
        raise ValueError("rollout_topk_log_probs must be a float tensor")
    if topk_log_probs.shape != topk_ids.shape or topk_log_probs.device != logits.device:
        raise ValueError(f"rollout_topk_log_probs has shape {tuple(topk_log_probs.shape)} on "
                         f"{topk_log_probs.device}, expected rollout_topk_ids' {tuple(topk_ids.shape)} on "
                         f"{logits.device}")
    num_k = topk_ids.shape[-1]
    if topk and num_k == 0:
        raise ValueError(f"rollout_topk_ids has K = 0 ids per token: divergence={config.divergence!r} needs K >= 1")
    if topk:  # only the Top-K divergences read them
        row_valid = None if valid is None else valid[..., None]
        _require(row_valid, (topk_ids < 0) | (topk_ids >= vocab),
                 f"rollout_topk_ids must lie in [0, V = {vocab}) at valid positions")
        ordered = topk_ids.sort(dim=-1).values
        _require(valid, (ordered[..., 1:] == ordered[..., :-1]).any(-1),
                 "rollout_topk_ids must be distinct within each valid position's row")
    return layout


def _check_ids(name: str, ids, shape: tuple, device: torch.device, source: str) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in INT_DTYPES:
        raise ValueError(f"{name} must be an int32 or int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}, expected {shape}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but {source} is on {device}")


def _require(valid: Optional[torch.Tensor], bad: torch.Tensor, message: str) -> None:
    """ValueError(message) if `bad` holds anywhere `valid` (None: everywhere); on an accelerator or under
    torch.compile an asynchronous device assert instead (no host sync)."""
    if valid is not None:
        bad = bad & valid
    if bad.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), message)
    elif bad.any():
        raise ValueError(message)
