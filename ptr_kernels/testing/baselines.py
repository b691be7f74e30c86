"""What users run today, for parity tests and benchmarks: verl's losses and a per-sequence-loop CPPO.

verl: the formulas of `compute_policy_loss_vanilla`, `compute_policy_loss_dppo_tv`,
`compute_policy_loss_dppo_kl` and `agg_loss` in volcengine/verl `verl/trainer/ppo/core_algos.py`
(`agg_loss` and `vanilla` as of commit b178a3c, Jan 2026; the DPPO losses as published after the DPPO
paper, arXiv 2602.04879), and `masked_sum` / `masked_mean` of `verl/utils/torch_functional.py`.
They are transcribed as formulas, eager PyTorch on padded `[B, T]` tensors, with verl's numerics kept
(the +1e-8 in means, the loss computed at every position and masked afterwards, metrics as Python
floats, i.e. one host sync each, unless `metrics_as_floats=False`). Where verl differs from docs/math.md, see
docs/math.md ("Known deviations").

`cppo_per_sequence_loop`: CPPO written the way the authors' released code is (Tencent-Hunyuan/UniRL,
`unirl/algorithms/cppo.py`): one Python iteration per sequence with cumsums, a `torch.quantile` and the
mask, then verl's `agg_loss`. Written from docs/math.md section 3, not from that code.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import PolicyLossConfig, resolve_config

VERL_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """verl_F.masked_sum: NaN outside the mask is dropped, then sum(values * mask)."""
    values = torch.where(mask.bool(), values, 0.0)
    return (values * mask).sum() if dim is None else (values * mask).sum(dim=dim)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl_F.masked_mean: masked sum / (mask count + 1e-8)."""
    return _masked_sum(values, mask) / (mask.sum() + 1e-8)


def verl_agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
                  batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """verl's `agg_loss` on `loss_mat [B, T]` with `loss_mask [B, T]` (float 0/1). Returns a 0-dim loss.

    token-mean: masked sum / (batch_num_tokens or #valid tokens) * dp_size
    seq-mean-token-sum: sum_i L_i over non-empty rows / (global_batch_size or #non-empty rows) * dp_size
    seq-mean-token-mean: sum_i L_i / (n_i + 1e-8) over non-empty rows / (global_batch_size or #non-empty) * dp_size
    seq-mean-token-sum-norm: sum_i L_i / (loss_scale_factor or T)   (no sequence count, no dp_size)
    An empty batch gives NaN in the two means (0 / 0), as in verl.
    """
    loss_mask = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        n_tok = loss_mask.sum() if batch_num_tokens is None else batch_num_tokens
        return _masked_sum(loss_mat, loss_mask) / n_tok * dp_size
    if loss_agg_mode == "seq-mean-token-sum":
        seq_losses = (loss_mat * loss_mask).sum(dim=-1)
        seq_mask = (loss_mask.sum(dim=-1) > 0).to(loss_mat.dtype)
        n_seq = seq_mask.sum() if global_batch_size is None else global_batch_size
        return _masked_sum(seq_losses, seq_mask) / n_seq * dp_size
    if loss_agg_mode == "seq-mean-token-mean":
        seq_tokens = loss_mask.sum(dim=-1)
        seq_losses = (loss_mat * loss_mask).sum(dim=-1) / (seq_tokens + 1e-8)
        seq_mask = (seq_tokens > 0).to(loss_mat.dtype)
        n_seq = seq_mask.sum() if global_batch_size is None else global_batch_size
        return _masked_sum(seq_losses, seq_mask) / n_seq * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        seq_losses = (loss_mat * loss_mask).sum(dim=-1)
        scale = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return seq_losses.sum() / scale
    raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is invalid for verl's agg_loss: expected one of "
                     + ", ".join(map(repr, VERL_AGG_MODES)))


def _finish(pg_losses, response_mask, loss_agg_mode, rollout_is_weights, metrics, metrics_as_floats, agg):
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode, **agg)
    if metrics_as_floats:  # verl calls .item() on each metric: one host sync per metric
        metrics = {k: v.detach().item() for k, v in metrics.items()}
    return loss, metrics


