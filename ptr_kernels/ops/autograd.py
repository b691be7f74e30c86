"""The fused loss as an autograd operation: a plain `torch.autograd.Function` for eager calls, `torch.library`
custom ops for `torch.compile`.

Both run `fused_forward` (the token kernel, which also reduces: one launch) and a backward of one launch
(`reduce.scale_grad`: the per-token gradient the forward already computed, times the upstream gradient and
the aggregation's scale, in log_prob's dtype). Eager calls skip the custom-op machinery, which costs more host
time than everything else in a call; under `torch.compile` the custom ops (with fake implementations) let
Dynamo trace around the kernels, `fullgraph=True` included, and keep Python floats away from the launcher.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import carried_state
from ..carried_state import check_carried_state
from ..validation import check_inputs, resolve_loss_scale_factor
from . import chunks, reduce, token
from .plan import KernelPlan, decode_config, encode_config, kernel_plan, layout_constexprs


def fused_forward(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, divergence, *,
                  plan: KernelPlan, adv_per_seq: bool, loss_scale_factor: float, normalizers: tuple, block: int = 0,
                  initial_state=None, position_offset=None, sequence_length=None, sequence_delta_b=None,
                  output_final_state: bool = False):
    """Launch the token kernel on validated inputs: one launch at every shape (its last program reduces the
    per-sequence sums into the loss and the metrics), no host sync.

    Args: the tensors of `policy_loss` (padded `[B, T]` or packed `[N]` + `cu_seqlens [S + 1]`), `divergence`
    (D per token, f32, like log_prob) or None to compute the binary D; `normalizers` = (dp_size,
    batch_num_tokens, global_batch_size), each None, a number or a 0-dim tensor; `block` positions per block
    (a power of two; 0 picks one from the shapes). A shard of a longer sequence (docs/math.md section 8, all
    optional, validated by the caller): `initial_state [S, 3]` (slack, S, W), `position_offset [S]` int,
    `sequence_length [S]` (T_w), `sequence_delta_b [S]`, and `output_final_state`.
    Returns: loss `[]` f32; aux `[plan.aux_size]` f32 (the backward scale, then the metrics); grad
    `[like log_prob]` f32: d loss / d log_prob_t up to the backward scale (0 at masked positions); with
    `output_final_state` also final_state `[S, 3]` float64, the state after the shard.
    """
    packed = cu_seqlens is not None
    num_seqs = cu_seqlens.shape[0] - 1 if packed else log_prob.shape[0]
    numel = log_prob.numel()
    # outputs: grad like log_prob (contiguous, as the kernel writes it; log_prob may be a view), the loss (a tensor
    # of its own: a user may modify it in place), and one buffer for aux and the per-sequence sums (a row at least:
    # a batch without sequences still launches)
    constexprs = layout_constexprs(plan, packed, adv_per_seq, sequence_length is not None,
                                   sequence_delta_b is not None, block or token.block_size(numel, num_seqs))
    extent = numel if packed else log_prob.shape[1]
    grid = token.grid_size(packed, num_seqs, extent, response_mask is not None, constexprs)
    # outputs: grad like log_prob (contiguous, as the kernel writes it; log_prob may be a view), the loss (a tensor
    # of its own: a user may modify it in place), and one buffer for aux, the per-sequence sums (a row at least:
    # a batch without sequences still launches) and the work items' rows
    grad = torch.empty_like(log_prob, dtype=torch.float32, memory_format=torch.contiguous_format)
    loss = grad.new_empty(())
    sums = grad.new_empty(reduce.OUT_WIDTH.value + max(num_seqs, 1) * token.NUM_STATS.value
                          + token.scratch_size(grid, constexprs))
    shard = None
    if output_final_state or initial_state is not None or position_offset is not None \
            or sequence_length is not None or sequence_delta_b is not None:
        shard = carried_state.pack_shard(num_seqs, log_prob.device, initial_state=initial_state,
                                         position_offset=position_offset, sequence_length=sequence_length,
                                         sequence_delta_b=sequence_delta_b)
    # contiguous inputs (a mask of any dtype: != 0 is valid)
    inputs = map(contiguous, (log_prob, old_log_prob, advantages, response_mask, rollout_is_weights, divergence,
                              cu_seqlens))
    token.launch_token_kernel(*inputs, shard, grad, loss, sums, chunks.launch_state(log_prob.device, grid),
                              plan.params(log_prob.device), grid=grid, num_seqs=num_seqs, extent=extent,
                              constexprs=constexprs,
                              reduction=reduce.reduction_arguments(constexprs["MODE"], loss_scale_factor,
                                                                   normalizers))
    aux = sums[:plan.aux_size]  # OUT_AUX = 0
    if output_final_state:  # a tensor of its own, not a view that would keep the shard rows alive
        return loss, aux, grad, shard[:, carried_state.SHARD_FINAL:].clone()
    return loss, aux, grad


def contiguous(t):
    """`t` as a contiguous tensor (None stays None); `is_contiguous` first: cheaper than a no-op `contiguous`."""
    return t if t is None or t.is_contiguous() else t.contiguous()


class FusedPolicyLoss(torch.autograd.Function):
    """Eager path: the loss from `fused_forward`; backward = one `scale_grad` launch into log_prob.

    Only `log_prob` is an argument of its own: the other tensors travel in `inputs`, so autograd never tracks
    them (they get no gradient, docs/math.md section 10). The outputs without a gradient (`aux`, and
    `final_state` when asked) are handed back in `side` rather than as outputs: autograd then tracks one
    output, and `apply` costs less host time.
    """

    @staticmethod
    def forward(ctx, log_prob, inputs: tuple, options: dict, side: list):
        loss, aux, grad, *final_state = fused_forward(log_prob, *inputs, **options)
        # the gradient saved, not kept as an attribute: freed after backward, and a second backward without
        # retain_graph raises; aux (a few floats, which the metrics hold anyway) as an attribute costs less
        ctx.save_for_backward(grad)
        ctx.aux, ctx.grad_dtype = aux, log_prob.dtype
        side += [aux, *final_state]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: a double backward must raise, not silently return 0
            return _backward_once(ctx, grad_loss)
        return _scaled_grad(ctx, grad_loss)


def _scaled_grad(ctx, grad_loss):
    """FusedPolicyLoss's gradients: d loss / d log_prob in one launch, None for the other arguments."""
    (grad,) = ctx.saved_tensors
    return reduce.scale_grad(grad, grad_loss, ctx.aux, ctx.grad_dtype), None, None, None


