"""The literal oracle: docs/math.md token by token, in plain Python float64 arithmetic.

Written from the math alone, independently of `reference.py`: one loop over sequences, one over their
positions (the sequential statement of cppo's prefix budget), `math` on Python floats, and the gradient
d loss / d log_prob derived by hand per token instead of by autograd. It is slow and obviously correct;
the tests and `ptr-kernels fuzz` check every fast implementation against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..config import PolicyLossConfig
from ..validation import check_inputs, mask_as_bool


@dataclass
class LiteralResult:
    """What the literal loop computes. Tensors are float64/bool on the CPU, in the input layout.

    loss: the aggregated scalar.
    loss_magnitude: the same aggregation of |rho_t l_t|: the size of the terms the loss sums, the scale of
        its rounding error (the loss itself can cancel to near 0).
    gate: M_t per token (0/1, or g_t for the soft gate; for ppo 0 where clipping zeroes the gradient);
        0 at masked positions.
    grad: d loss / d log_prob per token; 0 at masked positions.
    metrics: the metrics of docs/math.md, the same keys as `reference.metrics`.
    near_tie: tokens whose gate decision (or clamp boundary) lies within `tie_rtol` of flipping.
    """

    loss: float
    loss_magnitude: float
    gate: torch.Tensor
    grad: torch.Tensor
    metrics: dict
    near_tie: torch.Tensor


def _close(a: float, b: float, scale: float, tie_rtol: float) -> bool:
    return abs(a - b) <= tie_rtol * max(abs(a), abs(b), scale)


def _exp(x: float) -> float:
    """exp(x), inf where it overflows a float64 (math.exp raises there)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _divergence(lp: float, olp: float, kind: str) -> float:
    """Binary TV |pi - mu| or binary KL(mu || pi) on {y_t, rest}."""
    pi, mu = _exp(lp), _exp(olp)
    if kind == "binary_tv":
        return abs(pi - mu)
    return mu * (olp - lp) + (1 - mu) * math.log((1 - mu + 1e-8) / (1 - pi + 1e-8))


