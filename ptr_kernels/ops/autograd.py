"""The eager path: one `torch.autograd.Function` per entry point, each a forward of kernel launches
(ops/runtime.py; from hidden states, ops/hidden.py's pass over the chunks) and a backward of one launch (from
hidden states, one more pass over the chunks).

Only the tensors that get a gradient are arguments of their own (log_prob; logits; hidden, weight and bias):
the other tensors travel in `inputs`, so autograd never tracks them (they get no gradient, docs/math.md section
10). The outputs without a gradient (aux, the entropy's mean, a final state) are handed back in `side` rather
than as outputs: autograd then tracks one output, and `apply` costs less host time. Under torch.compile the
custom ops of ops/compiled.py run the same forwards instead.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .hidden import hidden_backward, hidden_loss_forward
from .runtime import fused_forward, logits_backward, logits_loss_forward, scale_grad


def _apply_without_wrapper(function):
    """`function.apply` without `Function.apply`'s Python wrapper, whose work (binding a setup_context's defaults,
    unwrapping functorch's dead wrappers from every argument) these Functions have no use for and which costs
    host time per call; under a functorch transform (vmap, grad, ...) the wrapper decides, as it must."""
    apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, function)

    def checked_apply(*args):
        if torch._C._are_functorch_transforms_active():
            return function.apply(*args)
        return apply(*args)
    return checked_apply


def _kernel_backward(gradients):
    """A Function's backward that computes `gradients(ctx, grad_loss)` with kernels, which autograd cannot
    differentiate: under create_graph=True a double backward must raise, not silently return 0, so it runs
    through `once_differentiable` then, and only then (its no_grad context costs host time on every backward)."""
    checked = once_differentiable(gradients)

    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            return checked(ctx, grad_loss)
        return gradients(ctx, grad_loss)
    return staticmethod(backward)


def _policy_loss_gradients(ctx, grad_loss):
    """d loss / d log_prob in one launch; None for the other arguments."""
    (grad,) = ctx.saved_tensors
    return scale_grad(grad, grad_loss, ctx.aux, ctx.grad_dtype), None, None, None


class FusedPolicyLoss(torch.autograd.Function):
    """`policy_loss`: the loss from `runtime.fused_forward`; backward = one `scale_grad` launch into log_prob.
    `inputs` = (old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, divergence)."""

    @staticmethod
    def forward(ctx, log_prob, inputs: tuple, options: dict, side: list):
        loss, aux, grad, *final_state = fused_forward(log_prob, *inputs, **options)
        # the gradient saved, not kept as an attribute: freed after backward, and a second backward without
        # retain_graph raises; aux (a few floats, which the metrics hold anyway) as an attribute costs less
        ctx.save_for_backward(grad)
        ctx.aux, ctx.grad_dtype = aux, log_prob.dtype
        side += [aux, *final_state]
        return loss

    backward = _kernel_backward(_policy_loss_gradients)


def _logits_gradients(ctx, grad_loss):
    """d loss / d logits in one launch, into a new tensor or (`inplace_grad`) the logits buffer."""
    logits, input_ids, mask, log_normalizer, grad_log_prob, aux = ctx.saved_tensors
    out = logits if ctx.inplace_grad else torch.empty_like(logits, memory_format=torch.contiguous_format)
    logits_backward(logits, input_ids, mask, log_normalizer, grad_log_prob, grad_loss, aux,
                    temperature=ctx.temperature, out=out)
    if ctx.inplace_grad:
        # the buffer now holds the gradient: any saved use of the old logits must fail, not read it
        torch.autograd.graph.increment_version(logits)
    return out, None, None, None, None


class FusedPolicyLossFromLogits(torch.autograd.Function):
    """`policy_loss_from_logits`: the loss from `runtime.logits_loss_forward`; only `logits` gets a gradient.
    `inputs` = (input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids,
    topk_log_probs)."""

    @staticmethod
    def forward(ctx, logits, inputs: tuple, options: dict, inplace_grad: bool, side: list):
        loss, aux, entropy, grad_log_prob, log_normalizer, input_ids, mask, *final_state = logits_loss_forward(
            logits, *inputs, **options)
        ctx.save_for_backward(logits, input_ids, mask, log_normalizer, grad_log_prob, aux)
        ctx.temperature, ctx.inplace_grad = options["temperature"], inplace_grad
        side += [aux, entropy, *final_state]
        return loss

    backward = _kernel_backward(_logits_gradients)


def _hidden_gradients(ctx, grad_loss):
    """d loss / d (hidden, weight, bias) by one more pass over the chunks; None for the other arguments."""
    hidden, weight, bias, ids, mask, log_normalizer, grad_log_prob, aux = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = hidden_backward(
        hidden, weight, bias, ids, mask, log_normalizer, grad_log_prob, grad_loss, aux, chunk=ctx.chunk,
        temperature=ctx.temperature, needs_grad=ctx.needs_input_grad[:3])
    if grad_hidden is not None:
        grad_hidden = grad_hidden.view(ctx.hidden_shape)
    return grad_hidden, grad_weight, grad_bias, None, None, None


class FusedPolicyLossFromHidden(torch.autograd.Function):
    """`policy_loss_from_hidden`: the loss from `hidden.hidden_loss_forward`; hidden, weight and bias get the
    gradients. `inputs` = (input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
    topk_ids, topk_log_probs)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, inputs: tuple, options: dict, side: list):
        out = hidden_loss_forward(hidden, weight, bias, *inputs, **options)
        ctx.save_for_backward(out.hidden, weight, bias, out.ids, out.mask, out.log_normalizer, out.grad_log_prob,
                              out.aux)
        ctx.hidden_shape, ctx.chunk, ctx.temperature = hidden.shape, options["chunk"], options["temperature"]
        side += [out.aux, out.entropy]
        return out.loss

    backward = _kernel_backward(_hidden_gradients)


apply_policy_loss = _apply_without_wrapper(FusedPolicyLoss)
apply_policy_loss_from_logits = _apply_without_wrapper(FusedPolicyLossFromLogits)
apply_policy_loss_from_hidden = _apply_without_wrapper(FusedPolicyLossFromHidden)
