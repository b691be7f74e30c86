"""The validation of every entry point's inputs, run once per call by the API before any backend, and the two
layouts (docs/math.md):

padded: `[B, T]` tensors, optional `response_mask [B, T]`, advantages `[B, T]` or `[B]`.
packed: `[N]` tensors with `cu_seqlens [S + 1]` (FlashAttention convention), optional mask `[N]`,
        advantages `[N]` or `[S]`.

Every check raises ValueError naming the argument, and none forces a host sync: values are read on the CPU,
and checked by an asynchronous device assert (or by the kernels) elsewhere.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import numpy as np
import torch

from .carried_state import NO_CARRIED_STATE, CarriedState
from .config import FLOAT32_MAX, LOGIT_DIVERGENCES, PolicyLossConfig  # FLOAT32_MAX: normalizers are float32

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)
NUMBER_TYPES = (int, float, np.integer, np.floating)  # what every backend computes with (numpy scalars included)
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest temperature: logits / temperature is float32


class Layout(NamedTuple):
    """What the checks learned about a batch (a NamedTuple: built on every call, cheaply)."""

    packed: bool
    num_seqs: int  # B (padded) or S (packed)
    width: Optional[int]  # T for padded input, None for packed
    adv_per_seq: bool  # advantages hold one value per sequence
    loss_scale_factor: Optional[float] = None  # seq-mean-token-sum-norm's divisor (config given), else None


def _check_device(name: str, t, device: torch.device, tokens_name: str = "log_prob") -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {tokens_name} is on {device}")


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_inputs(log_prob, old_log_prob, advantages, response_mask=None, cu_seqlens=None, rollout_is_weights=None,
                 normalizers: tuple = (1, None, None), *, config: Optional[PolicyLossConfig] = None,
                 carried: CarriedState = NO_CARRIED_STATE, cu_seqlens_values_in_kernel: bool = False) -> Layout:
    """Validate the token-level inputs of an entry point: shapes, dtypes, devices, the global normalizers
    (dp_size, batch_num_tokens, global_batch_size) and, with `config`, the carried state and loss_scale_factor's
    default; raise ValueError naming the argument. `log_prob` None: the from-logits path, where log pi(y_t)
    comes from the logits and `old_log_prob` gives the per-token shape and device.

    `cu_seqlens` values are checked eagerly on CPU; on an accelerator (and under torch.compile) they are
    checked with an asynchronous device assert, or, with `cu_seqlens_values_in_kernel`, by the token kernel
    itself (bad offsets give a NaN loss), so validation never forces a host sync. A normalizer given
    as a tensor is checked for shape, dtype and device only, for the same reason.
    """
    if log_prob is None:
        _check_float("old_log_prob", old_log_prob)
        tokens, tokens_name = old_log_prob, "old_log_prob"
    else:
        _check_float("log_prob", log_prob)
        _check_float("old_log_prob", old_log_prob)
        _check_device("old_log_prob", old_log_prob, log_prob.device)
        if old_log_prob.shape != log_prob.shape:
            raise ValueError(f"old_log_prob has shape {tuple(old_log_prob.shape)}, "
                             f"expected log_prob's {tuple(log_prob.shape)}")
        tokens, tokens_name = log_prob, "log_prob"
    dp_size, batch_num_tokens, global_batch_size = normalizers
    _check_float("advantages", advantages)
    device = tokens.device
    _check_normalizer("dp_size", dp_size, device, tokens_name, optional=False, positive=True)
    _check_normalizer("batch_num_tokens", batch_num_tokens, device, tokens_name)
    _check_normalizer("global_batch_size", global_batch_size, device, tokens_name)
    for name, t in (("advantages", advantages), ("response_mask", response_mask), ("cu_seqlens", cu_seqlens),
                    ("rollout_is_weights", rollout_is_weights)):
        if t is not None:
            _check_device(name, t, device, tokens_name)
    if response_mask is not None:
        if response_mask.shape != tokens.shape and cu_seqlens is not None:
            raise ValueError(f"response_mask has shape {tuple(response_mask.shape)}, but cu_seqlens makes the "
                             f"input packed, {tokens_name} {tuple(tokens.shape)}: give one layout, padded [B, T] "
                             "with response_mask, or packed [N] with cu_seqlens (and response_mask [N] only for "
                             "holes inside the sequences)")
        if response_mask.shape != tokens.shape:
            raise ValueError(f"response_mask has shape {tuple(response_mask.shape)}, "
                             f"expected {tokens_name}'s {tuple(tokens.shape)}")
        _check_mask_dtype(response_mask)
    if rollout_is_weights is not None:
        _check_float("rollout_is_weights", rollout_is_weights)
        if rollout_is_weights.shape != tokens.shape:
            raise ValueError(f"rollout_is_weights has shape {tuple(rollout_is_weights.shape)}, "
                             f"expected {tokens_name}'s {tuple(tokens.shape)}")
    _check_zero_counts(tokens, response_mask, batch_num_tokens, global_batch_size)

    if cu_seqlens is None:
        if tokens.dim() != 2:
            raise ValueError(f"{tokens_name} has shape {tuple(tokens.shape)}: padded input is [B, T]; "
                             "1-D packed input [N] needs cu_seqlens")
        B, T = tokens.shape
        if advantages.shape != (B, T) and advantages.shape != (B,):  # not `in`: Dynamo misreads it on symbolic sizes
            raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [B, T] = {(B, T)} "
                             f"or [B] = {(B,)}")
        packed, num_seqs, width, adv_per_seq = False, B, T, advantages.dim() == 1
    else:
        if tokens.dim() != 1:
            raise ValueError(f"{tokens_name} has shape {tuple(tokens.shape)}: with cu_seqlens the input is packed "
                             "[N]; padded [B, T] input takes response_mask instead of cu_seqlens")
        _check_offsets_tensor(cu_seqlens)
        N = tokens.shape[0]
        S = cu_seqlens.numel() - 1
        if advantages.shape != (N,) and advantages.shape != (S,):
            raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [N] = {(N,)} or "
                             f"[S] = {(S,)}")
        if not cu_seqlens_values_in_kernel or (cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling()):
            check_cu_seqlens(cu_seqlens, N)  # the token kernel checks them itself, without a launch or a sync
        # N == S is ambiguous; per-token is what a [N] tensor means everywhere else.
        packed, num_seqs, width, adv_per_seq = True, S, None, advantages.shape == (S,) and N != S
    loss_scale_factor = None
    if config is not None:
        if carried.given:
            carried.check(num_seqs, device, calibrated=config.calibrates_delta_b)
        loss_scale_factor = resolve_loss_scale_factor(config.loss_agg_mode, config.loss_scale_factor, width)
    return Layout(packed, num_seqs, width, adv_per_seq, loss_scale_factor)


def resolve_loss_scale_factor(loss_agg_mode: str, loss_scale_factor, width):
    """The divisor of `seq-mean-token-sum-norm` (None for the other modes): the configured one, else `width`, the
    padded width T; packed input (`width` None) has no width to default to, so there it must be configured."""
    if loss_scale_factor is not None or loss_agg_mode != "seq-mean-token-sum-norm":
        return loss_scale_factor
    if width is None:
        raise ValueError("loss_scale_factor is required for loss_agg_mode='seq-mean-token-sum-norm' "
                         "with packed input (there is no padded width to default to)")
    return width


def _check_normalizer(name: str, value, device: torch.device, tokens_name: str, *, optional: bool = True,
                      positive: bool = False) -> None:
    """A global normalizer: None (if optional), a finite number (> 0 or >= 0), or a one-element real tensor on
    the inputs' device."""
    if value is None and optional:
        return
    if type(value) is int and (1 if positive else 0) <= value <= FLOAT32_MAX:  # the common case, decided fast
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a number or a one-element real tensor, got a {value.dtype} tensor "
                             f"of shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but {tokens_name} is on {device}")
        return
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, NUMBER_TYPES) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0) or value > FLOAT32_MAX:
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number {bound} within float32's range"
                         + (", a one-element tensor or None" if optional else " or a one-element tensor"))


