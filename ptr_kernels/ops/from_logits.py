"""The from-logits loss as an autograd operation: logits kernel -> token kernel -> reduction; backward into logits.

Forward, no host sync: `logits.logits_forward` (log pi(y_t), the Top-K D_t, entropy, log Z per token), then
`autograd.fused_forward` with D given (the token kernel's DIV_GIVEN branch: the same trust-region step as
`policy_loss`; for a binary divergence D is left to the token kernel, which computes it from that log pi(y_t)),
which also runs the reduction: three kernels, plus a few small torch ops for the entropy's masked mean (and, on
an accelerator, the asynchronous checks of the token ids). Backward, one launch: `logits.logits_backward` writes
d loss / d logits once, in the logits' dtype, into a new tensor or (`inplace_grad`) into the logits buffer.
Eager calls go through `FusedPolicyLossFromLogits`; under torch.compile the same `from_logits_forward` runs in
the custom op `ptr_kernels::policy_loss_from_logits_fused`, whose backward is the custom op
`ptr_kernels::logits_backward` (as `ops/autograd.py` does for the token path).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..config import LOGIT_DIVERGENCES
from ..validation import Layout, resolve_loss_scale_factor
from . import logits as logits_ops
from . import reduce
from .autograd import check_device, contiguous, finish, fused_forward
from .plan import decode_config, encode_config, kernel_plan


def _masked_mean(values: torch.Tensor, mask) -> torch.Tensor:
    """Mean of `values` (0 at masked positions) over the valid positions; 0 when there is none (no sync)."""
    if mask is None:
        return values.sum() / max(values.numel(), 1)
    count = (mask != 0).sum()
    return torch.where(count > 0, values.sum() / count.clamp(min=1), 0.0)


def from_logits_forward(logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                        topk_ids, topk_log_probs, *, plan, topk: int, temperature: float, adv_per_seq: bool,
                        loss_scale_factor: float, normalizers: tuple, shard: dict):
    """The forward's launches on validated inputs: `(loss, aux, entropy_mean, grad_log_prob, log_normalizer,
    input_ids, mask)` (+ `final_state` when `shard` asks for it); the last four (ids and mask made contiguous)
    feed the backward."""
    mask = contiguous(response_mask)  # bool, int or float: != 0 is valid, in every kernel
    input_ids = input_ids.contiguous()
    old_log_prob = old_log_prob.contiguous()
    per_token = logits_ops.logits_forward(logits, input_ids, mask, old_log_prob, contiguous(topk_ids),
                                          contiguous(topk_log_probs), temperature=temperature, topk=topk)
    loss, aux, grad_log_prob, *final_state = fused_forward(
        per_token.log_prob, old_log_prob, advantages, mask, cu_seqlens, rollout_is_weights, per_token.divergence,
        plan=plan, adv_per_seq=adv_per_seq, loss_scale_factor=loss_scale_factor, normalizers=normalizers, **shard)
    entropy = _masked_mean(per_token.entropy, mask)
    return (loss, aux, entropy, grad_log_prob, per_token.log_normalizer, input_ids, mask, *final_state)


class FusedPolicyLossFromLogits(torch.autograd.Function):
    """Eager path: `(loss, aux, entropy_mean)` of validated inputs; only `logits` gets a gradient."""

    @staticmethod
    def forward(ctx, logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                topk_ids, topk_log_probs, inplace_grad: bool, options: dict):
        loss, aux, entropy, grad_log_prob, log_normalizer, input_ids, mask, *final_state = from_logits_forward(
            logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids,
            topk_log_probs, **options)
        ctx.mark_non_differentiable(aux, entropy, *final_state)
        ctx.save_for_backward(logits, input_ids, mask, log_normalizer, grad_log_prob, aux)
        ctx.temperature = options["temperature"]
        ctx.inplace_grad = inplace_grad
        return (loss, aux, entropy, *final_state)

    @staticmethod
    @once_differentiable  # the backward is a kernel: a double backward raises instead of silently returning 0
    def backward(ctx, grad_loss, grad_aux, grad_entropy, *grad_final_state):
        logits, input_ids, mask, log_normalizer, grad_log_prob, aux = ctx.saved_tensors
        out = logits if ctx.inplace_grad else torch.empty_like(logits, memory_format=torch.contiguous_format)
        logits_ops.logits_backward(logits, input_ids, mask, log_normalizer, grad_log_prob, grad_loss, aux,
                                   temperature=ctx.temperature, out=out)
        if ctx.inplace_grad:
            # the buffer now holds the gradient: any saved use of the old logits must fail, not read it
            torch.autograd.graph.increment_version(logits)
        return (out,) + (None,) * 10


# ---- the compiled path: custom ops with a short schema (config and numbers as float lists), as ops/autograd ----

@torch.library.custom_op("ptr_kernels::policy_loss_from_logits_fused", mutates_args=())
def policy_loss_from_logits_fused(
    logits: torch.Tensor, input_ids: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
    response_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    rollout_is_weights: Optional[torch.Tensor], topk_ids: Optional[torch.Tensor],
    topk_log_probs: Optional[torch.Tensor], dp_size_tensor: Optional[torch.Tensor],
    batch_num_tokens_tensor: Optional[torch.Tensor], global_batch_size_tensor: Optional[torch.Tensor],
    config: list[float], numbers: list[float], adv_per_seq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`from_logits_forward` with the config as `encode_config` and `numbers` = (temperature,
    loss_scale_factor, dp_size, batch_num_tokens, global_batch_size; NaN: absent or a tensor argument).
    Returns loss, aux, entropy_mean, grad_log_prob and log_normalizer (the last two for the backward)."""
    temperature, loss_scale_factor, *values = numbers
    tensors = (dp_size_tensor, batch_num_tokens_tensor, global_batch_size_tensor)
    normalizers = tuple(t if t is not None else (None if math.isnan(n) else n) for t, n in zip(tensors, values))
    plan_config = decode_config(config)
    topk = plan_config.divergence in LOGIT_DIVERGENCES
    loss, aux, entropy, grad_log_prob, log_normalizer, *_ = from_logits_forward(
        logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids,
        topk_log_probs, plan=kernel_plan(plan_config, topk), topk=_topk_id(plan_config), temperature=temperature,
        adv_per_seq=adv_per_seq, loss_scale_factor=loss_scale_factor, normalizers=normalizers, shard={})
    return loss, aux, entropy, grad_log_prob, log_normalizer


@policy_loss_from_logits_fused.register_fake
def _(logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids,
      topk_log_probs, dp_size_tensor, batch_num_tokens_tensor, global_batch_size_tensor, config, numbers,
      adv_per_seq):
    scalar = logits.new_empty((), dtype=torch.float32)
    per_token = logits.new_empty(logits.shape[:-1], dtype=torch.float32)
    aux = logits.new_empty((reduce.aux_size(decode_config(config).method),), dtype=torch.float32)
    return scalar, aux, torch.empty_like(scalar), per_token, torch.empty_like(per_token)


@torch.library.custom_op("ptr_kernels::logits_backward", mutates_args=())
def logits_backward_op(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: Optional[torch.Tensor],
                       log_normalizer: torch.Tensor, grad_log_prob: torch.Tensor, upstream: torch.Tensor,
                       aux: torch.Tensor, temperature: float) -> torch.Tensor:
    """d loss / d logits in a new tensor like logits (one launch)."""
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return logits_ops.logits_backward(logits, input_ids.contiguous(), contiguous(response_mask), log_normalizer,
                                      grad_log_prob, upstream, aux, temperature=temperature, out=out)


@logits_backward_op.register_fake
def _(logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, aux, entropy, grad_log_prob, log_normalizer = output
    ctx.mark_non_differentiable(aux, entropy, grad_log_prob, log_normalizer)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(inputs[0], inputs[1], inputs[4], log_normalizer, grad_log_prob, aux)
    ctx.temperature = inputs[13][0]
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_loss, *unused):
    logits, input_ids, mask, log_normalizer, grad_log_prob, aux = ctx.saved_tensors
    grad = None
    if grad_loss is not None:
        grad = logits_backward_op(logits, input_ids, mask, log_normalizer, grad_log_prob, grad_loss, aux,
                                  ctx.temperature)
    return (grad,) + (None,) * (ctx.num_inputs - 1)


policy_loss_from_logits_fused.register_autograd(_backward, setup_context=_setup_context)


def _topk_id(config) -> int:
    """The logits kernel's TOPK branch id of `config.divergence`."""
    if config.divergence in LOGIT_DIVERGENCES:
        return logits_ops.TOPK_IDS[config.divergence]
    return logits_ops.TOPK_NONE.value


def triton_policy_loss_from_logits(logits, input_ids, old_log_prob, advantages, response_mask, *, layout: Layout,
                                   cu_seqlens, rollout_topk_ids, rollout_topk_log_probs, temperature: float, config,
                                   inplace_grad: bool, rollout_is_weights, dp_size, batch_num_tokens,
                                   global_batch_size, **shard):
    """`policy_loss_from_logits(..., backend="triton")` on validated inputs: `(loss, metrics)`, or with
    `output_final_state` among the carried-state keywords `shard` `(loss, metrics, final_state)`. Eager calls
    go through `FusedPolicyLossFromLogits`; under torch.compile the custom op `policy_loss_from_logits_fused`
    (no carried state, no `inplace_grad` there: NotImplementedError)."""
    check_device(logits.device)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels need unit stride along V; rows may be strided
    topk = config.divergence in LOGIT_DIVERGENCES
    topk_ids, topk_log_probs = (rollout_topk_ids, rollout_topk_log_probs) if topk else (None, None)
    shard = {name: value for name, value in shard.items() if value is not None and value is not False}
    loss_scale_factor = float(resolve_loss_scale_factor(config.loss_agg_mode, config.loss_scale_factor, layout) or 0)
    normalizers = (dp_size, batch_num_tokens, global_batch_size)
    if torch.compiler.is_compiling():
        if shard or inplace_grad:
            raise NotImplementedError("policy_loss_from_logits with a carried state or inplace_grad=True has no "
                                      "torch.compile path yet: call it outside the compiled region")
        tensors = [v if isinstance(v, torch.Tensor) else None for v in normalizers]
        numbers = [float(temperature), loss_scale_factor] + [
            math.nan if v is None or isinstance(v, torch.Tensor) else float(v) for v in normalizers]
        loss, aux, entropy, _, _ = policy_loss_from_logits_fused(
            logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids,
            topk_log_probs, *tensors, encode_config(config), numbers, layout.adv_per_seq)
        final_state = ()
    else:
        options = dict(plan=kernel_plan(config, topk), topk=_topk_id(config), temperature=float(temperature),
                       adv_per_seq=layout.adv_per_seq, loss_scale_factor=loss_scale_factor,
                       normalizers=normalizers, shard=shard)
        loss, aux, entropy, *final_state = FusedPolicyLossFromLogits.apply(
            logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids,
            topk_log_probs, bool(inplace_grad), options)
    loss, metrics = finish(loss, aux, config.method, logits.dtype)
    metrics["entropy"] = entropy.to(loss.dtype)
    return (loss, metrics, *(state.to(loss.dtype) for state in final_state))
