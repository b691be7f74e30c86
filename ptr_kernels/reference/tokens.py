"""The pure-PyTorch reference: docs/math.md, literally and vectorized.

This module is the one readable statement of the math; every kernel is tested against it. It works on
rows `[S, T]` (a padded batch as is, a packed batch scattered into rows), with no Python loop over
sequences or tokens: the prefix budget is a cumsum along the row, the calibrated delta_b a `nanquantile`.
Arithmetic is float64 for float64 inputs and float32 otherwise. Only `log_prob` receives a gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..carried_state import NO_CARRIED_STATE, STATE_S, STATE_SLACK, STATE_W, STATE_WIDTH, CarriedState
from ..config import DEFAULT_CONFIG, PolicyLossConfig
from ..validation import Layout, check_inputs, mask_as_bool, max_seqlen, packed_to_rows


class TokenTerms(NamedTuple):
    """Per-token quantities in rows `[S, T]` (zero at masked positions); `delta_b` is `[S]`."""

    loss: torch.Tensor  # l_t * m_t (carries the gradient to log_prob)
    gate: torch.Tensor  # M_t: 0/1 for the hard gate, g_t for the soft gate; for ppo 1 - zero-gradient clip
    log_ratio: torch.Tensor  # x_t (clamped)
    ratio: torch.Tensor  # r_t
    divergence: torch.Tensor  # D_t
    weight: torch.Tensor  # w_t (1 for dppo and ppo)
    threshold: torch.Tensor  # c_t for cppo, delta_side for dppo, +inf for ppo
    delta_b: torch.Tensor  # delta_b_i, [S] (cppo; zeros otherwise)
    rejected_token: torch.Tensor  # bool: A x > 0 and w D > delta (cppo) / D > delta_side (dppo) / clipped (ppo)
    rejected_budget: torch.Tensor  # bool: A x > 0, w D <= delta, but over the prefix budget (cppo only)
    clip_low: torch.Tensor  # bool, ppo: A < 0 and r < 1 - clip_ratio_low
    clip_high: torch.Tensor  # bool, ppo: A > 0 and r > 1 + clip_ratio_high
    clip_dual: torch.Tensor  # bool, ppo: A < 0 and the dual-clip bound -A c is the loss
    mask: torch.Tensor  # bool m_t


# verl's agg_loss divides a sequence's sum by n_i + 1e-8 in seq-mean-token-mean (docs/math.md section 6)
SEQ_MEAN_EPS = 1e-8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def divergence(log_prob: torch.Tensor, old_log_prob: torch.Tensor, kind: str) -> torch.Tensor:
    """Binary divergences (docs/math.md) between pi = exp(log_prob) and mu = exp(old_log_prob)."""
    pi, mu = log_prob.exp(), old_log_prob.exp()
    if kind == "binary_tv":
        return (pi - mu).abs()
    if kind == "binary_kl":
        return mu * (old_log_prob - log_prob) + (1 - mu) * torch.log((1 - mu + 1e-8) / (1 - pi + 1e-8))
    raise ValueError(f"unknown divergence {kind!r}")


def position_weight(positions: torch.Tensor, horizon: torch.Tensor, w_min: float) -> torch.Tensor:
    """w_t = max(w_min, 1 - (1 - w_min) (t - 1) / max(T_w - 1, 1)) for 1-based positions t."""
    span = (horizon - 1).clamp(min=1).to(positions.dtype)
    return (1 - (1 - w_min) * (positions - 1) / span).clamp(min=w_min)


def calibrated_delta_b(div: torch.Tensor, mask: torch.Tensor, config: PolicyLossConfig) -> torch.Tensor:
    """delta_b_i per row `[S]`: fixed, or clamp(k * Quantile_q(D over the row), delta_b, mult * delta_b)."""
    S = div.shape[0]
    if config.delta_b_quantile is None:
        return div.new_full((S,), config.delta_b)
    if div.numel() == 0:  # no rows or no positions: every row is empty (and quantile rejects empty input)
        return div.new_full((S,), config.delta_b)
    q = config.delta_b_quantile_scale * torch.nanquantile(torch.where(mask, div, torch.nan), config.delta_b_quantile,
                                                          dim=1)
    q = torch.nan_to_num(q, nan=config.delta_b)  # empty rows: the value is never used
    return q.clamp(min=config.delta_b, max=config.delta_b_max_mult * config.delta_b)


def _finite_or_nan(t: torch.Tensor) -> torch.Tensor:
    """+-inf as NaN (docs/math.md section 10)."""
    return torch.where(t.isinf(), torch.nan, t)


def valid_values(t: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype` at valid positions, 0 at masked ones (whatever they hold: garbage never reaches the math).

    At a valid position +-inf becomes NaN: a non-finite input is not data, and it must show as a NaN loss
    (docs/math.md section 10); NaN stays NaN. The NaN is added rather than selected, so that the token's
    gradient is NaN too, as the kernel's.
    """
    t = t.to(dtype)
    return torch.where(mask, t + torch.where(t.isinf(), torch.nan, 0.0), 0.0)


