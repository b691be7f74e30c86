"""The Triton kernels as differentiable `torch.library` custom ops, and `triton_policy_loss`.

`ptr_kernels::policy_loss_fused` runs the token kernel and the one-program reduction (two launches) and
returns the loss (0-dim, differentiable), the reduction's other outputs (the backward scale and the
metrics) and the per-token gradient, which the forward pass already computed. Backward is one launch of
`ptr_kernels::scale_grad`: that gradient times the upstream gradient and the scale, in log_prob's dtype.
Being custom ops with fake implementations, both are opaque to `torch.compile`, which traces around them
(`fullgraph=True` works) and never hands Python floats to a Triton launcher as float64.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import kernels
from .config import PolicyLossConfig
from .layout import check_inputs
from .reference import compute_dtype


@torch.library.custom_op("ptr_kernels::policy_loss_fused", mutates_args=())
def policy_loss_fused(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
    response_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    rollout_is_weights: Optional[torch.Tensor], adv_per_seq: bool, method: str, divergence: str, gate: str,
    surrogate: str, length_mode: str, horizon: int, delta: float, delta_low: float, delta_high: float,
    w_min: float, delta_b: float, delta_b_quantile: Optional[float], delta_b_max_mult: float,
    ratio_cap: float, log_ratio_clamp: Optional[float], clip_ratio_low: float, clip_ratio_high: float,
    clip_ratio_c: Optional[float], loss_agg_mode: str, loss_scale_factor: float,
    dp_size: Optional[float], dp_size_tensor: Optional[torch.Tensor],
    batch_num_tokens: Optional[float], batch_num_tokens_tensor: Optional[torch.Tensor],
    global_batch_size: Optional[float], global_batch_size_tensor: Optional[torch.Tensor], block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kernels.launch` with the config spelled out (each normalizer as a number or a 0-dim tensor).

    Returns: loss (0-dim f32), aux `[NUM_AUX]` f32 (the backward scale, then the metrics),
    grad `[like log_prob]` f32.
    """
    normalizers = dict(dp_size=dp_size if dp_size_tensor is None else dp_size_tensor,
                       batch_num_tokens=batch_num_tokens if batch_num_tokens_tensor is None
                       else batch_num_tokens_tensor,
                       global_batch_size=global_batch_size if global_batch_size_tensor is None
                       else global_batch_size_tensor)
    return kernels.launch(
        log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
        adv_per_seq=adv_per_seq, method=method, divergence=divergence, gate=gate, surrogate=surrogate,
        length_mode=length_mode, horizon=horizon, delta=delta, delta_low=delta_low, delta_high=delta_high,
        w_min=w_min, delta_b=delta_b, delta_b_quantile=delta_b_quantile, delta_b_max_mult=delta_b_max_mult,
        ratio_cap=ratio_cap, log_ratio_clamp=log_ratio_clamp, clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode,
        loss_scale_factor=loss_scale_factor, normalizers=normalizers, block=block)


@policy_loss_fused.register_fake
def _(log_prob, *args):
    return (log_prob.new_empty((), dtype=torch.float32),
            log_prob.new_empty((kernels.NUM_AUX,), dtype=torch.float32),
            torch.empty_like(log_prob, dtype=torch.float32))


@torch.library.custom_op("ptr_kernels::scale_grad", mutates_args=())
def scale_grad(grad: torch.Tensor, upstream: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """grad * upstream * scale in `dtype` (one launch)."""
    return kernels.scale_grad(grad, upstream, scale, dtype)


@scale_grad.register_fake
def _(grad, upstream, scale, dtype):
    return torch.empty_like(grad, dtype=dtype)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])  # scale and metrics; the saved per-token gradient
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs that have no gradient
    ctx.save_for_backward(output[2], output[1])
    ctx.grad_dtype = inputs[0].dtype
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_loss, grad_aux, grad_grad):
    """d loss / d log_prob_t = (forward's per-token gradient) * scale, times the upstream gradient."""
    grad, aux = ctx.saved_tensors
    none = (None,) * (ctx.num_inputs - 1)
    if grad_loss is None:
        return (None,) + none
    return (scale_grad(grad, grad_loss, aux[kernels.AUX_SCALE], ctx.grad_dtype),) + none


policy_loss_fused.register_autograd(_backward, setup_context=_setup_context)


def _number_or_tensor(value, device):
    """A normalizer as (number, None) or (None, 0-dim tensor on `device`); never read on the host."""
    if isinstance(value, torch.Tensor):
        return None, value.to(device)
    return (None if value is None else float(value)), None


def triton_policy_loss(log_prob, old_log_prob, advantages, response_mask=None, *, cu_seqlens=None,
                       config: PolicyLossConfig, rollout_is_weights=None, dp_size=1, batch_num_tokens=None,
                       global_batch_size=None, block: int = 0):
    """`policy_loss(..., backend="triton")`: same arguments and `(loss, metrics)` as the reference.

    `block` forces the kernel's positions per block (a power of two; 0 picks one), for tests.
    """
    layout = check_inputs(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights)
    kernels.check_device(log_prob.device)
    loss_scale_factor = config.loss_scale_factor
    if config.loss_agg_mode == "seq-mean-token-sum-norm" and loss_scale_factor is None:
        if layout.packed:
            raise ValueError("loss_scale_factor is required for loss_agg_mode='seq-mean-token-sum-norm' "
                             "with packed input (there is no padded width to default to)")
        loss_scale_factor = layout.width
    if isinstance(config.length_mode, int):
        length_mode, horizon = "int", config.length_mode
    else:
        length_mode, horizon = config.length_mode, 0
    device = log_prob.device

    loss, aux, _ = policy_loss_fused(
        log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, layout.adv_per_seq,
        config.method, config.divergence, config.gate, config.surrogate, length_mode, horizon, config.delta,
        config.delta_low_value, config.delta_high_value, config.w_min, config.delta_b, config.delta_b_quantile,
        config.delta_b_max_mult, config.ratio_cap, config.log_ratio_clamp, config.clip_ratio_low,
        config.clip_ratio_high, config.clip_ratio_c, config.loss_agg_mode, float(loss_scale_factor or 0),
        *_number_or_tensor(dp_size, device), *_number_or_tensor(batch_num_tokens, device),
        *_number_or_tensor(global_batch_size, device), block)

    dtype = compute_dtype(log_prob.dtype)  # the reference's: float64 for float64 input, else float32
    if dtype != torch.float32:
        loss, aux = loss.to(dtype), aux.to(dtype)
    return loss, kernels.metrics(aux, config.method)