# `Function.apply` without its Python wrapper, whose work (binding a setup_context's defaults, unwrapping
# functorch's dead wrappers from every argument) this Function has no use for and costs host time per call;
# under a functorch transform (vmap, grad, ...) the wrapper decides, as it must.
_apply_without_wrapper = torch._C._FunctionBase.__dict__["apply"].__get__(None, FusedPolicyLoss)


# only under create_graph: once_differentiable's no_grad context costs host time on every plain backward
_backward_once = once_differentiable(_scaled_grad)


# ---- the compiled path: custom ops with a short schema (the config and the numbers as float lists) ----

@torch.library.custom_op("ptr_kernels::policy_loss_fused", mutates_args=())
def policy_loss_fused(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
    response_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    rollout_is_weights: Optional[torch.Tensor], divergence: Optional[torch.Tensor],
    dp_size_tensor: Optional[torch.Tensor], batch_num_tokens_tensor: Optional[torch.Tensor],
    global_batch_size_tensor: Optional[torch.Tensor], config: list[float], numbers: list[float], ints: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_forward` with the config as `encode_config`, `numbers` = (loss_scale_factor, dp_size,
    batch_num_tokens, global_batch_size; NaN: absent or a tensor argument) and `ints` = (adv_per_seq, block)."""
    tensors = (dp_size_tensor, batch_num_tokens_tensor, global_batch_size_tensor)
    normalizers = tuple(t if t is not None else (None if math.isnan(n) else n) for t, n in zip(tensors, numbers[1:]))
    return fused_forward(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                         divergence, plan=kernel_plan(decode_config(config), divergence is not None),
                         adv_per_seq=bool(ints[0]), loss_scale_factor=numbers[0], normalizers=normalizers,
                         block=ints[1])


@policy_loss_fused.register_fake
def _(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, divergence, dp_size_tensor,
      batch_num_tokens_tensor, global_batch_size_tensor, config, numbers, ints):
    return (log_prob.new_empty((), dtype=torch.float32),
            log_prob.new_empty((reduce.aux_size(decode_config(config).method),), dtype=torch.float32),
            torch.empty_like(log_prob, dtype=torch.float32, memory_format=torch.contiguous_format))


@torch.library.custom_op("ptr_kernels::scale_grad", mutates_args=())
def scale_grad_op(grad: torch.Tensor, upstream: torch.Tensor, aux: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad * upstream * aux[AUX_SCALE] in `dtype` (one launch)."""
    return reduce.scale_grad(grad, upstream, aux, dtype)


@scale_grad_op.register_fake
def _(grad, upstream, aux, dtype):
    return torch.empty_like(grad, dtype=dtype, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])  # scale and metrics; the saved per-token gradient
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2], output[1])
    ctx.grad_dtype = inputs[0].dtype
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_loss, grad_aux, grad_grad):
    grad, aux = ctx.saved_tensors
    none = (None,) * (ctx.num_inputs - 1)
    if grad_loss is None:
        return (None,) + none
    return (scale_grad_op(grad, grad_loss, aux, ctx.grad_dtype),) + none


policy_loss_fused.register_autograd(_backward, setup_context=_setup_context)


def fused_policy_loss(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                      divergence, *, config, adv_per_seq: bool, loss_scale_factor, normalizers: tuple, block: int = 0,
                      shard: Optional[dict] = None):
    """`(loss, aux)` of validated inputs through the eager Function, or the custom op under torch.compile.

    `shard`: the carried-state keywords of `fused_forward` (docs/math.md section 8), eager only; with
    `output_final_state` the result is `(loss, aux, final_state)`.
    """
    loss_scale_factor = float(loss_scale_factor or 0)
    compiling = torch.compiler.is_compiling()
    if shard and compiling:
        raise NotImplementedError("policy_loss with a carried state (initial_state, position_offset, ...) "
                                  "has no torch.compile path yet: call it outside the compiled region")
    if not compiling:
        options = dict(plan=kernel_plan(config, divergence is not None), adv_per_seq=adv_per_seq,
                       loss_scale_factor=loss_scale_factor, normalizers=normalizers, block=block, **(shard or {}))
        inputs = (old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, divergence)
        side = []
        apply = FusedPolicyLoss.apply if torch._C._are_functorch_transforms_active() else _apply_without_wrapper
        loss = apply(log_prob, inputs, options, side)
        return (loss, *side)
    tensors = [v if isinstance(v, torch.Tensor) else None for v in normalizers]
    numbers = [loss_scale_factor] + [math.nan if v is None or isinstance(v, torch.Tensor) else float(v)
                                     for v in normalizers]
    loss, aux, _ = policy_loss_fused(log_prob, old_log_prob, advantages, response_mask, cu_seqlens,
                                     rollout_is_weights, divergence, *tensors, encode_config(config), numbers,
                                     [int(adv_per_seq), int(block)])
    return loss, aux


def triton_policy_loss(log_prob, old_log_prob, advantages, response_mask=None, *, cu_seqlens=None, config,
                       rollout_is_weights=None, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                       block: int = 0, initial_state=None, output_final_state: bool = False, position_offset=None,
                       sequence_length=None, sequence_delta_b=None):
    """`policy_loss(..., backend="triton")`: same arguments and `(loss, metrics)` (or `(loss, metrics,
    final_state)` with `output_final_state`) as the reference.

    `block` forces the kernel's positions per block (a power of two; 0 picks one), for tests.
    """
    layout = check_inputs(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                          dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                          cu_seqlens_values_in_kernel=True)
    if not (log_prob.is_cuda or (log_prob.is_cpu and _INTERPRETER_ACTIVE)):
        check_device(log_prob.device)
    loss_scale_factor = resolve_loss_scale_factor(config.loss_agg_mode, config.loss_scale_factor, layout)
    shard = None
    if output_final_state or initial_state is not None or position_offset is not None \
            or sequence_length is not None or sequence_delta_b is not None:
        check_carried_state(layout.num_seqs, log_prob.device,
                            calibrated=config.calibrates_delta_b,
                            initial_state=initial_state,
                            position_offset=position_offset, sequence_length=sequence_length,
                            sequence_delta_b=sequence_delta_b)
        shard = dict(initial_state=initial_state, position_offset=position_offset, sequence_length=sequence_length,
                     sequence_delta_b=sequence_delta_b, output_final_state=output_final_state)
    loss, aux, *final_state = fused_policy_loss(
        log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, None, config=config,
        adv_per_seq=layout.adv_per_seq, loss_scale_factor=loss_scale_factor,
        normalizers=(dp_size, batch_num_tokens, global_batch_size), block=block, shard=shard)
    loss, metrics = finish(loss, aux, config.method, log_prob.dtype)
    if output_final_state:  # in the loss's dtype, like the reference's
        return loss, metrics, final_state[0].to(loss.dtype)
    return loss, metrics


def finish(loss: torch.Tensor, aux: torch.Tensor, method: str, dtype: torch.dtype):
    """`(loss, metrics)` in the reference's dtype (float64 for float64 input), the metrics from one unbind."""
    if dtype == torch.float64:
        loss, aux = loss.to(dtype), aux.to(dtype)
    values = aux.unbind()
    return loss, {name: values[i] for name, i in reduce.METRIC_POSITIONS[method]}


def check_device(device: torch.device) -> None:
    """The Triton kernels run on CUDA tensors, and on CPU tensors in the Triton interpreter only (a RuntimeError
    says how to enable it); other devices (meta, mps, ...) are a ValueError."""
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU tensors in the Triton interpreter), "
                         f"got tensors on {device}: use backend='reference'")
    if not _INTERPRETER_ACTIVE and device.type == "cpu":
        raise RuntimeError(
            "backend='triton' got CPU tensors, but Triton kernels run on CPU only in the Triton interpreter: "
            "set the environment variable TRITON_INTERPRET=1 before triton is first imported "
            "(or use backend='reference' / move the tensors to CUDA)")


def interpreter_active() -> bool:
    """Whether the kernels run in the Triton interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(token.token_kernel, InterpretedFunction)


_INTERPRETER_ACTIVE = interpreter_active()
