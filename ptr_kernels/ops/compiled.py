"""The compiled path: the `torch.library` custom ops of `policy_loss` and `policy_loss_from_logits`, and the one
codec of what they carry.

Under `torch.compile` (`torch.compiler.is_compiling()`) the backends call `compiled_policy_loss` /
`compiled_policy_loss_from_logits` instead of the eager Functions of ops/autograd.py: the same runtime forwards
run inside the ops `ptr_kernels::policy_loss_fused` and `ptr_kernels::policy_loss_from_logits_fused`, whose fake
implementations let Dynamo trace around the kernels (`fullgraph=True` included) and whose registered backwards
are the ops `ptr_kernels::scale_grad` and `ptr_kernels::logits_backward`. A schema is short, since torch's
custom-op machinery costs host time per argument: the config as one list of floats (`encode_config`), the
numbers as another (`_encode_numbers`: Python floats never reach a launcher as float64), a normalizer given as
a tensor as an optional tensor argument.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from ..config import CHOICES, FIELDS, PolicyLossConfig
from . import reduce
from .plan import kernel_plan
from .runtime import contiguous, fused_forward, logits_backward, logits_loss_forward, scale_grad


# ---- the codec ----

def encode_config(config: PolicyLossConfig) -> list:
    """`config` as one exact list of floats, the custom ops' config argument: a choice as minus one minus its
    index, an int horizon as itself, a number as itself, None as -inf (no field holds an infinite number).
    Plain attribute reads and arithmetic, so Dynamo traces it, including a config built inside the compiled
    region (the values it tracks)."""
    numbers = []
    for name in FIELDS:
        value = getattr(config, name)
        if value is None:  # -inf, not NaN: decode_config's cache needs keys equal to themselves
            numbers.append(-math.inf)
        elif isinstance(value, str):
            numbers.append(-1.0 - CHOICES[name].index(value))
        else:
            numbers.append(float(value))
    return numbers


def decode_config(numbers) -> PolicyLossConfig:
    """Inverse of `encode_config`."""
    return _decode_config(tuple(numbers))


@functools.lru_cache(maxsize=256)
def _decode_config(numbers: tuple) -> PolicyLossConfig:
    fields = {}
    for name, value in zip(FIELDS, numbers):
        if value == -math.inf:
            fields[name] = None
        elif value < 0 and name in CHOICES:
            fields[name] = CHOICES[name][int(-1.0 - value)]
        elif name == "length_mode":  # an int horizon
            fields[name] = int(value)
        else:
            fields[name] = value
    return PolicyLossConfig(**fields)


def _encode_numbers(leading: list, loss_scale_factor, normalizers: tuple) -> tuple:
    """`(numbers, tensors)`: `leading` + [loss_scale_factor (0: none), dp_size, batch_num_tokens,
    global_batch_size] as floats (NaN: a normalizer absent or given as a tensor), and the three normalizers'
    tensors (None: absent or a number)."""
    tensors = [v if isinstance(v, torch.Tensor) else None for v in normalizers]
    numbers = leading + [float(loss_scale_factor or 0)] + [
        math.nan if v is None or isinstance(v, torch.Tensor) else float(v) for v in normalizers]
    return numbers, tensors


def _decode_numbers(numbers: list, tensors: tuple) -> tuple:
    """Inverse of `_encode_numbers`: `(*leading, loss_scale_factor, normalizers)`."""
    *leading, loss_scale_factor = numbers[:-len(tensors)]
    normalizers = tuple(t if t is not None else (None if math.isnan(n) else n)
                        for t, n in zip(tensors, numbers[-len(tensors):]))
    return (*leading, loss_scale_factor, normalizers)


# ---- policy_loss ----

@torch.library.custom_op("ptr_kernels::policy_loss_fused", mutates_args=())
def _policy_loss_op(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
    response_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    rollout_is_weights: Optional[torch.Tensor], dp_size_tensor: Optional[torch.Tensor],
    batch_num_tokens_tensor: Optional[torch.Tensor], global_batch_size_tensor: Optional[torch.Tensor],
    config: list[float], numbers: list[float], adv_per_seq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`runtime.fused_forward`: loss, aux and the per-token gradient (for the backward)."""
    loss_scale_factor, normalizers = _decode_numbers(
        numbers, (dp_size_tensor, batch_num_tokens_tensor, global_batch_size_tensor))
    return fused_forward(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, None,
                         plan=kernel_plan(decode_config(config)), adv_per_seq=adv_per_seq,
                         loss_scale_factor=loss_scale_factor, normalizers=normalizers)


@_policy_loss_op.register_fake
def _(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, dp_size_tensor,
      batch_num_tokens_tensor, global_batch_size_tensor, config, numbers, adv_per_seq):
    return (log_prob.new_empty((), dtype=torch.float32),
            log_prob.new_empty((reduce.aux_size(decode_config(config).method),), dtype=torch.float32),
            torch.empty_like(log_prob, dtype=torch.float32, memory_format=torch.contiguous_format))