def verl_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", *,
                             clip_ratio: float = 0.2, clip_ratio_low: Optional[float] = None,
                             clip_ratio_high: Optional[float] = None, clip_ratio_c: float = 3.0,
                             rollout_is_weights: Optional[torch.Tensor] = None, metrics_as_floats: bool = True,
                             **agg):
    """verl's `compute_policy_loss_vanilla` (PPO clip, clip-higher, dual-clip always on for A < 0).

    All tensors `[B, T]` (verl's argument order: old_log_prob first); `response_mask` float 0/1.
    `agg`: dp_size, batch_num_tokens, global_batch_size, loss_scale_factor of `verl_agg_loss`.
    Returns `(loss, metrics)` with verl's metric names.
    """
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c={clip_ratio_c} must be > 1 (verl asserts it)")
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clip_loss = torch.maximum(unclipped, clipped)
    dual = -advantages * clip_ratio_c
    pg_losses = torch.where(advantages < 0, torch.minimum(dual, clip_loss), clip_loss)
    metrics = {
        "actor/pg_clipfrac": _masked_mean((clipped > unclipped).to(ratio.dtype), response_mask),
        "actor/ppo_kl": _masked_mean(-log_ratio, response_mask),
        "actor/pg_clipfrac_lower": _masked_mean(((clip_loss > dual) & (advantages < 0)).to(ratio.dtype),
                                                response_mask),
    }
    return _finish(pg_losses, response_mask, loss_agg_mode, rollout_is_weights, metrics, metrics_as_floats, agg)


def _verl_dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, divergence, clip_ratio,
               clip_ratio_low, clip_ratio_high, clip_ratio_c, rollout_is_weights, metrics_as_floats, agg):
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    log_ratio = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    # truncated importance sampling instead of dual clip; held constant (the "logp" surrogate)
    truncated = torch.clamp(ratio, max=clip_ratio_c).detach()
    prob, old_prob = torch.exp(log_prob), torch.exp(old_log_prob)
    if divergence == "tv":
        keep_pos = (prob - old_prob) <= high
        keep_neg = (prob - old_prob) >= -low
    else:
        kl = old_prob * (old_log_prob - log_prob) + (1 - old_prob) * torch.log(
            (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        keep_pos = (kl <= high) | (prob <= old_prob)
        keep_neg = (kl <= low) | (prob >= old_prob)
    # A == 0 falls on the negative side in verl (only visible in the clip fraction: its loss is 0)
    valid = torch.where(advantages > 0, keep_pos, keep_neg).detach().to(ratio.dtype)
    pg_losses = -advantages * truncated * log_prob * valid
    metrics = {
        "actor/pg_clipfrac": _masked_mean(1.0 - valid, response_mask),
        "actor/ppo_kl": _masked_mean(-log_ratio, response_mask),
        "actor/pg_clipfrac_lower": _masked_mean((ratio > clip_ratio_c).to(ratio.dtype) * valid, response_mask),
    }
    return _finish(pg_losses, response_mask, loss_agg_mode, rollout_is_weights, metrics, metrics_as_floats, agg)


def verl_policy_loss_dppo_tv(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", *,
                             clip_ratio: float = 0.2, clip_ratio_low: Optional[float] = None,
                             clip_ratio_high: Optional[float] = None, clip_ratio_c: float = 20.0,
                             rollout_is_weights: Optional[torch.Tensor] = None, metrics_as_floats: bool = True,
                             **agg):
    """verl's `compute_policy_loss_dppo_tv` (DPPO Binary-TV). `clip_ratio*` are the TV thresholds
    (delta, delta_low, delta_high); `clip_ratio_c` the truncation cap of the detached ratio. `[B, T]` inputs.
    """
    return _verl_dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, "tv", clip_ratio,
                      clip_ratio_low, clip_ratio_high, clip_ratio_c, rollout_is_weights, metrics_as_floats, agg)


def verl_policy_loss_dppo_kl(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", *,
                             clip_ratio: float = 0.2, clip_ratio_low: Optional[float] = None,
                             clip_ratio_high: Optional[float] = None, clip_ratio_c: float = 20.0,
                             rollout_is_weights: Optional[torch.Tensor] = None, metrics_as_floats: bool = True,
                             **agg):
    """verl's `compute_policy_loss_dppo_kl` (DPPO Binary-KL, KL(mu || pi) on {y_t, rest}). `[B, T]` inputs."""
    return _verl_dppo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, "kl", clip_ratio,
                      clip_ratio_low, clip_ratio_high, clip_ratio_c, rollout_is_weights, metrics_as_floats, agg)


