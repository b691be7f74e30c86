"""The Triton backend of each entry point (`backend="triton"`), on inputs the API validated: the device checked,
then the eager autograd Function (ops/autograd.py) or, under torch.compile, the custom op (ops/compiled.py),
then the loss and the metrics in the reference's dtype (`runtime.finish`).

What torch.compile does not take (a carried state, `inplace_grad=True`) raises NotImplementedError inside a
compiled region; the from-hidden loss, a Python loop over chunks, runs eagerly there (a graph break).
"""

from __future__ import annotations

import torch

from ..carried_state import NO_CARRIED_STATE, CarriedState
from ..config import PolicyLossConfig
from ..validation import Layout
from .autograd import apply_policy_loss, apply_policy_loss_from_hidden, apply_policy_loss_from_logits
from .compiled import compiled_policy_loss, compiled_policy_loss_from_logits
from .plan import kernel_plan
from .runtime import check_device, default_chunk_size, finish


def triton_policy_loss(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, *,
                       config: PolicyLossConfig, layout: Layout, normalizers: tuple,
                       carried: CarriedState = NO_CARRIED_STATE):
    """`policy_loss(..., backend="triton")` on validated inputs: `(loss, metrics)`, or `(loss, metrics,
    final_state)` when `carried` asks for it."""
    check_device(log_prob.device)
    if torch.compiler.is_compiling():
        if carried.given:
            raise NotImplementedError("policy_loss with a carried state (initial_state, position_offset, ...) "
                                      "has no torch.compile path yet: call it outside the compiled region")
        loss, aux = compiled_policy_loss(log_prob, old_log_prob, advantages, response_mask, cu_seqlens,
                                         rollout_is_weights, config=config, adv_per_seq=layout.adv_per_seq,
                                         loss_scale_factor=layout.loss_scale_factor, normalizers=normalizers)
        final_state = ()
    else:
        options = dict(plan=kernel_plan(config), adv_per_seq=layout.adv_per_seq,
                       loss_scale_factor=layout.loss_scale_factor, normalizers=normalizers, carried=carried)
        side = []
        loss = apply_policy_loss(log_prob, (old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                                            None), options, side)
        aux, *final_state = side
    loss, metrics = finish(loss, aux, config.method, log_prob.dtype)
    if final_state:  # in the loss's dtype, like the reference's
        return loss, metrics, final_state[0].to(loss.dtype)
    return loss, metrics


def triton_policy_loss_from_logits(logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens,
                                   rollout_is_weights, topk_ids, topk_log_probs, *, temperature: float,
                                   config: PolicyLossConfig, layout: Layout, normalizers: tuple,
                                   carried: CarriedState = NO_CARRIED_STATE, inplace_grad: bool = False):
    """`policy_loss_from_logits(..., backend="triton")` on validated inputs: `(loss, metrics)`, or `(loss,
    metrics, final_state)` when `carried` asks for it."""
    check_device(logits.device)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels need unit stride along V; rows may be strided
    if torch.compiler.is_compiling():
        if carried.given or inplace_grad:
            raise NotImplementedError("policy_loss_from_logits with a carried state or inplace_grad=True has no "
                                      "torch.compile path yet: call it outside the compiled region")
        loss, aux, entropy = compiled_policy_loss_from_logits(
            logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids,
            topk_log_probs, config=config, temperature=temperature, adv_per_seq=layout.adv_per_seq,
            loss_scale_factor=layout.loss_scale_factor, normalizers=normalizers)
        final_state = ()
    else:
        options = dict(plan=kernel_plan(config), temperature=float(temperature), adv_per_seq=layout.adv_per_seq,
                       loss_scale_factor=layout.loss_scale_factor, normalizers=normalizers, carried=carried)
        side = []
        loss = apply_policy_loss_from_logits(logits, (input_ids, old_log_prob, advantages, response_mask, cu_seqlens,
                                                      rollout_is_weights, topk_ids, topk_log_probs),
                                             options, bool(inplace_grad), side)
        aux, entropy, *final_state = side
    loss, metrics = finish(loss, aux, config.method, logits.dtype)
    metrics["entropy"] = entropy.to(loss.dtype)
    if final_state:
        return loss, metrics, final_state[0].to(loss.dtype)
    return loss, metrics


@torch.compiler.disable  # a Python loop over chunks: under torch.compile it runs eagerly (a graph break)
def triton_policy_loss_from_hidden(hidden, weight, bias, input_ids, old_log_prob, advantages, response_mask,
                                   cu_seqlens, rollout_is_weights, topk_ids, topk_log_probs, *, temperature: float,
                                   config: PolicyLossConfig, layout: Layout, normalizers: tuple, chunk_size=None):
    """`policy_loss_from_hidden(..., backend="triton")` on validated inputs: `(loss, metrics)`."""
    check_device(hidden.device)
    options = dict(plan=kernel_plan(config), temperature=float(temperature),
                   chunk=chunk_size or default_chunk_size(weight.shape[0], weight.dtype, hidden.device),
                   adv_per_seq=layout.adv_per_seq, loss_scale_factor=layout.loss_scale_factor,
                   normalizers=normalizers)
    side = []
    loss = apply_policy_loss_from_hidden(hidden, weight, bias, (input_ids, old_log_prob, advantages, response_mask,
                                                                cu_seqlens, rollout_is_weights, topk_ids,
                                                                topk_log_probs), options, side)
    aux, entropy = side
    loss, metrics = finish(loss, aux, config.method, hidden.dtype)
    metrics["entropy"] = entropy.to(loss.dtype)
    return loss, metrics