def token_terms(log_prob, old_log_prob, advantages, mask, config: PolicyLossConfig, *,
                rollout_is_weights=None, padded_width: Optional[int] = None, divergence_values=None,
                carried: CarriedState = NO_CARRIED_STATE) -> TokenTerms:
    """The per-token math of docs/math.md on rows: `log_prob`, `old_log_prob`, `mask` `[S, T]`; advantages `[S, T]` or `[S]`.

    `padded_width` is T_w for `length_mode="padded"` (default: the row width T). `old_log_prob`, `advantages`
    and `rollout_is_weights` are detached: only `log_prob` carries a gradient. `divergence_values` `[S, T]`:
    D_t given (the Top-K divergences of docs/math.md section 7, from logits) instead of the binary one.
    A row that is a shard of a longer sequence (docs/math.md section 8) takes its `carried` state: `initial_state
    [S, 3]` (the prefix before the shard: the hard gate reads its slack, the soft gate S and W), `position_offset
    [S]`, `sequence_length [S]` (T_w) and `sequence_delta_b [S]`, each None for an unsplit sequence.
    """
    dt = compute_dtype(log_prob.dtype)
    S, T = log_prob.shape
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(S, T)
    lp = valid_values(log_prob, mask, dt)
    olp = valid_values(old_log_prob.detach(), mask, dt)
    adv = valid_values(advantages.detach(), mask, dt)
    m = mask.to(dt)

    x = lp - olp
    if config.log_ratio_clamp is not None:  # NaN passes with its gradient: a diverged token's gradient shows too
        x = torch.where(x.isnan(), x, x.clamp(-config.log_ratio_clamp, config.log_ratio_clamp))
    ratio = x.detach().exp()  # r_t of the decisions and the metrics
    # r_t of the loss, with gradient. A token with A = 0 contributes exactly 0 (loss and gradient) even without
    # the clamp, where exp(x) overflows and -0 * inf would be NaN: there the exponent is capped at 0 (NaN stays).
    r = torch.where(adv == 0, torch.where(x.isnan(), x, x.clamp(max=0)), x).exp()
    with torch.no_grad():
        if divergence_values is None:
            div = divergence(lp, olp, config.divergence) * m
        else:
            div = valid_values(divergence_values.detach(), mask, dt)
        toward_mu = adv * x <= 0  # moves back toward the rollout policy are always kept
        no_flag = torch.zeros_like(mask)
        ones = torch.ones_like(m)
        delta_b = lp.new_zeros(S)
        clip_low = clip_high = clip_dual = rejected_budget = no_flag

        if config.method == "cppo":
            positions = torch.arange(1, T + 1, device=lp.device, dtype=dt)
            if carried.position_offset is not None:  # global positions of a shard
                positions = positions + carried.position_offset.to(dt)[:, None]
            if carried.sequence_length is not None:
                horizon = carried.sequence_length.to(dt)[:, None]
            elif config.length_mode == "sequence":
                horizon = (mask * positions).amax(dim=1, keepdim=True) if T else lp.new_zeros(S, 1)
            elif config.length_mode == "padded":
                horizon = lp.new_full((), T if padded_width is None else padded_width)
            else:
                horizon = lp.new_full((), config.length_mode)
            weight = position_weight(positions, horizon, config.w_min).expand(S, T) * m
            if carried.sequence_delta_b is None:
                delta_b = calibrated_delta_b(div, mask, config)
            else:
                delta_b = _finite_or_nan(carried.sequence_delta_b.detach().to(dt))
            step = weight * div
            # exclusive prefix sums S_{t-1}, W_{t-1}: the budget at t uses the prefix before t
            prefix_div = torch.cat([step.new_zeros(S, 1), torch.cumsum(step, dim=1)[:, :-1]], dim=1)
            prefix_weight = torch.cat([step.new_zeros(S, 1), torch.cumsum(weight, dim=1)[:, :-1]], dim=1)
            slack = delta_b[:, None] * prefix_weight - prefix_div  # delta_b_i W_{t-1} - S_{t-1}
            if carried.initial_state is not None:  # the prefix of the earlier shards: its slack, S and W as carried
                state = _finite_or_nan(carried.initial_state.detach().to(dt))
                slack = slack + state[:, STATE_SLACK, None]
                prefix_div = prefix_div + state[:, STATE_S, None]
                prefix_weight = prefix_weight + state[:, STATE_W, None]
            budget = config.delta + delta_b[:, None] * prefix_weight
            threshold = torch.minimum(torch.full_like(budget, config.delta), config.delta + slack)
            inside = step <= threshold
            rejected_token = ~toward_mu & (step > config.delta) & mask
            rejected_budget = ~toward_mu & ~inside & ~rejected_token & mask
            if config.gate == "hard":
                gate = (toward_mu | inside).to(dt)
            else:
                z = torch.maximum(step / config.delta, (prefix_div + step) / budget)
                # min(1, 1/z) for z > 0; z >= 0 in exact arithmetic, but a rounded binary KL can be < 0,
                # where 1/z would be a huge negative "gate": z <= 1 is inside, as for the hard gate
                gate = torch.where(toward_mu | (z <= 1), ones, 1 / z)
                gate = torch.where(z.isnan(), z, gate)
            gate = torch.where(threshold.isnan(), threshold, gate)  # a NaN budget (state, delta_b, D) shows
        elif config.method == "dppo":
            weight = m
            # filled tensors of dtype dt: torch.where on two Python floats would round them to float32 first,
            # and new_tensor would copy from the host
            threshold = torch.where(adv > 0, torch.full_like(adv, config.delta_high_value),
                                    torch.full_like(adv, config.delta_low_value))
            inside = div <= threshold
            gate = (toward_mu | inside).to(dt)
            rejected_token = ~toward_mu & ~inside & mask
        else:  # ppo
            weight = m
            threshold = torch.full_like(m, torch.inf)
            clip_high = (adv > 0) & (ratio > 1 + config.clip_ratio_high) & mask
            clip_low = (adv < 0) & (ratio < 1 - config.clip_ratio_low) & mask
            if config.clip_ratio_c is not None:
                clipped = ratio.clamp(1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
                clip_dual = (adv < 0) & (torch.maximum(ratio, clipped) > config.clip_ratio_c) & mask
            rejected_token = clip_low | clip_high | clip_dual
            gate = (~rejected_token).to(dt)

        if config.method != "ppo":  # a NaN divergence (e.g. given from logits) shows in the loss
            gate = torch.where(div.isnan(), div, gate)

    # a zero advantage contributes exactly 0, a NaN gate from a NaN budget included, unless the token's own
    # log-ratio or divergence is NaN (docs/math.md section 10)
    gate_of_loss = torch.where((adv == 0) & ~x.isnan() & ~div.isnan(), 0.0, gate)
    if config.method == "ppo":
        unclipped = -adv * r
        clipped = -adv * r.clamp(1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
        loss = torch.maximum(unclipped, clipped)
        if config.clip_ratio_c is not None:
            # the bound replaces the loss only where strictly lower: at a tie the token keeps its whole
            # gradient (torch.minimum would split it in half), as the dual-clip flag (bound > loss) says
            bound = -adv * config.clip_ratio_c
            loss = torch.where((adv < 0) & (bound < loss), bound, loss)
    elif config.surrogate == "ratio":
        loss = -adv * r * gate_of_loss
    else:  # "logp": the gradient -A r M with the ratio capped and held constant
        loss = -adv * ratio.clamp(max=config.ratio_cap) * lp * gate_of_loss
    if rollout_is_weights is not None:
        weights = valid_values(rollout_is_weights.detach(), mask, dt)
        # a NaN weight shows in the loss and in the token's gradient, whatever path (clip, gate) that takes
        loss = torch.where(weights.isnan(), lp * weights, loss * weights)
    loss = torch.where(mask, loss, 0.0)
    return TokenTerms(loss=loss, gate=gate * m, log_ratio=x * m, ratio=ratio * m, divergence=div,
                      weight=weight, threshold=threshold, delta_b=delta_b, rejected_token=rejected_token,
                      rejected_budget=rejected_budget, clip_low=clip_low, clip_high=clip_high,
                      clip_dual=clip_dual, mask=mask)


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_agg_mode: str, *, dp_size: float = 1,
              batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """The aggregation of docs/math.md (verl's `agg_loss`) on rows `[S, T]`; an empty batch gives 0, never NaN."""
    m = mask.to(token_loss.dtype)
    if isinstance(dp_size, torch.Tensor):  # a one-element tensor: keep the loss 0-dim; a constant (no gradient)
        dp_size = dp_size.detach().to(token_loss.dtype).reshape(())
    seq_loss = token_loss.sum(dim=1)  # L_i
    seq_tokens = m.sum(dim=1)  # n_i
    if loss_agg_mode == "token-sum":
        return seq_loss.sum() * dp_size
    if loss_agg_mode == "token-mean":
        n_tok = seq_tokens.sum() if batch_num_tokens is None else batch_num_tokens
        return _safe_div(seq_loss.sum(), n_tok) * dp_size
    non_empty = seq_tokens > 0
    n_seq = non_empty.sum() if global_batch_size is None else global_batch_size
    if loss_agg_mode == "seq-mean-token-mean":  # verl's n_i + 1e-8 (exactly n_i in float32)
        per_seq = torch.where(non_empty, seq_loss / (seq_tokens + SEQ_MEAN_EPS), 0.0)
        return _safe_div(per_seq.sum(), n_seq) * dp_size
    seq_mean = _safe_div(seq_loss.sum(), n_seq) * dp_size
    if loss_agg_mode == "seq-mean-token-sum":
        return seq_mean
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = token_loss.shape[1] if loss_scale_factor is None else loss_scale_factor
        return _safe_div(seq_mean, scale)  # T = 0: an empty batch, 0 not NaN
    raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}")


def _safe_div(num: torch.Tensor, den) -> torch.Tensor:
    """num / den, and 0 where den == 0 (num is then 0 too: nothing to average)."""
    # a number becomes a filled device tensor (as_tensor would copy it from the host, a sync on CUDA)
    den = den.detach().to(num.dtype).reshape(()) if isinstance(den, torch.Tensor) else num.new_full((), den)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


def metrics(terms: TokenTerms, config: PolicyLossConfig) -> dict:
    """The metrics of docs/math.md section 9 as 0-dim tensors (no host sync), in the order of `METHOD_METRICS`;
    means over valid tokens, 0 for an empty batch."""
    m = terms.mask
    dt = terms.loss.dtype
    n_tok = m.sum().to(dt)
    with torch.no_grad():
        def frac(flags):
            return _safe_div(flags.to(dt).sum(), n_tok)

        rejected = terms.rejected_token | terms.rejected_budget
        out = {
            "mask_frac": frac(rejected),
            "ppo_kl": _safe_div(-terms.log_ratio.detach().sum(), n_tok),
            "divergence_mean": _safe_div(terms.divergence.sum(), n_tok),
        }
        if config.method != "ppo":
            out["ratio_cap_frac"] = frac(m & ~rejected & (terms.ratio > config.ratio_cap))
        if config.method == "cppo":
            non_empty = m.any(dim=1)
            out["mask_frac_token"] = frac(terms.rejected_token)
            out["mask_frac_budget"] = frac(terms.rejected_budget)
            out["delta_b_mean"] = _safe_div(torch.where(non_empty, terms.delta_b, 0.0).sum(),
                                            non_empty.sum().to(dt))
        if config.method == "ppo":
            out["clip_frac_low"] = frac(terms.clip_low)
            out["clip_frac_high"] = frac(terms.clip_high)
            out["clip_frac_dual"] = frac(terms.clip_dual)
    return out


def policy_loss_reference(log_prob, old_log_prob, advantages, response_mask=None, *, cu_seqlens=None,
                          config: Optional[PolicyLossConfig] = None, rollout_is_weights=None, dp_size=1,
                          batch_num_tokens=None, global_batch_size=None, divergence_values=None,
                          initial_state=None, output_final_state: bool = False, position_offset=None,
                          sequence_length=None, sequence_delta_b=None):
    """The reference policy loss: `(loss, metrics)`, same contract as `ptr_kernels.policy_loss` (with
    `output_final_state`: `(loss, metrics, final_state)`, docs/math.md section 8), its inputs validated as there.

    `divergence_values` (shape of log_prob): D_t given instead of the binary divergence (a Top-K D from logits).
    """
    config = config or DEFAULT_CONFIG
    carried = CarriedState(initial_state, position_offset, sequence_length, sequence_delta_b, output_final_state)
    normalizers = (dp_size, batch_num_tokens, global_batch_size)
    layout = check_inputs(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                          normalizers, config=config, carried=carried)
    return reference_policy_loss(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                                 config=config, layout=layout, normalizers=normalizers, carried=carried,
                                 divergence_values=divergence_values)


def reference_policy_loss(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, *,
                          config: PolicyLossConfig, layout: Layout, normalizers: tuple,
                          carried: CarriedState = NO_CARRIED_STATE, divergence_values=None):
    """`policy_loss(..., backend="reference")` on validated inputs (`layout` from `validation.check_inputs`;
    `normalizers` = (dp_size, batch_num_tokens, global_batch_size)).

    Packed input is scattered into rows of the longest sequence's width (one host sync: the reference
    is the readable statement, not the fast path). `divergence_values` (shape of log_prob): D_t given instead
    of the binary divergence (the from-logits reference passes its Top-K D).
    """
    mask = mask_as_bool(response_mask, log_prob)
    if layout.packed:
        width = max_seqlen(cu_seqlens)
        rows = lambda t: None if t is None else packed_to_rows(t, cu_seqlens, width)  # noqa: E731
        log_prob, old_log_prob, rollout_is_weights = rows(log_prob), rows(old_log_prob), rows(rollout_is_weights)
        divergence_values = rows(divergence_values)
        advantages = advantages if layout.adv_per_seq else rows(advantages)
        mask = packed_to_rows(mask, cu_seqlens, width, fill=False)
    terms = token_terms(log_prob, old_log_prob, advantages, mask, config,
                        rollout_is_weights=rollout_is_weights, divergence_values=divergence_values, carried=carried)
    dp_size, batch_num_tokens, global_batch_size = normalizers
    loss = aggregate(terms.loss, mask, config.loss_agg_mode, dp_size=dp_size,
                     batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                     loss_scale_factor=layout.loss_scale_factor)
    if carried.output_final_state:
        return loss, metrics(terms, config), final_state(terms, config, carried.initial_state)
    return loss, metrics(terms, config)


def final_state(terms: TokenTerms, config: PolicyLossConfig, initial_state=None) -> torch.Tensor:
    """The carried state after the rows `[S, 3]` (ptr_kernels.carried_state): initial_state plus the rows'
    totals (sum w (delta_b_i - D), sum w D, sum w); for dppo and ppo the state passes through."""
    dt = terms.loss.dtype
    S = terms.mask.shape[0]
    state = terms.loss.new_zeros(S, STATE_WIDTH) if initial_state is None else \
        _finite_or_nan(initial_state.detach().to(dt))
    if config.method != "cppo":
        return state.clone()
    with torch.no_grad():
        slack = terms.weight * (terms.delta_b[:, None] - terms.divergence)  # columns in carried_state's order
        totals = torch.stack([slack.sum(dim=1), (terms.weight * terms.divergence).sum(dim=1),
                              terms.weight.sum(dim=1)], dim=1)
    return state + totals
