"""The paper authors' two CPPO implementations, transcribed from their stated conventions (docs/math.md section 11)
as plain eager PyTorch, for the drop-in tests: `ptr_cppo` must equal `verl_cppo`, and the `PolicyLossConfig` of
`UNIRL_CONFIG` must equal `unirl_cppo`.

- `verl_cppo`: their verl policy loss (`cppo`, padded `[B, T]`): positions are the columns of the padded row,
  the ratio detached and capped at `clip_ratio_c` times log_prob, verl 0.9.1's `agg_loss`, verl's metrics.
- `unirl_cppo`: their packed implementation (`[N]` with per-sequence lengths): positions over each sequence's
  own length, the ratio surrogate, fixed P90 calibration, their three aggregations with a horizon.

Both are written from the conventions, not from either code base, and both compute at every position and mask
afterwards as the originals do (so they need finite values at masked positions).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import PolicyLossConfig

LOG_RATIO_CLAMP = 20.0


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size=1, batch_num_tokens=None,
             global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """verl 0.9.1's `agg_loss` on `[B, T]`: token-mean, token-sum, seq-mean-token-sum(-norm), seq-mean-token-mean
    (L_i / (n_i + 1e-8)); the sequence count is that of the non-empty rows unless given."""
    mask = loss_mask.to(loss_mat.dtype)
    seq_losses = (loss_mat * mask).sum(dim=-1)
    seq_tokens = mask.sum(dim=-1)
    non_empty = (seq_tokens > 0).to(loss_mat.dtype)
    n_seq = non_empty.sum() if global_batch_size is None else global_batch_size
    if loss_agg_mode == "token-mean":
        n_tok = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return seq_losses.sum() / n_tok * dp_size
    if loss_agg_mode == "token-sum":
        return seq_losses.sum() * dp_size
    if loss_agg_mode == "seq-mean-token-mean":
        return ((seq_losses / (seq_tokens + 1e-8)) * non_empty).sum() / n_seq * dp_size
    loss = (seq_losses * non_empty).sum() / n_seq * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / (mask.sum() + 1e-8)


def verl_cppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", *, delta=0.2,
              clip_ratio_c=20.0, w_min=0.8, delta_b=0.02, delta_b_q=0.9, delta_b_k=1.0, rollout_is_weights=None,
              global_batch_info: Optional[dict] = None):
    """The authors' verl CPPO on padded `[B, T]` tensors: `(loss, metrics)` with verl's metric keys."""
    mask = response_mask.to(log_prob.dtype)
    B, T = log_prob.shape
    log_ratio = (log_prob - old_log_prob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    with torch.no_grad():
        div = (log_prob.exp() - old_log_prob.exp()).abs() * mask
        column = torch.arange(1, T + 1, dtype=log_prob.dtype)  # 1..T, the padded width
        weight = (w_min + (1 - w_min) * ((T - column) / max(T - 1, 1)).clamp(0, 1)) * mask
        step = weight * div
        prefix_div = torch.cumsum(step, dim=-1) - step  # S_{t-1}
        prefix_weight = torch.cumsum(weight, dim=-1) - weight  # W_{t-1}
        quantile = torch.nanquantile(torch.where(mask.bool(), div, torch.nan), delta_b_q, dim=-1)
        row_budget = (delta_b_k * torch.nan_to_num(quantile, nan=delta_b)).clamp(delta_b, 2 * delta_b)
        threshold = (delta + row_budget[:, None] * prefix_weight - prefix_div).clamp(max=delta)
        keep = ((advantages * (ratio - 1) <= 0) | (step <= threshold)).to(log_prob.dtype) * mask
    pg_losses = -advantages * ratio.clamp(max=clip_ratio_c).detach() * log_prob * keep
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = agg_loss(pg_losses, mask, loss_agg_mode, **(global_batch_info or {}))
    metrics = {
        "actor/pg_clipfrac": _masked_mean((1 - keep) * mask, mask),
        "actor/ppo_kl": _masked_mean(-log_ratio.detach(), mask),
        "actor/pg_clipfrac_lower": _masked_mean((ratio.detach() > clip_ratio_c).to(log_prob.dtype) * keep, mask),
    }
    return loss, metrics


# the PolicyLossConfig that reproduces the authors' packed implementation (`unirl_cppo`); set `delta`, `w_min`,
# `delta_b`, `loss_agg_mode` and, for seq-mean-token-sum-norm, `loss_scale_factor` = their horizon
UNIRL_CONFIG = PolicyLossConfig(method="cppo", divergence="binary_tv", surrogate="ratio", length_mode="sequence",
                                delta_b_quantile=0.9, delta_b_quantile_scale=1.0, delta_b_max_mult=2.0,
                                log_ratio_clamp=LOG_RATIO_CLAMP, gate="hard")


def unirl_cppo(new_logp, old_logp, advantages, lengths, *, delta=0.2, w_min=0.8, delta_b=0.02,
               loss_agg_mode="token-mean", horizon=8192) -> torch.Tensor:
    """The authors' packed CPPO: `new_logp`, `old_logp` `[N]`, one advantage per sequence `[S]`, `lengths [S]`
    (every token valid). Returns the loss of their aggregation: token-mean (sum / N), seq-mean-token-mean (mean
    over sequences of L_i / n_i) or seq-mean-token-sum-norm (mean over sequences of L_i / horizon)."""
    sizes = lengths.tolist()
    adv = torch.repeat_interleave(advantages, lengths)
    log_ratio = (new_logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    keep = []
    with torch.no_grad():
        toward = adv * (ratio - 1) <= 0
        div = (new_logp.exp() - old_logp.exp()).abs()
        for d, toward_mu in zip(div.split(sizes), toward.split(sizes)):
            n = d.numel()
            if n == 0:
                keep.append(toward_mu)
                continue
            t = torch.arange(1, n + 1, dtype=d.dtype)
            w = 1 - (1 - w_min) * (t - 1) / max(n - 1, 1)
            step = w * d
            prefix_div, prefix_weight = torch.cumsum(step, 0) - step, torch.cumsum(w, 0) - w
            row_budget = torch.quantile(d, 0.9).clamp(delta_b, 2 * delta_b)
            threshold = torch.clamp(delta + row_budget * prefix_weight - prefix_div, max=delta)
            keep.append(toward_mu | (step <= threshold))
    losses = -adv * ratio * torch.cat(keep).to(new_logp.dtype)
    if loss_agg_mode == "token-mean":
        return losses.sum() / max(losses.numel(), 1)
    parts = [p for p in losses.split(sizes) if p.numel()]
    if loss_agg_mode == "seq-mean-token-mean":
        return torch.stack([p.mean() for p in parts]).mean()
    return torch.stack([p.sum() / horizon for p in parts]).mean()
