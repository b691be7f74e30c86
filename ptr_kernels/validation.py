"""Input validation and the two layouts (docs/math.md).

padded: `[B, T]` tensors, optional `response_mask [B, T]`, advantages `[B, T]` or `[B]`.
packed: `[N]` tensors with `cu_seqlens [S + 1]` (FlashAttention convention), optional mask `[N]`,
        advantages `[N]` or `[S]`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from .config import FLOAT32_MAX  # normalizers are float32 numbers in every backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NUMBER_TYPES = (int, float, np.integer, np.floating)  # what every backend computes with (numpy scalars included)


class Layout(NamedTuple):
    """What `check_inputs` learned about a batch (a NamedTuple: built on every call, cheaply)."""

    packed: bool
    num_seqs: int  # B (padded) or S (packed)
    width: Optional[int]  # T for padded input, None for packed
    adv_per_seq: bool  # advantages hold one value per sequence


def _check_device(name: str, t, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but log_prob is on {device}")


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_inputs(log_prob, old_log_prob, advantages, response_mask=None, cu_seqlens=None,
                 rollout_is_weights=None, *, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                 cu_seqlens_values_in_kernel: bool = False) -> Layout:
    """Validate shapes, dtypes, devices and the global normalizers; raise ValueError naming the argument.

    `cu_seqlens` values are checked eagerly on CPU; on an accelerator (and under torch.compile) they are
    checked with an asynchronous device assert, or, with `cu_seqlens_values_in_kernel`, by the token kernel
    itself (bad offsets give a NaN loss), so validation never forces a host sync. A normalizer given
    as a tensor is checked for shape, dtype and device only, for the same reason.
    """
    _check_float("log_prob", log_prob)
    _check_float("old_log_prob", old_log_prob)
    _check_float("advantages", advantages)
    device = log_prob.device
    _check_normalizer("dp_size", dp_size, device, optional=False, positive=True)
    _check_normalizer("batch_num_tokens", batch_num_tokens, device)
    _check_normalizer("global_batch_size", global_batch_size, device)
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask),
                    ("cu_seqlens", cu_seqlens), ("rollout_is_weights", rollout_is_weights)):
        if t is not None:
            _check_device(name, t, device)
    if old_log_prob.shape != log_prob.shape:
        raise ValueError(f"old_log_prob has shape {tuple(old_log_prob.shape)}, "
                         f"expected log_prob's {tuple(log_prob.shape)}")
    if response_mask is not None:
        if response_mask.shape != log_prob.shape and cu_seqlens is not None:
            raise ValueError(f"response_mask has shape {tuple(response_mask.shape)}, but cu_seqlens makes the "
                             f"input packed, log_prob {tuple(log_prob.shape)}: give one layout, padded [B, T] with "
                             "response_mask, or packed [N] with cu_seqlens (and response_mask [N] only for holes "
                             "inside the sequences)")
        if response_mask.shape != log_prob.shape:
            raise ValueError(f"response_mask has shape {tuple(response_mask.shape)}, "
                             f"expected log_prob's {tuple(log_prob.shape)}")
        if response_mask.is_complex():
            raise ValueError(f"response_mask must be bool, integer or float (nonzero = valid), "
                             f"got {response_mask.dtype}")
    if rollout_is_weights is not None:
        _check_float("rollout_is_weights", rollout_is_weights)
        if rollout_is_weights.shape != log_prob.shape:
            raise ValueError(f"rollout_is_weights has shape {tuple(rollout_is_weights.shape)}, "
                             f"expected log_prob's {tuple(log_prob.shape)}")
    _check_zero_counts(log_prob, response_mask, batch_num_tokens=batch_num_tokens,
                       global_batch_size=global_batch_size)

    if cu_seqlens is None:
        if log_prob.dim() != 2:
            raise ValueError(f"log_prob has shape {tuple(log_prob.shape)}: padded input is [B, T]; "
                             "1-D packed input [N] needs cu_seqlens")
        B, T = log_prob.shape
        if advantages.shape != (B, T) and advantages.shape != (B,):  # not `in`: Dynamo misreads it on symbolic sizes
            raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [B, T] = {(B, T)} "
                             f"or [B] = {(B,)}")
        return Layout(False, B, T, advantages.dim() == 1)  # (packed, num_seqs, width, adv_per_seq)

    if log_prob.dim() != 1:
        raise ValueError(f"log_prob has shape {tuple(log_prob.shape)}: with cu_seqlens the input is packed "
                         "[N]; padded [B, T] input takes response_mask instead of cu_seqlens")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32 or int64 tensor [S + 1], got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    N = log_prob.shape[0]
    S = cu_seqlens.numel() - 1
    if advantages.shape != (N,) and advantages.shape != (S,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [N] = {(N,)} or [S] = {(S,)}")
    if not cu_seqlens_values_in_kernel or (cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling()):
        check_cu_seqlens(cu_seqlens, N)  # the token kernel checks them itself, without a launch or a sync
    # N == S is ambiguous; per-token is what a [N] tensor means everywhere else.
    return Layout(True, S, None, advantages.shape == (S,) and N != S)


def resolve_loss_scale_factor(loss_agg_mode: str, loss_scale_factor, layout: Layout):
    """The divisor of `seq-mean-token-sum-norm`: the configured one, else the padded width T; packed input has
    no width to default to, so there it must be configured (ValueError)."""
    if loss_scale_factor is not None or loss_agg_mode != "seq-mean-token-sum-norm":
        return loss_scale_factor
    if layout.packed:
        raise ValueError("loss_scale_factor is required for loss_agg_mode='seq-mean-token-sum-norm' "
                         "with packed input (there is no padded width to default to)")
    return layout.width


def _check_normalizer(name: str, value, device: torch.device, *, optional: bool = True,
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
            raise ValueError(f"{name} is on {value.device} but log_prob is on {device}")
        return
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, NUMBER_TYPES) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0) or value > FLOAT32_MAX:
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number {bound} within float32's range"
                         + (", a one-element tensor or None" if optional else " or a one-element tensor"))


def _check_zero_counts(log_prob, response_mask, **counts) -> None:
    """A global count given as the number 0 while this batch has a valid token cannot be right (it counts this
    batch's tokens and non-empty sequences too; a valid token always lies in a non-empty sequence): ValueError
    naming it. Checked eagerly on CPU; on an accelerator (and under torch.compile) with an asynchronous device
    assert, so never a host sync. Counts given as tensors are not checked: reading them would be a sync."""
    zero = [name for name, value in counts.items()
            if value is not None and not isinstance(value, torch.Tensor) and value == 0]
    if not zero:
        return
    message = (f"{zero[0]}=0 but the batch has valid tokens: a global count includes this batch's own "
               "tokens and sequences")
    if response_mask is None:  # every position is valid: known on the host
        if log_prob.numel():
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