def _check_zero_counts(tokens, response_mask, batch_num_tokens, global_batch_size) -> None:
    """A global count given as the number 0 while this batch has a valid token cannot be right (it counts this
    batch's tokens and non-empty sequences too; a valid token always lies in a non-empty sequence): ValueError
    naming it. Checked eagerly on CPU; on an accelerator (and under torch.compile) with an asynchronous device
    assert, so never a host sync. Counts given as tensors are not checked: reading them would be a sync."""
    for name, value in (("batch_num_tokens", batch_num_tokens), ("global_batch_size", global_batch_size)):
        if value is not None and not isinstance(value, torch.Tensor) and value == 0:
            break
    else:
        return
    message = (f"{name}=0 but the batch has valid tokens: a global count includes this batch's own "
               "tokens and sequences")
    if response_mask is None:  # every position is valid: known on the host
        if tokens.numel():
            raise ValueError(message)
        return
    no_valid = (response_mask == 0).all()
    if response_mask.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(no_valid, message)
    elif not no_valid:
        raise ValueError(message)


def check_cu_seqlens(cu_seqlens: torch.Tensor, N) -> None:
    """cu_seqlens starts at 0, never decreases and ends at N: ValueError on the CPU, an asynchronous device assert
    on an accelerator or under torch.compile (no host sync)."""
    if cu_seqlens.device.type != "cpu" or torch.compiler.is_compiling():  # no host sync, no graph break
        first_ok = cu_seqlens[0] == 0
        sorted_ok = (cu_seqlens[1:] >= cu_seqlens[:-1]).all()
        last_ok = cu_seqlens[-1] == N
        torch._assert_async(first_ok & sorted_ok & last_ok,
                            "cu_seqlens must start at 0, be non-decreasing and end at N")
        return
    if cu_seqlens.numel() > 256:  # many sequences: vectorized, one read
        if bool((cu_seqlens[0] == 0) & (cu_seqlens[1:] >= cu_seqlens[:-1]).all() & (cu_seqlens[-1] == N)):
            return
    # a few sequences (or an error to name): Python ints, cheaper than a handful of small tensor ops
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError("cu_seqlens must be non-decreasing")
    if offsets[-1] != N:
        raise ValueError(f"cu_seqlens must end at N = {N} (the packed length), got {offsets[-1]}")