def _quantile(values: List[float], q: float) -> float:
    """Linear interpolation between order statistics (torch.quantile's default)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def policy_loss_literal(log_prob, old_log_prob, advantages, response_mask=None, *, cu_seqlens=None,
                        config: Optional[PolicyLossConfig] = None, rollout_is_weights=None, dp_size=1,
                        batch_num_tokens=None, global_batch_size=None, gate_override=None,
                        tie_rtol: float = 1e-9, divergence_values=None) -> LiteralResult:
    """The policy loss of docs/math.md, token by token. Same inputs as `ptr_kernels.policy_loss` (padded `[B, T]` with
    `response_mask`, or packed `[N]` with `cu_seqlens`), any float dtype (read as float64).

    `gate_override`: optional `(where, value)` pair of `[B, T]`/`[N]` tensors; at `where` the decision M_t
    used by the loss and gradient is replaced by `value` (the fuzz uses it to show that a disagreement is
    only a near tie); the metrics keep the literal decisions. `divergence_values` (shape of log_prob): D_t
    given (the Top-K divergence of docs/math.md section 7, `oracle_logits`) instead of the binary one.
    """
    config = config or PolicyLossConfig()
    layout = check_inputs(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights)
    shape = tuple(log_prob.shape)
    flat = lambda t: t.detach().reshape(-1).to(torch.float64).tolist()  # noqa: E731
    lp_all, olp_all = flat(log_prob), flat(old_log_prob)
    valid_all = mask_as_bool(response_mask, log_prob).reshape(-1).tolist()
    rw_all = flat(rollout_is_weights) if rollout_is_weights is not None else None
    dv_all = flat(divergence_values) if divergence_values is not None else None
    adv_all = flat(advantages)
    override = None
    if gate_override is not None:
        override = (gate_override[0].reshape(-1).tolist(), flat(gate_override[1]))

    # sequences as lists of flat indices; position t = 1 + offset from the sequence's first position
    if layout.packed:
        cu = [int(c) for c in cu_seqlens.tolist()]
        seqs = [list(range(cu[i], cu[i + 1])) for i in range(layout.num_seqs)]
        width = max((len(s) for s in seqs), default=0)  # T_w for length_mode="padded": the longest sequence
    else:
        B, T = shape
        seqs = [list(range(i * T, (i + 1) * T)) for i in range(B)]
        width = T

    def adv_of(i, k):
        return adv_all[i] if layout.adv_per_seq else adv_all[k]

    c = config
    n_total = len(lp_all)
    gate = [0.0] * n_total
    dl = [0.0] * n_total  # d l_t / d log_prob_t (before the aggregation weight)
    near_tie = [False] * n_total
    seq_loss, seq_abs, seq_n = [], [], []
    counts = dict(rejected=0, token=0, budget=0, clip_low=0, clip_high=0, clip_dual=0, ratio_capped=0)
    kl_sum = div_sum = 0.0
    delta_bs = []

    for i, seq in enumerate(seqs):
        valid = [(t, k) for t, k in enumerate(seq, start=1) if valid_all[k]]
        L_i = L_abs = 0.0
        seq_n.append(len(valid))
        if not valid:
            seq_loss.append(0.0)
            seq_abs.append(0.0)
            continue
        D = {k: dv_all[k] if dv_all is not None else _divergence(lp_all[k], olp_all[k], c.divergence)
             for _, k in valid}
        if c.method == "cppo":
            horizon = {"sequence": valid[-1][0], "padded": width}.get(c.length_mode, c.length_mode)
            if c.delta_b_quantile is None:
                delta_b = c.delta_b
            else:
                scaled = c.delta_b_quantile_scale * _quantile(list(D.values()), c.delta_b_quantile)
                delta_b = min(c.delta_b_max_mult * c.delta_b, max(c.delta_b, scaled))
            delta_bs.append(delta_b)
        S = W = 0.0  # prefix sums over the valid positions before t
        for t, k in valid:
            lp, olp, A = lp_all[k], olp_all[k], adv_of(i, k)
            raw = lp - olp
            x = raw
            clamp_active = False
            if c.log_ratio_clamp is not None:
                clamp_active = abs(raw) > c.log_ratio_clamp
                x = max(-c.log_ratio_clamp, min(c.log_ratio_clamp, raw))
                near_tie[k] |= _close(abs(raw), c.log_ratio_clamp, 0.0, tie_rtol)
            r = _exp(x)
            d = D[k]
            toward_mu = A * x <= 0
            div_sum += d
            kl_sum -= x

            if c.method == "cppo":
                w = max(c.w_min, 1 - (1 - c.w_min) * (t - 1) / max(horizon - 1, 1))
                thr = min(c.delta, c.delta + delta_b * W - S)
                inside = w * d <= thr
                over_token = w * d > c.delta
                if not toward_mu:
                    scale = c.delta + delta_b * W + S
                    near_tie[k] |= _close(w * d, thr, scale, tie_rtol) or _close(w * d, c.delta, 0.0, tie_rtol)
                if c.gate == "hard":
                    M = 1.0 if (toward_mu or inside) else 0.0
                else:
                    z = max(w * d / c.delta, (S + w * d) / (c.delta + delta_b * W))
                    M = 1.0 if (toward_mu or z <= 1) else 1.0 / z
                rej_token = not toward_mu and over_token
                rej_budget = not toward_mu and not inside and not over_token
                S += w * d
                W += w
            elif c.method == "dppo":
                thr = c.delta_high_value if A > 0 else c.delta_low_value
                inside = d <= thr
                if not toward_mu:
                    near_tie[k] |= _close(d, thr, 0.0, tie_rtol)
                M = 1.0 if (toward_mu or inside) else 0.0
                rej_token, rej_budget = M == 0.0, False
            else:  # ppo: -A * min(r, clip(r)) for A > 0, -A * max(r, clip(r)) for A < 0, capped at -A c
                lo, hi = 1 - c.clip_ratio_low, 1 + c.clip_ratio_high
                clipped = min(max(r, lo), hi)
                clip_high = A > 0 and r > hi
                clip_low = A < 0 and r < lo
                clip_dual = A < 0 and c.clip_ratio_c is not None and max(r, clipped) > c.clip_ratio_c
                if A > 0:
                    near_tie[k] |= _close(r, hi, 0.0, tie_rtol)
                if A < 0:
                    near_tie[k] |= _close(r, lo, 0.0, tie_rtol)
                    if c.clip_ratio_c is not None:
                        near_tie[k] |= _close(max(r, clipped), c.clip_ratio_c, 0.0, tie_rtol)
                counts["clip_high"] += clip_high
                counts["clip_low"] += clip_low
                counts["clip_dual"] += clip_dual
                rej_token = clip_low or clip_high or clip_dual
                rej_budget = False
                M = 0.0 if rej_token else 1.0

            if override is not None and override[0][k]:  # the loss and gradient only; metric flags stay
                M = override[1][k]

            rho = rw_all[k] if rw_all is not None else 1.0
            if c.method == "ppo":
                if A > 0:
                    l_t = -A * min(r, clipped)
                elif A < 0:
                    l_t = -A * max(r, clipped)
                    if c.clip_ratio_c is not None:
                        l_t = min(l_t, -A * c.clip_ratio_c)
                else:
                    l_t = 0.0
                g_t = 0.0 if clamp_active else -A * r * M
            elif c.surrogate == "ratio":
                l_t = -A * r * M
                g_t = 0.0 if clamp_active else -A * r * M
            else:  # logp: the capped ratio is a constant, log_prob carries the gradient
                l_t = -A * min(r, c.ratio_cap) * lp * M
                g_t = -A * min(r, c.ratio_cap) * M
            if A == 0 and not math.isnan(x):  # exactly 0, even where r overflows (docs/math.md)
                l_t = g_t = 0.0
            L_i += rho * l_t
            L_abs += abs(rho * l_t)
            dl[k] = rho * g_t
            gate[k] = M
            counts["rejected"] += rej_token or rej_budget
            counts["token"] += rej_token
            counts["budget"] += rej_budget
            if c.method != "ppo":
                counts["ratio_capped"] += not (rej_token or rej_budget) and r > c.ratio_cap
                near_tie[k] |= _close(r, c.ratio_cap, 0.0, tie_rtol)
        seq_loss.append(L_i)
        seq_abs.append(L_abs)

    # the aggregation, and each token's weight d loss / d l_t
    mode = c.loss_agg_mode
    n_tok = sum(seq_n)
    n_nonempty = sum(1 for n in seq_n if n > 0)
    n_seq = n_nonempty if global_batch_size is None else global_batch_size
    if mode == "token-mean":
        den = n_tok if batch_num_tokens is None else batch_num_tokens
        seq_weight = [dp_size / den if den > 0 else 0.0] * len(seqs)
    elif mode == "token-sum":
        seq_weight = [float(dp_size)] * len(seqs)
    elif mode == "seq-mean-token-mean":
        seq_weight = [dp_size / ((n + 1e-8) * n_seq) if n > 0 and n_seq > 0 else 0.0 for n in seq_n]
    else:
        scale = 1.0
        if mode == "seq-mean-token-sum-norm":
            if c.loss_scale_factor is not None:
                scale = c.loss_scale_factor
            elif layout.packed:
                raise ValueError("loss_scale_factor is required for 'seq-mean-token-sum-norm' with packed input")
            else:
                scale = width
        seq_weight = [dp_size / (n_seq * scale) if n_seq > 0 else 0.0] * len(seqs)
    loss = sum(wt * L for wt, L in zip(seq_weight, seq_loss))
    loss_magnitude = sum(abs(wt) * L for wt, L in zip(seq_weight, seq_abs))
    grad = [0.0] * n_total
    for i, seq in enumerate(seqs):
        for k in seq:
            if valid_all[k]:
                grad[k] = seq_weight[i] * dl[k]

    frac = lambda n: n / n_tok if n_tok else 0.0  # noqa: E731
    metrics = {"mask_frac": frac(counts["rejected"]), "ppo_kl": frac(kl_sum), "divergence_mean": frac(div_sum)}
    if c.method != "ppo":
        metrics["ratio_cap_frac"] = frac(counts["ratio_capped"])
    if c.method == "cppo":
        metrics["mask_frac_token"] = frac(counts["token"])
        metrics["mask_frac_budget"] = frac(counts["budget"])
        metrics["delta_b_mean"] = sum(delta_bs) / len(delta_bs) if delta_bs else 0.0
    if c.method == "ppo":
        metrics["clip_frac_low"] = frac(counts["clip_low"])
        metrics["clip_frac_high"] = frac(counts["clip_high"])
        metrics["clip_frac_dual"] = frac(counts["clip_dual"])

    as_tensor = lambda v, dtype=torch.float64: torch.tensor(v, dtype=dtype).reshape(shape)  # noqa: E731
    return LiteralResult(loss=loss, loss_magnitude=loss_magnitude, gate=as_tensor(gate), grad=as_tensor(grad),
                         metrics=metrics, near_tie=as_tensor(near_tie, torch.bool))
