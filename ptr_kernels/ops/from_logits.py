"""The from-logits loss as an autograd operation: logits kernel -> token kernel -> reduction; backward into logits.

Forward, no host sync: `logits.logits_forward` (log pi(y_t), the Top-K D_t, entropy, log Z per token), then
`autograd.fused_forward` with D given (the token kernel's DIV_GIVEN branch: the same trust-region step as
`policy_loss`; for a binary divergence D is left to the token kernel, which computes it from that log pi(y_t)),
which also runs the reduction: three kernels, plus a few small torch ops for the entropy's masked mean (and, on
an accelerator, the asynchronous checks of the token ids). Backward, one launch: `logits.logits_backward` writes
d loss / d logits once, in the logits' dtype, into a new tensor or (`inplace_grad`) into the logits buffer.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..config import LOGIT_DIVERGENCES
from ..layout import Layout, resolve_loss_scale_factor
from . import logits as logits_ops
from .autograd import check_device, contiguous, finish, fused_forward
from .plan import kernel_plan


def _masked_mean(values: torch.Tensor, mask) -> torch.Tensor:
    """Mean of `values` (0 at masked positions) over the valid positions; 0 when there is none (no sync)."""
    if mask is None:
        return values.sum() / max(values.numel(), 1)
    count = (mask != 0).sum()
    return torch.where(count > 0, values.sum() / count.clamp(min=1), 0.0)


class FusedPolicyLossFromLogits(torch.autograd.Function):
    """`(loss, aux, entropy_mean)` of validated inputs; only `logits` gets a gradient."""

    @staticmethod
    def forward(ctx, logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                topk_ids, topk_log_probs, options: dict):
        mask = contiguous(response_mask)  # bool, int or float: != 0 is valid, in every kernel
        input_ids = input_ids.contiguous()
        old_log_prob = old_log_prob.contiguous()
        plan = options["plan"]
        per_token = logits_ops.logits_forward(
            logits, input_ids, mask, old_log_prob,
            contiguous(topk_ids), contiguous(topk_log_probs),
            temperature=options["temperature"], topk=options["topk"])
        loss, aux, grad_log_prob, *final_state = fused_forward(
            per_token.log_prob, old_log_prob, advantages, mask, cu_seqlens, rollout_is_weights, per_token.divergence,
            plan=plan, adv_per_seq=options["adv_per_seq"], loss_scale_factor=options["loss_scale_factor"],
            normalizers=options["normalizers"], **options["shard"])
        entropy = _masked_mean(per_token.entropy, mask)
        ctx.mark_non_differentiable(aux, entropy, *final_state)
        ctx.save_for_backward(logits, input_ids, mask, per_token.log_normalizer, grad_log_prob, aux)
        ctx.temperature = options["temperature"]
        ctx.inplace_grad = options["inplace_grad"]
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
        return (out,) + (None,) * 9


def triton_policy_loss_from_logits(logits, input_ids, old_log_prob, advantages, response_mask, *, layout: Layout,
                                   cu_seqlens, rollout_topk_ids, rollout_topk_log_probs, temperature: float, config,
                                   inplace_grad: bool, rollout_is_weights, dp_size, batch_num_tokens,
                                   global_batch_size, **shard):
    """`policy_loss_from_logits(..., backend="triton")` on validated inputs: `(loss, metrics)`, or with
    `output_final_state` among the carried-state keywords `shard` `(loss, metrics, final_state)`."""
    check_device(logits.device)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels need unit stride along V; rows may be strided
    topk = config.divergence in LOGIT_DIVERGENCES
    plan = kernel_plan(config, topk)
    options = dict(
        plan=plan, topk=logits_ops.TOPK_IDS[config.divergence] if topk else logits_ops.TOPK_NONE.value,
        temperature=float(temperature), inplace_grad=inplace_grad, adv_per_seq=layout.adv_per_seq,
        loss_scale_factor=float(resolve_loss_scale_factor(config.loss_agg_mode, config.loss_scale_factor,
                                                          layout) or 0),
        normalizers=(dp_size, batch_num_tokens, global_batch_size),
        shard={name: value for name, value in shard.items() if value is not None and value is not False})
    loss, aux, entropy, *final_state = FusedPolicyLossFromLogits.apply(
        logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
        rollout_topk_ids if topk else None, rollout_topk_log_probs if topk else None, options)
    loss, metrics = finish(loss, aux, plan.config.method, logits.dtype)
    metrics["entropy"] = entropy.to(loss.dtype)
    return (loss, metrics, *(state.to(loss.dtype) for state in final_state))