@torch.library.custom_op("ptr_kernels::scale_grad", mutates_args=())
def _scale_grad_op(grad: torch.Tensor, upstream: torch.Tensor, aux: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad * upstream * aux[AUX_SCALE] in `dtype` (one launch)."""
    return scale_grad(grad, upstream, aux, dtype)


@_scale_grad_op.register_fake
def _(grad, upstream, aux, dtype):
    return torch.empty_like(grad, dtype=dtype, memory_format=torch.contiguous_format)


def _policy_loss_setup_context(ctx, inputs, output):
    _, aux, grad = output
    ctx.mark_non_differentiable(aux, grad)  # scale and metrics; the saved per-token gradient
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad, aux)
    ctx.grad_dtype = inputs[0].dtype
    ctx.num_inputs = len(inputs)


def _policy_loss_backward(ctx, grad_loss, grad_aux, grad_grad):
    grad, aux = ctx.saved_tensors
    log_prob_grad = None if grad_loss is None else _scale_grad_op(grad, grad_loss, aux, ctx.grad_dtype)
    return (log_prob_grad,) + (None,) * (ctx.num_inputs - 1)


_policy_loss_op.register_autograd(_policy_loss_backward, setup_context=_policy_loss_setup_context)


def compiled_policy_loss(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, *,
                         config: PolicyLossConfig, adv_per_seq: bool, loss_scale_factor, normalizers: tuple):
    """`(loss, aux)` of validated inputs through `ptr_kernels::policy_loss_fused`."""
    numbers, tensors = _encode_numbers([], loss_scale_factor, normalizers)
    loss, aux, _ = _policy_loss_op(log_prob, old_log_prob, advantages, response_mask, cu_seqlens,
                                   rollout_is_weights, *tensors, encode_config(config), numbers, adv_per_seq)
    return loss, aux


# ---- policy_loss_from_logits ----

@torch.library.custom_op("ptr_kernels::policy_loss_from_logits_fused", mutates_args=())
def _logits_loss_op(
    logits: torch.Tensor, input_ids: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
    response_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    rollout_is_weights: Optional[torch.Tensor], topk_ids: Optional[torch.Tensor],
    topk_log_probs: Optional[torch.Tensor], dp_size_tensor: Optional[torch.Tensor],
    batch_num_tokens_tensor: Optional[torch.Tensor], global_batch_size_tensor: Optional[torch.Tensor],
    config: list[float], numbers: list[float], adv_per_seq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`runtime.logits_loss_forward` (numbers: the temperature first): loss, aux, entropy_mean, and
    grad_log_prob and log_normalizer for the backward."""
    temperature, loss_scale_factor, normalizers = _decode_numbers(
        numbers, (dp_size_tensor, batch_num_tokens_tensor, global_batch_size_tensor))
    loss, aux, entropy, grad_log_prob, log_normalizer, *_ = logits_loss_forward(
        logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids,
        topk_log_probs, plan=kernel_plan(decode_config(config)), temperature=temperature, adv_per_seq=adv_per_seq,
        loss_scale_factor=loss_scale_factor, normalizers=normalizers)
    return loss, aux, entropy, grad_log_prob, log_normalizer


@_logits_loss_op.register_fake
def _(logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids,
      topk_log_probs, dp_size_tensor, batch_num_tokens_tensor, global_batch_size_tensor, config, numbers,
      adv_per_seq):
    scalar = logits.new_empty((), dtype=torch.float32)
    per_token = logits.new_empty(logits.shape[:-1], dtype=torch.float32)
    aux = logits.new_empty((reduce.aux_size(decode_config(config).method),), dtype=torch.float32)
    return scalar, aux, torch.empty_like(scalar), per_token, torch.empty_like(per_token)


@torch.library.custom_op("ptr_kernels::logits_backward", mutates_args=())
def _logits_backward_op(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: Optional[torch.Tensor],
                        log_normalizer: torch.Tensor, grad_log_prob: torch.Tensor, upstream: torch.Tensor,
                        aux: torch.Tensor, temperature: float) -> torch.Tensor:
    """d loss / d logits in a new tensor like logits (one launch)."""
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return logits_backward(logits, input_ids.contiguous(), contiguous(response_mask), log_normalizer, grad_log_prob,
                           upstream, aux, temperature=temperature, out=out)


@_logits_backward_op.register_fake
def _(logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _logits_loss_setup_context(ctx, inputs, output):
    _, aux, entropy, grad_log_prob, log_normalizer = output
    ctx.mark_non_differentiable(aux, entropy, grad_log_prob, log_normalizer)
    ctx.set_materialize_grads(False)
    logits, input_ids, _, _, response_mask = inputs[:5]
    ctx.save_for_backward(logits, input_ids, response_mask, log_normalizer, grad_log_prob, aux)
    ctx.temperature = inputs[-2][0]  # numbers: the temperature first
    ctx.num_inputs = len(inputs)


def _logits_loss_backward(ctx, grad_loss, *unused):
    logits, input_ids, mask, log_normalizer, grad_log_prob, aux = ctx.saved_tensors
    grad = None
    if grad_loss is not None:
        grad = _logits_backward_op(logits, input_ids, mask, log_normalizer, grad_log_prob, grad_loss, aux,
                                   ctx.temperature)
    return (grad,) + (None,) * (ctx.num_inputs - 1)


_logits_loss_op.register_autograd(_logits_loss_backward, setup_context=_logits_loss_setup_context)


def compiled_policy_loss_from_logits(logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens,
                                     rollout_is_weights, topk_ids, topk_log_probs, *, config: PolicyLossConfig,
                                     temperature: float, adv_per_seq: bool, loss_scale_factor, normalizers: tuple):
    """`(loss, aux, entropy_mean)` of validated inputs through `ptr_kernels::policy_loss_from_logits_fused`."""
    numbers, tensors = _encode_numbers([float(temperature)], loss_scale_factor, normalizers)
    loss, aux, entropy, _, _ = _logits_loss_op(
        logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids,
        topk_log_probs, *tensors, encode_config(config), numbers, adv_per_seq)
    return loss, aux, entropy
