"""The Triton kernels as differentiable `torch.library` custom ops, and `triton_policy_loss`.

`ptr_kernels::policy_loss_fused` runs the token kernel and the one-program reduction (two launches) and
returns the loss (0-dim, differentiable), the reduction's other outputs (the backward scale and the
metrics) and the per-token gradient, which the forward pass already computed. Backward is one launch of
`ptr_kernels::scale_grad`: that gradient times the upstream gradient and the scale, in log_prob's dtype.
Being custom ops with fake implementations, both are opaque to `torch.compile`, which traces around them
(`fullgraph=True` works) and never hands Python floats to a Triton launcher as float64.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import token as kernels
from ..config import PolicyLossConfig
from ..layout import check_inputs, resolve_loss_scale_factor
from ..reference import compute_dtype


# The op's schema is kept short on purpose: torch's custom-op autograd wrapper walks the schema once per
# argument per call (quadratic in their number: about 250 us of host time per call on a fast CPU with one
# argument per hyperparameter). So the options travel as one string, the numbers as one float list (NaN for
# None) and the integers as one int list.
OPTION_FIELDS = ("method", "divergence", "gate", "surrogate", "length_mode", "loss_agg_mode")
FLOAT_FIELDS = ("delta", "delta_low", "delta_high", "w_min", "delta_b", "delta_b_quantile", "delta_b_max_mult",
                "ratio_cap", "log_ratio_clamp", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c",
                "loss_scale_factor", "dp_size", "batch_num_tokens", "global_batch_size")
INT_FIELDS = ("adv_per_seq", "horizon", "block")
NORMALIZERS = ("dp_size", "batch_num_tokens", "global_batch_size")


@torch.library.custom_op("ptr_kernels::policy_loss_fused", mutates_args=())
def policy_loss_fused(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
    response_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    rollout_is_weights: Optional[torch.Tensor], dp_size_tensor: Optional[torch.Tensor],
    batch_num_tokens_tensor: Optional[torch.Tensor], global_batch_size_tensor: Optional[torch.Tensor],
    options: str, floats: list[float], ints: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kernels.launch` with the config packed by `_pack` (each normalizer a number in `floats` or a 0-dim tensor).

    Returns: loss (0-dim f32), aux `[NUM_AUX]` f32 (the backward scale, then the metrics),
    grad `[like log_prob]` f32.
    """
    kwargs = dict(zip(OPTION_FIELDS, options.split(",")))
    kwargs.update((name, None if math.isnan(v) else v) for name, v in zip(FLOAT_FIELDS, floats))
    kwargs.update(zip(INT_FIELDS, ints))
    kwargs["adv_per_seq"] = bool(kwargs["adv_per_seq"])
    tensors = (dp_size_tensor, batch_num_tokens_tensor, global_batch_size_tensor)
    numbers = [kwargs.pop(name) for name in NORMALIZERS]
    normalizers = {name: n if t is None else t for name, n, t in zip(NORMALIZERS, numbers, tensors)}
    return kernels.launch(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                          normalizers=normalizers, **kwargs)


def _pack(config: PolicyLossConfig, *, length_mode: str, loss_scale_factor: float, normalizers: dict,
          adv_per_seq: bool, horizon: int, block: int) -> tuple:
    """(options, floats, ints) for `policy_loss_fused`; tensor normalizers travel separately (NaN here)."""
    values = dict(config.__dict__, length_mode=length_mode, delta_low=config.delta_low_value,
                  delta_high=config.delta_high_value, loss_scale_factor=loss_scale_factor)
    for name, value in normalizers.items():
        values[name] = None if isinstance(value, torch.Tensor) else value
    options = ",".join(values[name] for name in OPTION_FIELDS)
    floats = [math.nan if values[name] is None else float(values[name]) for name in FLOAT_FIELDS]
    return options, floats, [int(adv_per_seq), int(horizon), int(block)]


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


def triton_policy_loss(log_prob, old_log_prob, advantages, response_mask=None, *, cu_seqlens=None,
                       config: PolicyLossConfig, rollout_is_weights=None, dp_size=1, batch_num_tokens=None,
                       global_batch_size=None, block: int = 0):
    """`policy_loss(..., backend="triton")`: same arguments and `(loss, metrics)` as the reference.

    `block` forces the kernel's positions per block (a power of two; 0 picks one), for tests.
    """
    layout = check_inputs(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                          dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    kernels.check_device(log_prob.device)
    loss_scale_factor = resolve_loss_scale_factor(config.loss_agg_mode, config.loss_scale_factor, layout)
    if isinstance(config.length_mode, int):
        length_mode, horizon = "int", config.length_mode
    else:
        length_mode, horizon = config.length_mode, 0
    normalizers = dict(dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    tensors = [v if isinstance(v, torch.Tensor) else None for v in normalizers.values()]  # on log_prob's device
    packed = _pack(config, length_mode=length_mode, loss_scale_factor=float(loss_scale_factor or 0),
                   normalizers=normalizers, adv_per_seq=layout.adv_per_seq, horizon=horizon, block=block)
    loss, aux, _ = policy_loss_fused(log_prob, old_log_prob, advantages, response_mask, cu_seqlens,
                                     rollout_is_weights, *tensors, *packed)

    dtype = compute_dtype(log_prob.dtype)  # the reference's: float64 for float64 input, else float32
    if dtype != torch.float32:
        loss, aux = loss.to(dtype), aux.to(dtype)
    return loss, kernels.metrics(aux, config.method)