def _check_mask_dtype(response_mask: torch.Tensor) -> None:
    if response_mask.is_complex():
        raise ValueError(f"response_mask must be bool, integer or float (nonzero = valid), got {response_mask.dtype}")


def _check_offsets_tensor(cu_seqlens: torch.Tensor) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in INT_DTYPES:
        raise ValueError(f"cu_seqlens must be a 1-D int32 or int64 tensor [S + 1], got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")


def check_count_inputs(response_mask, cu_seqlens) -> None:
    """The inputs of `distributed.global_counts`, as `policy_loss` checks them (ValueError naming the argument)."""
    for name, value in (("response_mask", response_mask), ("cu_seqlens", cu_seqlens)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if response_mask is not None:
        _check_mask_dtype(response_mask)
    if cu_seqlens is None:
        return
    _check_offsets_tensor(cu_seqlens)
    if response_mask is not None:
        if response_mask.dim() != 1:
            raise ValueError(f"response_mask has shape {tuple(response_mask.shape)}: with cu_seqlens it is packed [N]")
        if response_mask.device != cu_seqlens.device:
            raise ValueError(f"response_mask is on {response_mask.device} but cu_seqlens is on {cu_seqlens.device}")
        check_cu_seqlens(cu_seqlens, response_mask.shape[0])
    else:  # every packed token valid: N is the last offset
        check_cu_seqlens(cu_seqlens, cu_seqlens[-1])


# ---- the inputs of policy_loss_from_logits and policy_loss_from_hidden ----

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
                        rollout_is_weights, normalizers: tuple, *, carried: CarriedState = NO_CARRIED_STATE,
                        values_in_kernel: bool, source: str = "logits") -> Layout:
    """Validate the inputs of `policy_loss_from_logits` (ValueError naming the argument); returns the token layout.

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
    # the token-level checks (mask, advantages, cu_seqlens, weights, normalizers, carried state) on its shape
    layout = check_inputs(None, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, normalizers,
                          config=config, carried=carried, cu_seqlens_values_in_kernel=values_in_kernel)
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


def read_topk(config: PolicyLossConfig, topk_ids, topk_log_probs) -> tuple:
    """The top-K inputs as the backends take them: given only where a Top-K divergence reads them."""
    return (topk_ids, topk_log_probs) if config.divergence in LOGIT_DIVERGENCES else (None, None)


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


def check_hidden_inputs(hidden, weight, bias, input_ids, old_log_prob, advantages, response_mask, cu_seqlens,
                        topk_ids, topk_log_probs, temperature, config: PolicyLossConfig, chunk_size,
                        rollout_is_weights, normalizers: tuple, *, values_in_kernel: bool) -> Layout:
    """Validate the from-hidden inputs (ValueError naming the argument); returns the token layout.

    The head (hidden, weight, bias) and chunk_size here; the rest as `check_logits_inputs` does for logits of
    shape hidden.shape[:-1] + (V,), given as a one-element stand-in expanded to that shape (no memory).
    """
    check_per_token_rows("hidden", hidden, "H", cu_seqlens)
    size = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != size or weight.shape[0] < 1:
        raise ValueError(f"weight has shape {tuple(getattr(weight, 'shape', ()))}, expected [V, H = {size}] "
                         "with V >= 1 (the LM head as nn.Linear stores it)")
    _check_like_hidden("weight", weight, hidden)
    vocab = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias has shape {tuple(getattr(bias, 'shape', ()))}, expected [V = {vocab}]")
        _check_like_hidden("bias", bias, hidden)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: expected a positive int (tokens per chunk) "
                         "or None")
    logits_stand_in = hidden.new_empty(()).expand(*hidden.shape[:-1], vocab)
    return check_logits_inputs(logits_stand_in, input_ids, old_log_prob, advantages, response_mask, cu_seqlens,
                               topk_ids, topk_log_probs, temperature, config, False, rollout_is_weights,
                               normalizers, values_in_kernel=values_in_kernel, source="hidden")


def _check_like_hidden(name: str, t: torch.Tensor, hidden: torch.Tensor) -> None:
    if t.dtype != hidden.dtype:
        raise ValueError(f"{name} is {t.dtype} but hidden is {hidden.dtype}: the head's GEMM takes one dtype")
    if t.device != hidden.device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")


# ---- the two layouts as rows (the reference and the tests read packed input in rows) ----

def mask_as_bool(response_mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The mask as bool: nonzero = valid, for every dtype (a float mask is not a weight: 0.5 counts fully,
    and so do negative values and NaN); all-valid when None."""
    if response_mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    return response_mask if response_mask.dtype == torch.bool else response_mask != 0


def packed_to_rows(x: torch.Tensor, cu_seqlens: torch.Tensor, width: int, fill=0.0) -> torch.Tensor:
    """Scatter packed `[N, ...]` into rows `[S, width, ...]`; positions past a sequence's end hold `fill`."""
    S = cu_seqlens.numel() - 1
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    col = torch.arange(width, device=x.device)
    inside = col[None, :] < lengths[:, None]
    index = (starts[:, None] + col[None, :]).clamp(max=max(x.shape[0] - 1, 0))
    if x.shape[0] == 0:
        rows = torch.full((S, width) + x.shape[1:], fill, dtype=x.dtype, device=x.device)
        # + the (empty, exactly 0) sum keeps the rows in x's autograd graph: loss.backward() must work
        return rows + x.sum() if x.requires_grad else rows
    rows = x[index]
    inside = inside.view(inside.shape + (1,) * (x.dim() - 1))
    return torch.where(inside, rows, torch.full((), fill, dtype=x.dtype, device=x.device))


def max_seqlen(cu_seqlens: torch.Tensor) -> int:
    """Longest packed sequence (a host sync: used by the reference and by `length_mode="padded"`)."""
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
