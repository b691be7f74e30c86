"""Shared `@triton.jit` pieces of every kernel: loads, divergences, order keys, tiles of positions and THE
trust-region step (docs/math.md sections 2-5).

Every kernel that decides a token's mask calls `trust_region_step`; the token kernel gets D from
`binary_divergence`, the from-logits path hands it a D computed over the vocabulary. Branch ids and columns are
`ops/ids.py`'s, read as `ids.NAME`; the host encodes a config into them in `ops/plan.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import ids

@triton.jit
def valid_positions(mask_ptr, offs, inside, HAS_MASK: tl.constexpr):
    """m_t as int1 for one tile (False past the end of the sequence); any nonzero mask value is valid."""
    if HAS_MASK:
        return inside & (tl.load(mask_ptr + offs, mask=inside, other=0) != 0)
    return inside


@triton.jit
def finite_or_nan(v):
    """+-inf as NaN: a non-finite input at a valid position is not data and must show (docs/math.md section 10)."""
    return tl.where(tl.abs(v) == float("inf"), float("nan"), v)


@triton.jit
def load_zeroed(ptr, offs, valid):
    """A float tile in float32: masked positions 0 (they may hold anything), +-inf at valid ones NaN."""
    return tl.where(valid, finite_or_nan(tl.load(ptr + offs, mask=valid, other=0.0).to(tl.float32)), 0.0)


@triton.jit
def nan_max(a, b):
    """max that propagates NaN (Triton's default max, like fmax, drops it: a NaN must show in the loss)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_min(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def one_minus_exp(x):
    """1 - exp(x) without the cancellation of 1 - exp(x) near 0 (a Taylor series for |x| < 1/4)."""
    small = tl.abs(x) < 0.25
    xs = tl.where(small, x, 0.0)  # the series only where it is used: no overflow in discarded lanes
    series = -xs * (1.0 + xs * (0.5 + xs * (1.0 / 6 + xs * (1.0 / 24 + xs * (1.0 / 120 + xs * (
        1.0 / 720 + xs * (1.0 / 5040 + xs * (1.0 / 40320 + xs * (1.0 / 362880)))))))))
    return tl.where(small, series, 1.0 - tl.exp(x))


@triton.jit
def binary_divergence(lp, olp, valid, DIVERGENCE: tl.constexpr):
    """D_t (docs/math.md section 2) between pi = exp(lp) and mu = exp(olp), 0 at masked positions."""
    if DIVERGENCE == ids.DIV_BINARY_KL:
        # 1 - pi and 1 - mu near 0 decide the second term: compute them without cancellation
        d = tl.exp(olp) * (olp - lp) + one_minus_exp(olp) * tl.log(
            (one_minus_exp(olp) + 1e-8) / (one_minus_exp(lp) + 1e-8))
    else:
        d = tl.abs(tl.exp(lp) - tl.exp(olp))
    return tl.where(valid, d, 0.0)


@triton.jit
def log_ratio(lp, olp, clamp):
    """x_t = clamp(lp - olp, -L, L) and d x_t / d lp (1 inside, 0 where the clamp binds; NaN stays NaN)."""
    diff = lp - olp
    x = nan_min(nan_max(diff, -clamp), clamp)  # clamp = inf when disabled
    inside = (diff >= -clamp) & (diff <= clamp)
    return x, tl.where(inside | (diff != diff), 1.0, 0.0)


@triton.jit
def order_key(d):
    """int32 key with the order of the float32 value (flip the magnitude bits of negatives)."""
    bits = d.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def key_value(key):
    """Inverse of `order_key` (the same bit flip) back to float32."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def position_weight(pos, span, w_min):
    """w_t = max(w_min, 1 - (1 - w_min)(t - 1) / max(T_w - 1, 1)) for 0-based `pos` = t - 1 and
    `span` = max(T_w - 1, 1) `[ROWS, 1]`."""
    return tl.maximum(w_min, 1.0 - (1.0 - w_min) * pos.to(tl.float32) / span)


@triton.jit
def trust_region_step(
    lp, x, dx, r, d, adv, valid, weight, delta_b, carry_slack, carry_s, carry_w, params_ptr,
    METHOD: tl.constexpr, GATE: tl.constexpr, SURROGATE: tl.constexpr, CARRY_SW: tl.constexpr,
):
    """One `[ROWS, BLOCK]` tile of the trust region and the per-token loss (docs/math.md sections 3-5).

    Inputs per token: log_prob `lp`, log-ratio `x` and its derivative `dx`, ratio `r`, divergence `d`,
    advantage `adv`, validity, the position weight (cppo); per row `[ROWS]`: delta_b_i and the prefix
    carried from earlier tiles: sum w (delta_b_i - D) (the budget slack), S and W (the soft gate's, and the
    carried state's when CARRY_SW); the config's numbers at `params_ptr` (P_*).
    Returns `(loss, grad, rejected_token, rejected_budget, clip_low, clip_high, clip_dual, carry_slack,
    carry_s, carry_w)`: l_t and d l_t / d lp (0 at masked positions), the metric flags, the new carries.
    """
    delta = tl.load(params_ptr + ids.P_DELTA)
    toward = adv * x <= 0.0  # moves back toward the rollout policy are always kept
    none = valid & ~valid  # flags a method does not set stay False
    rej_budget = none
    clip_low = none
    clip_high = none
    clip_dual = none
    if METHOD == ids.METHOD_PPO:  # clip, clip-higher, dual clip (clip_c = inf when off)
        ratio_lo = tl.load(params_ptr + ids.P_RATIO_LO)
        ratio_hi = tl.load(params_ptr + ids.P_RATIO_HI)
        clip_c = tl.load(params_ptr + ids.P_CLIP_C)
        r_clip = nan_min(nan_max(r, ratio_lo), ratio_hi)
        unclipped = -adv * r
        clipped = -adv * r_clip
        loss = nan_max(unclipped, clipped)
        grad = tl.where(clipped > unclipped, 0.0, -adv * r * dx)  # the clipped branch is constant
        # -A c for A < 0 (c = inf when the dual clip is off; no 0 * inf in the other lanes)
        dual_bound = tl.where(adv < 0.0, -adv, 1.0) * clip_c
        dual = (adv < 0.0) & (loss > dual_bound)
        loss = tl.where(dual, dual_bound, loss)
        grad = tl.where(dual, 0.0, grad)
        clip_low = valid & (adv < 0.0) & (r < ratio_lo)
        clip_high = valid & (adv > 0.0) & (r > ratio_hi)
        clip_dual = valid & (adv < 0.0) & (tl.maximum(r, r_clip) > clip_c)
        rej_token = clip_low | clip_high | clip_dual
    else:
        if METHOD == ids.METHOD_CPPO:
            step = weight * d
            # c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1}), the budget as one running sum of
            # w (delta_b - D): an exclusive scan = inclusive cumsum minus the element, plus the carry
            slack_step = weight * (delta_b[:, None] - d)
            slack_prev = carry_slack[:, None] + (tl.cumsum(slack_step, axis=1) - slack_step)
            limit = nan_min(delta, delta + slack_prev)  # c_t
            inside = step <= limit
            rej_token = valid & ~toward & (step > delta)
            rej_budget = valid & ~toward & ~inside & ~rej_token
            if GATE == ids.GATE_SOFT:
                s_prev = carry_s[:, None] + (tl.cumsum(step, axis=1) - step)
                w_prev = carry_w[:, None] + (tl.cumsum(weight, axis=1) - weight)
                z = nan_max(step / delta, (s_prev + step) / (delta + delta_b[:, None] * w_prev))
                # min(1, 1/z) for z >= 0; a rounded binary_kl D (and z) can be a hair below 0: still 1
                keep = toward | (z <= 1.0)
                gate = tl.where(keep, 1.0, 1.0 / tl.where(keep, 1.0, z))
                gate = tl.where(z != z, z, gate)
            else:
                gate = (toward | inside).to(tl.float32)
            if GATE == ids.GATE_SOFT or CARRY_SW:
                carry_s += tl.sum(step, axis=1)
                carry_w += tl.sum(weight, axis=1)
            gate = tl.where(limit != limit, limit, gate)  # a NaN budget (state, delta_b or a D before) shows
            carry_slack += tl.sum(slack_step, axis=1)
        else:  # dppo
            threshold = tl.where(adv > 0.0, tl.load(params_ptr + ids.P_DELTA_HIGH),
                                 tl.load(params_ptr + ids.P_DELTA_LOW))
            inside = d <= threshold
            rej_token = valid & ~toward & ~inside
            gate = (toward | inside).to(tl.float32)
        if SURROGATE == ids.SURROGATE_LOGP:
            capped = nan_min(r, tl.load(params_ptr + ids.P_RATIO_CAP))
            grad = -adv * capped * gate
            loss = grad * lp
        else:
            loss = -adv * r * gate
            grad = loss * dx
    if METHOD != ids.METHOD_PPO:  # a NaN divergence (given from logits) must show too, not read as "rejected"
        loss = tl.where(d != d, d, loss)
        grad = tl.where(d != d, d, grad)
    # a zero advantage contributes exactly 0, even where exp overflowed (0 * inf) or the budget is NaN, unless
    # the token's own log-ratio or divergence is NaN
    counts = valid & ((adv != 0.0) | (x != x) | (d != d))
    loss = tl.where(counts, loss, 0.0)
    grad = tl.where(counts, grad, 0.0)
    return loss, grad, rej_token, rej_budget, clip_low, clip_high, clip_dual, carry_slack, carry_s, carry_w


@triton.jit
def tile_positions(start, length, off, BLOCK: tl.constexpr):
    """Positions `[1, BLOCK]` (0-based in the sequence), in-sequence flags and int64 offsets `[ROWS, BLOCK]`."""
    pos = off + tl.arange(0, BLOCK)[None, :]
    inside = pos < length[:, None]
    return pos, inside, start[:, None] + pos


@triton.jit
def divergence_tile(lp_ptr, olp_ptr, div_ptr, offs, valid, DIVERGENCE: tl.constexpr):
    """D over one tile: given (from-logits path) or binary from log_prob and old_log_prob."""
    if DIVERGENCE == ids.DIV_GIVEN:
        return load_zeroed(div_ptr, offs, valid)
    return binary_divergence(load_zeroed(lp_ptr, offs, valid), load_zeroed(olp_ptr, offs, valid), valid,
                             DIVERGENCE)


@triton.jit
def tile_keys(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, off,
               DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Order keys of D over one tile, and the validity of each position."""
    pos, inside, offs = tile_positions(start, length, off, BLOCK)
    valid = valid_positions(mask_ptr, offs, inside, HAS_MASK)
    return order_key(divergence_tile(lp_ptr, olp_ptr, div_ptr, offs, valid, DIVERGENCE)), valid