def cppo_per_sequence_loop(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                           response_mask: torch.Tensor, *, config: Optional[PolicyLossConfig] = None,
                           rollout_is_weights: Optional[torch.Tensor] = None, dp_size: int = 1,
                           batch_num_tokens=None, global_batch_size=None, **overrides):
    """CPPO as released code does it: a Python loop over the B sequences, then verl's `agg_loss`.

    Args: `log_prob`, `old_log_prob`, `response_mask` `[B, T]`; advantages `[B, T]` or `[B]`; the config
    (method is taken as "cppo"; keyword overrides as in `policy_loss`). Aggregation is verl's `agg_loss`
    (so "token-sum" is not available and "seq-mean-token-sum-norm" is verl's, see `verl_agg_loss`).
    Returns `(loss, gate)`: the 0-dim loss (autograd to log_prob) and the per-token mask M `[B, T]`.
    """
    config = resolve_config(config, overrides)
    B, T = log_prob.shape
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(B, T)
    mask = response_mask.bool()
    log_ratio = log_prob - old_log_prob
    if config.log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-config.log_ratio_clamp, config.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    gate = torch.zeros_like(ratio)
    with torch.no_grad():
        for i in range(B):
            idx = mask[i].nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            lp, olp, adv, x = log_prob[i, idx], old_log_prob[i, idx], advantages[i, idx], log_ratio[i, idx]
            pi, mu = lp.exp(), olp.exp()
            if config.divergence == "binary_tv":
                div = (pi - mu).abs()
            else:
                div = mu * (olp - lp) + (1 - mu) * torch.log((1 - mu + 1e-8) / (1 - pi + 1e-8))
            horizon = {"sequence": int(idx[-1]) + 1, "padded": T}.get(config.length_mode, config.length_mode)
            t = (idx + 1).to(div.dtype)
            w = (1 - (1 - config.w_min) * (t - 1) / max(horizon - 1, 1)).clamp(min=config.w_min)
            delta_b = config.delta_b
            if config.delta_b_quantile is not None:
                q = float(torch.quantile(div, config.delta_b_quantile))
                delta_b = min(config.delta_b_max_mult * config.delta_b, max(config.delta_b, q))
            wd = w * div
            spent = torch.cumsum(wd, 0)
            prev_spent, prev_w = spent - wd, torch.cumsum(w, 0) - w
            budget = config.delta + delta_b * prev_w
            toward_mu = adv * x <= 0
            if config.gate == "hard":
                inside = wd <= torch.clamp(budget - prev_spent, max=config.delta)
                gate[i, idx] = (toward_mu | inside).to(gate.dtype)
            else:
                z = torch.maximum(wd / config.delta, spent / budget)
                gate[i, idx] = torch.where(toward_mu | (z <= 1), 1.0, 1 / z)  # z < 0 if a KL rounds below 0
    if config.surrogate == "ratio":
        pg_losses = -advantages * ratio * gate
    else:
        pg_losses = -advantages * ratio.clamp(max=config.ratio_cap).detach() * log_prob * gate
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = verl_agg_loss(pg_losses, response_mask, config.loss_agg_mode, dp_size=dp_size,
                         batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                         loss_scale_factor=config.loss_scale_factor)
    return loss, gate
