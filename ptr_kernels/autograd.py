"""The Triton kernel as a differentiable `torch.library` custom op, and `triton_policy_loss`.

`ptr_kernels::policy_loss_partials` launches the kernel once and returns the per-sequence loss sums
L_i `[S]` (differentiable), the per-sequence statistics `[S, NUM_STATS]` and the per-token gradient
d L_i / d log_prob_t (saved for backward). Backward only scales that gradient by the upstream gradient of
its sequence: no second pass over the math. Being a custom op with a fake implementation, it is opaque to
`torch.compile`, which traces around it (`fullgraph=True` works) and never hands Python floats to the
Triton launcher as float64. The aggregation and the metrics are small torch reductions over `[S]`.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import kernels
from .config import PolicyLossConfig
from .layout import check_inputs


@torch.library.custom_op("ptr_kernels::policy_loss_partials", mutates_args=())
def policy_loss_partials(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
    response_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    rollout_is_weights: Optional[torch.Tensor], adv_per_seq: bool, method: str, divergence: str, gate: str,
    surrogate: str, length_mode: str, horizon: int, delta: float, delta_low: float, delta_high: float,
    w_min: float, delta_b: float, delta_b_quantile: Optional[float], delta_b_max_mult: float, ratio_cap: float,
    log_ratio_clamp: Optional[float], clip_ratio_low: float, clip_ratio_high: float,
    clip_ratio_c: Optional[float], block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kernels.launch` with the config spelled out: returns (seq_loss `[S]`, stats `[S, NUM_STATS]`,
    grad `[like log_prob]` f32)."""
    return kernels.launch(
        log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
        adv_per_seq=adv_per_seq, method=method, divergence=divergence, gate=gate, surrogate=surrogate,
        length_mode=length_mode, horizon=horizon, delta=delta, delta_low=delta_low, delta_high=delta_high,
        w_min=w_min, delta_b=delta_b, delta_b_quantile=delta_b_quantile, delta_b_max_mult=delta_b_max_mult,
        ratio_cap=ratio_cap, log_ratio_clamp=log_ratio_clamp, clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c, block=block)


@policy_loss_partials.register_fake
def _(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, *args):
    num_seqs = log_prob.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (log_prob.new_empty((num_seqs,), dtype=torch.float32),
            log_prob.new_empty((num_seqs, kernels.NUM_STATS), dtype=torch.float32),
            torch.empty_like(log_prob, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])  # statistics and the saved per-token gradient
    ctx.save_for_backward(output[2], inputs[4])  # per-token gradient, cu_seqlens (None when padded)
    ctx.grad_dtype = inputs[0].dtype
    ctx.num_inputs = len(inputs)


def _backward(ctx, grad_seq_loss, grad_stats, grad_grad):
    """d loss / d log_prob_t = (d L_i / d log_prob_t) * (d loss / d L_i), i the sequence of token t."""
    grad, cu_seqlens = ctx.saved_tensors
    if cu_seqlens is None:
        per_token = grad_seq_loss[:, None]
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        per_token = torch.repeat_interleave(grad_seq_loss, lengths, output_size=grad.shape[0])
    return ((grad * per_token).to(ctx.grad_dtype),) + (None,) * (ctx.num_inputs - 1)


policy_loss_partials.register_autograd(_backward, setup_context=_setup_context)


def triton_policy_loss(log_prob, old_log_prob, advantages, response_mask=None, *, cu_seqlens=None,
                       config: PolicyLossConfig, rollout_is_weights=None, dp_size=1, batch_num_tokens=None,
                       global_batch_size=None, block: int = 0):
    """`policy_loss(..., backend="triton")`: same arguments and `(loss, metrics)` as the reference.

    `block` forces the kernel's tokens per block (a power of two; 0 picks one), for tests.
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

    seq_loss, stats, _ = policy_loss_partials(
        log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, layout.adv_per_seq,
        config.method, config.divergence, config.gate, config.surrogate, length_mode, horizon, config.delta,
        config.delta_low_value, config.delta_high_value, config.w_min, config.delta_b, config.delta_b_quantile,
        config.delta_b_max_mult, config.ratio_cap, config.log_ratio_clamp, config.clip_ratio_low,
        config.clip_ratio_high, config.clip_ratio_c, block)

    dtype = kernels.result_dtype(log_prob)
    stats = stats.to(dtype)
    loss = kernels.aggregate(seq_loss.to(dtype), stats[:, kernels.STAT_TOKENS], config.loss_agg_mode,
                             dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                             global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor)
    return loss, kernels.metrics(stats, config.method)
