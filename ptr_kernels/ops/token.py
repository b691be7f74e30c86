"""The fused Triton kernel: SPEC sections 2-5 and the per-sequence partial sums of sections 6 and 8.

Design (docs/kernels.md has the long form):
- 1-D grid over tiles of ROWS sequences (padded rows or packed sequences); a program walks its
  sequences together in blocks of BLOCK positions, `[ROWS, BLOCK]` at a time, up to its longest one, so
  any length and any number of sequences work (offsets in int64). BLOCK follows the mean sequence length
  and ROWS * BLOCK = TILE, so short sequences share a program and long ones get one each.
- cppo carries the running prefix sums across blocks (exclusive scan inside a block = tl.cumsum along
  the row minus the element, plus the carry).
- pass A (only when needed): n_i, the last valid position (T_w for length_mode="sequence" with a mask)
  and, for the calibrated delta_b, #{D <= lo}, #{D < hi} and the range of D. The
  quantile is clamped to [lo, hi] = [delta_b, delta_b_max_mult * delta_b], so the counts settle the
  common cases; otherwise the two order statistics are selected by bisection on order-preserving int32
  keys of the float32 D (one counting pass per bisection step, no sort, no host round trip).
- pass B: per token the mask/gate, the loss and d L_i / d log_prob (backward only multiplies it by the
  aggregation's scale and the upstream gradient), plus per-sequence sums.
- `_reduce_kernel` (one program) turns the per-sequence sums into the loss (SPEC section 6), the backward
  scale and the metrics (section 8); `_scale_grad_kernel` is the whole backward.
Arithmetic is float32 for every input dtype (float64 inputs too: they are read and computed in float32).
Masked positions are replaced by 0 before any arithmetic, so inf/NaN there never reach a result.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ..config import LOSS_AGG_MODES

# Columns of the per-sequence statistics buffer `[S, NUM_STATS]` written by the kernel.
STAT_TOKENS, STAT_REJ_TOKEN, STAT_REJ_BUDGET, STAT_CLIP_LOW, STAT_CLIP_HIGH, STAT_CLIP_DUAL, \
    STAT_KL, STAT_DIV, STAT_DELTA_B = range(9)
NUM_STATS = 9
# The reduction writes the loss and `aux [NUM_AUX]`: the backward scale, then the metrics (reference names).
AUX_SCALE, AUX_METRICS = 0, 1
METRICS = ("mask_frac", "ppo_kl", "divergence_mean", "mask_frac_token", "mask_frac_budget", "delta_b_mean",
           "clip_frac_low", "clip_frac_high", "clip_frac_dual")
METRIC_METHODS = dict(mask_frac="cppo dppo ppo", ppo_kl="cppo dppo ppo", divergence_mean="cppo dppo ppo",
                      mask_frac_token="cppo", mask_frac_budget="cppo", delta_b_mean="cppo",
                      clip_frac_low="ppo", clip_frac_high="ppo", clip_frac_dual="ppo")
NUM_AUX = AUX_METRICS + len(METRICS)

METHOD_IDS = {"cppo": 0, "dppo": 1, "ppo": 2}
# T_w source: the last valid position (or the sequence length when there is no mask), a scalar argument
# (an int horizon, or the padded width), or the longest packed sequence read from device memory.
HORIZON_LAST, HORIZON_ARG, HORIZON_MAX_LEN = 0, 1, 2
MAX_BLOCK = 1024
MIN_BLOCK = 16
TILE = 1024  # ROWS * BLOCK: short sequences share a program, ROWS per tile
REDUCE_BLOCK = 256  # sequences per step of the one-program reduction
SCALE_BLOCK = 1024
NUM_WARPS = 8  # 4 positions per thread: no register spills on sm_90 (4 warps: up to 255 registers and spills)


@triton.jit
def _valid(mask_ptr, offs, inside, HAS_MASK: tl.constexpr):
    """m_t as int1 for one block (False past the end of the sequence)."""
    if HAS_MASK:
        return inside & (tl.load(mask_ptr + offs, mask=inside, other=0) != 0)
    return inside


@triton.jit
def _load_zeroed(ptr, offs, valid):
    """A float block in float32 with masked positions replaced by 0 (they may hold inf/NaN)."""
    return tl.where(valid, tl.load(ptr + offs, mask=valid, other=0.0).to(tl.float32), 0.0)


@triton.jit
def _one_minus_exp(x):
    """1 - exp(x) without the cancellation of 1 - exp(x) near 0 (a Taylor series for |x| < 1/4)."""
    series = -x * (1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (
        1.0 / 720 + x * (1.0 / 5040 + x * (1.0 / 40320 + x * (1.0 / 362880)))))))))
    return tl.where(tl.abs(x) < 0.25, series, 1.0 - tl.exp(x))


@triton.jit
def _divergence(lp, olp, valid, KL: tl.constexpr):
    """D_t of SPEC section 2 (binary_tv or binary_kl), 0 at masked positions."""
    pi = tl.exp(lp)
    mu = tl.exp(olp)
    if KL:
        # 1 - pi and 1 - mu near 0 decide the second term: compute them without cancellation
        d = mu * (olp - lp) + _one_minus_exp(olp) * tl.log(
            (_one_minus_exp(olp) + 1e-8) / (_one_minus_exp(lp) + 1e-8))
    else:
        d = tl.abs(pi - mu)
    return tl.where(valid, d, 0.0)


@triton.jit
def _order_key(d):
    """int32 key with the order of the float32 value (flip the magnitude bits of negatives)."""
    bits = d.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    """Inverse of `_order_key` (the same bit flip) back to float32."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _tile(start, length, off, BLOCK: tl.constexpr):
    """Positions `[1, BLOCK]` (0-based in the sequence), in-sequence flags and int64 offsets `[ROWS, BLOCK]`."""
    pos = off + tl.arange(0, BLOCK)[None, :]
    inside = pos < length[:, None]
    return pos, inside, start[:, None] + pos


@triton.jit
def _tile_keys(lp_ptr, olp_ptr, mask_ptr, start, length, off,
               KL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Order keys of D over one tile, and the validity of each position."""
    pos, inside, offs = _tile(start, length, off, BLOCK)
    valid = _valid(mask_ptr, offs, inside, HAS_MASK)
    d = _divergence(_load_zeroed(lp_ptr, offs, valid), _load_zeroed(olp_ptr, offs, valid), valid, KL)
    return _order_key(d), valid


@triton.jit
def _count_le(lp_ptr, olp_ptr, mask_ptr, start, length, tile_len, bound,
              KL: tl.constexpr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: #{valid t : key(D_t) <= bound} `[ROWS]`."""
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
    for off in range(0, tile_len, BLOCK):
        key, valid = _tile_keys(lp_ptr, olp_ptr, mask_ptr, start, length, off, KL, HAS_MASK, BLOCK)
        acc += (valid & (key <= bound[:, None])).to(tl.int32)
    return tl.sum(acc, axis=1)


@triton.jit
def _select_quantile(lp_ptr, olp_ptr, mask_ptr, start, length, tile_len, need, kb, ka, frac, key_lo, key_hi,
                     KL: tl.constexpr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: d_(kb) + frac * (d_(ka) - d_(kb)) from the order statistics kb <= ka (0-based) of the valid D.

    Bisection on the int32 keys in [key_lo, key_hi] (the range of the row's keys) for the smallest key with
    at least kb + 1 keys <= it, one counting pass per step, all rows of the tile together (rows where
    `need` is False do not iterate); then d_(ka) is the same value or the next larger key.
    """
    key_lo = tl.where(need, key_lo, 0)
    key_hi = tl.where(need, key_hi, 0)
    while tl.max((key_lo < key_hi).to(tl.int32), axis=0) > 0:
        active = key_lo < key_hi
        mid = ((key_lo.to(tl.int64) + key_hi.to(tl.int64)) >> 1).to(tl.int32)  # floor, no int32 overflow
        enough = _count_le(lp_ptr, olp_ptr, mask_ptr, start, length, tile_len, mid,
                           KL, HAS_MASK, ROWS, BLOCK) >= kb + 1
        key_hi = tl.where(active & enough, mid, key_hi)
        key_lo = tl.where(active & ~enough, mid + 1, key_lo)
    key_b = key_lo
    # one more pass: how many keys tie with d_(kb), and the next larger key
    n_le = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
    above = tl.full([ROWS, BLOCK], 2147483647, dtype=tl.int32)
    for off in range(0, tile_len, BLOCK):
        key, valid = _tile_keys(lp_ptr, olp_ptr, mask_ptr, start, length, off, KL, HAS_MASK, BLOCK)
        n_le += (valid & (key <= key_b[:, None])).to(tl.int32)
        above = tl.minimum(above, tl.where(valid & (key > key_b[:, None]), key, 2147483647))
    key_a = tl.where(tl.sum(n_le, axis=1) >= ka + 1, key_b, tl.min(above, axis=1))
    d_b = _key_value(key_b)
    d_a = _key_value(key_a)
    return d_b + frac * (d_a - d_b)


@triton.jit
def _policy_loss_kernel(
    lp_ptr, olp_ptr, adv_ptr, mask_ptr, rw_ptr, cu_ptr, max_len_ptr,  # inputs
    grad_ptr, seq_loss_ptr, stats_ptr,  # outputs: [like log_prob] f32, [S] f32, [S, NUM_STATS] f32
    num_seqs, width, horizon_arg,  # S; padded row width T; T_w when HORIZON == HORIZON_ARG
    delta, delta_low, delta_high, w_min, delta_b, quantile, delta_b_hi, ratio_cap, log_ratio_clamp,
    ratio_lo, ratio_hi, clip_c,
    METHOD: tl.constexpr, KL: tl.constexpr, SOFT: tl.constexpr, LOGP: tl.constexpr, QUANTILE: tl.constexpr,
    HORIZON: tl.constexpr, SCAN_FIRST: tl.constexpr, PACKED: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_RW: tl.constexpr, ADV_PER_SEQ: tl.constexpr, PER_SEQ_MEAN: tl.constexpr, NUM_STATS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """A tile of ROWS sequences per program, walked in blocks of BLOCK positions: pass A (T_w, quantile
    counts) when needed, then pass B (mask, loss, gradient, per-sequence sums)."""
    seq = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    seq_ok = seq < num_seqs
    if PACKED:
        start = tl.load(cu_ptr + seq, mask=seq_ok, other=0).to(tl.int64)
        length = tl.load(cu_ptr + seq + 1, mask=seq_ok, other=0).to(tl.int64) - start
    else:
        start = seq.to(tl.int64) * width
        length = tl.where(seq_ok, width, 0).to(tl.int64)
    tile_len = tl.max(length, axis=0)  # the tile walks its longest sequence
    # Scalars arrive as Python numbers (fp64 under some launchers): pin them to float32.
    delta = tl.cast(delta, tl.float32)
    delta_b = tl.cast(delta_b, tl.float32)
    delta_b_hi = tl.cast(delta_b_hi, tl.float32)
    w_min = tl.cast(w_min, tl.float32)
    log_ratio_clamp = tl.cast(log_ratio_clamp, tl.float32)
    ratio_lo = tl.cast(ratio_lo, tl.float32)
    ratio_hi = tl.cast(ratio_hi, tl.float32)
    clip_c = tl.cast(clip_c, tl.float32)
    ratio_cap = tl.cast(ratio_cap, tl.float32)

    # ---- pass A: n_i, the last valid position and the counts of the calibrated delta_b ----
    last = length.to(tl.float32)
    n_valid = length.to(tl.int32)
    if SCAN_FIRST:
        last_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        n_acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
        lo_acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
        hi_acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
        kmin_acc = tl.full([ROWS, BLOCK], 2147483647, dtype=tl.int32)
        kmax_acc = tl.full([ROWS, BLOCK], -2147483648, dtype=tl.int32)
        for off in range(0, tile_len, BLOCK):
            pos, inside, offs = _tile(start, length, off, BLOCK)
            valid = _valid(mask_ptr, offs, inside, HAS_MASK)
            last_acc = tl.maximum(last_acc, tl.where(valid, (pos + 1).to(tl.float32), 0.0))
            n_acc += valid.to(tl.int32)
            if QUANTILE:
                lp = _load_zeroed(lp_ptr, offs, valid)
                d = _divergence(lp, _load_zeroed(olp_ptr, offs, valid), valid, KL)
                key = _order_key(d)
                lo_acc += (valid & (d <= delta_b)).to(tl.int32)
                hi_acc += (valid & (d < delta_b_hi)).to(tl.int32)
                kmin_acc = tl.minimum(kmin_acc, tl.where(valid, key, 2147483647))
                kmax_acc = tl.maximum(kmax_acc, tl.where(valid, key, -2147483648))
        n_valid = tl.sum(n_acc, axis=1)
        if HAS_MASK:
            last = tl.max(last_acc, axis=1)

    # ---- T_w and the per-sequence budget delta_b_i, `[ROWS]` ----
    if HORIZON == 1:
        horizon = tl.cast(horizon_arg, tl.float32)
    elif HORIZON == 2:
        horizon = tl.load(max_len_ptr).to(tl.float32)
    else:
        horizon = last
    span = tl.maximum(horizon - 1.0, 1.0) + tl.zeros([ROWS], dtype=tl.float32)
    db = delta_b + tl.zeros([ROWS], dtype=tl.float32)
    if QUANTILE:
        n = n_valid
        n_lo = tl.sum(lo_acc, axis=1)
        n_hi = tl.sum(hi_acc, axis=1)
        # torch.quantile: position q (n - 1), linear interpolation between ranks floor and ceil
        rank = tl.cast(quantile, tl.float32) * (n - 1).to(tl.float32)
        kb = tl.floor(rank).to(tl.int32)
        frac = rank - kb.to(tl.float32)
        ka = kb + (frac > 0).to(tl.int32)
        # d_(ka) <= lo: the quantile clamps to lo; d_(kb) >= hi: to hi (an empty row keeps lo, unused)
        at_lo = (n == 0) | (n_lo >= ka + 1)
        db = tl.where(at_lo, delta_b, delta_b_hi)
        need = seq_ok & ~at_lo & (n_hi > kb)
        if tl.max(need.to(tl.int32), axis=0) > 0:
            value = _select_quantile(lp_ptr, olp_ptr, mask_ptr, start, length, tile_len, need, kb, ka, frac,
                                     tl.min(kmin_acc, axis=1), tl.max(kmax_acc, axis=1),
                                     KL, HAS_MASK, ROWS, BLOCK)
            db = tl.where(need, tl.minimum(tl.maximum(value, delta_b), delta_b_hi), db)

    # ---- pass B: per-token mask, loss and gradient; per-sequence sums ----
    if ADV_PER_SEQ:
        adv_seq = tl.load(adv_ptr + seq, mask=seq_ok, other=0.0).to(tl.float32)
    carry_slack = tl.zeros([ROWS], dtype=tl.float32)  # sum of w (delta_b_i - D) = delta_b_i W - S
    carry_s = tl.zeros([ROWS], dtype=tl.float32)  # S (soft gate)
    carry_w = tl.zeros([ROWS], dtype=tl.float32)  # W (soft gate)
    # per-position accumulators, reduced once at the end; those a method never adds to stay constant 0
    loss_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    tok_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    rej_tok_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    rej_bud_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    clip_lo_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    clip_hi_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    clip_du_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    kl_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    div_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for off in range(0, tile_len, BLOCK):
        pos, inside, offs = _tile(start, length, off, BLOCK)
        valid = _valid(mask_ptr, offs, inside, HAS_MASK)
        lp = _load_zeroed(lp_ptr, offs, valid)
        olp = _load_zeroed(olp_ptr, offs, valid)
        if ADV_PER_SEQ:
            adv = tl.where(valid, adv_seq[:, None], 0.0)
        else:
            adv = _load_zeroed(adv_ptr, offs, valid)

        diff = lp - olp
        x = tl.minimum(tl.maximum(diff, -log_ratio_clamp), log_ratio_clamp)  # clamp = inf when disabled
        d_x = ((diff >= -log_ratio_clamp) & (diff <= log_ratio_clamp)).to(tl.float32)  # d x / d log_prob
        r = tl.exp(x)
        d = _divergence(lp, olp, valid, KL)
        toward = adv * x <= 0.0  # moves back toward the rollout policy are always kept
        if METHOD == 0:  # cppo
            w = tl.maximum(w_min, 1.0 - (1.0 - w_min) * pos.to(tl.float32) / span[:, None])
            w = tl.where(valid, w, 0.0)
            step = w * d
            slack_step = w * (db[:, None] - d)
            # exclusive prefix: inclusive scan minus the element, plus the carry of earlier blocks
            slack_prev = carry_slack[:, None] + (tl.cumsum(slack_step, axis=1) - slack_step)
            inside_t = step <= tl.minimum(delta, delta + slack_prev)
            rej_tok = valid & ~toward & (step > delta)
            rej_bud_acc += (valid & ~toward & ~inside_t & ~rej_tok).to(tl.float32)
            if SOFT:
                s_prev = carry_s[:, None] + (tl.cumsum(step, axis=1) - step)
                w_prev = carry_w[:, None] + (tl.cumsum(w, axis=1) - w)
                z = tl.maximum(step / delta, (s_prev + step) / (delta + db[:, None] * w_prev))
                # min(1, 1/z) for z >= 0; rounding can make a binary_kl D (and z) a hair below 0: still 1
                gate = tl.where(toward | (z <= 1.0), 1.0, 1.0 / z)
                carry_s += tl.sum(step, axis=1)
                carry_w += tl.sum(w, axis=1)
            else:
                gate = (toward | inside_t).to(tl.float32)
            carry_slack += tl.sum(slack_step, axis=1)
        elif METHOD == 1:  # dppo
            threshold = tl.where(adv > 0.0, tl.cast(delta_high, tl.float32), tl.cast(delta_low, tl.float32))
            inside_t = d <= threshold
            rej_tok = valid & ~toward & ~inside_t
            gate = (toward | inside_t).to(tl.float32)

        if METHOD == 2:  # ppo: clip, clip-higher, dual-clip (clip_c = inf when off)
            r_clip = tl.minimum(tl.maximum(r, ratio_lo), ratio_hi)
            unclipped = -adv * r
            clipped = -adv * r_clip
            loss = tl.maximum(unclipped, clipped)
            grad = tl.where(clipped > unclipped, 0.0, -adv * r * d_x)  # the clipped branch is constant
            dual = (adv < 0.0) & (loss > -adv * clip_c)
            loss = tl.where(dual, -adv * clip_c, loss)
            grad = tl.where(dual, 0.0, grad)
            clip_lo = valid & (adv < 0.0) & (r < ratio_lo)
            clip_hi = valid & (adv > 0.0) & (r > ratio_hi)
            clip_du = valid & (adv < 0.0) & (tl.maximum(r, r_clip) > clip_c)
            rej_tok = clip_lo | clip_hi | clip_du
            clip_lo_acc += clip_lo.to(tl.float32)
            clip_hi_acc += clip_hi.to(tl.float32)
            clip_du_acc += clip_du.to(tl.float32)
        else:
            if LOGP:  # -A sg(min(r, cap)) log_prob M
                capped = tl.minimum(r, ratio_cap)
                loss = -adv * capped * lp * gate
                grad = -adv * capped * gate
            else:  # -A r M
                loss = -adv * r * gate
                grad = loss * d_x
        if HAS_RW:
            rw = _load_zeroed(rw_ptr, offs, valid)
            loss = loss * rw
            grad = grad * rw
        loss = tl.where(valid, loss, 0.0)
        if PER_SEQ_MEAN:  # seq-mean-token-mean: d loss / d L_i has a factor 1 / n_i
            grad = grad / tl.maximum(n_valid, 1).to(tl.float32)[:, None]
        tl.store(grad_ptr + offs, tl.where(valid, grad, 0.0), mask=inside)

        loss_acc += loss
        tok_acc += valid.to(tl.float32)
        rej_tok_acc += rej_tok.to(tl.float32)
        kl_acc += olp - lp
        div_acc += d

    n_tokens = tl.sum(tok_acc, axis=1)
    tl.store(seq_loss_ptr + seq, tl.sum(loss_acc, axis=1), mask=seq_ok)
    row = stats_ptr + seq.to(tl.int64) * NUM_STATS
    tl.store(row + 0, n_tokens, mask=seq_ok)
    tl.store(row + 1, tl.sum(rej_tok_acc, axis=1), mask=seq_ok)
    tl.store(row + 2, tl.sum(rej_bud_acc, axis=1), mask=seq_ok)
    tl.store(row + 3, tl.sum(clip_lo_acc, axis=1), mask=seq_ok)
    tl.store(row + 4, tl.sum(clip_hi_acc, axis=1), mask=seq_ok)
    tl.store(row + 5, tl.sum(clip_du_acc, axis=1), mask=seq_ok)
    tl.store(row + 6, tl.sum(kl_acc, axis=1), mask=seq_ok)
    tl.store(row + 7, tl.sum(div_acc, axis=1), mask=seq_ok)
    tl.store(row + 8, tl.where(n_tokens > 0, db, 0.0), mask=seq_ok)


@triton.jit
def _normalizer(ptr, value, KIND: tl.constexpr, default):
    """A global normalizer: KIND 0 = not given (`default`), 1 = a number (`value`), 2 = a 0-dim tensor."""
    if KIND == 1:
        return tl.cast(value, tl.float32)
    elif KIND == 2:
        return tl.load(ptr).to(tl.float32)
    return default


@triton.jit
def _column(totals, cols, j):
    """Entry j of a small vector, as a scalar."""
    return tl.sum(tl.where(cols == j, totals, 0.0), axis=0)


@triton.jit
def _reduce_kernel(
    seq_loss_ptr, stats_ptr, loss_ptr, aux_ptr,  # [S], [S, NUM_STATS] -> [], [NUM_AUX] (scale, metrics)
    num_seqs, dp_ptr, dp_value, tokens_ptr, tokens_value, seqs_ptr, seqs_value, loss_scale_factor,
    MODE: tl.constexpr, DP: tl.constexpr, TOKENS: tl.constexpr, SEQS: tl.constexpr,
    NUM_STATS: tl.constexpr, STATS_POW2: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: SPEC section 6 (loss_agg_mode MODE, an index into LOSS_AGG_MODES) and section 8 from
    the per-sequence sums. aux = [d loss / d L_i (times n_i for seq-mean-token-mean), metrics...]."""
    cols = tl.arange(0, STATS_POW2)
    totals = tl.zeros([STATS_POW2], dtype=tl.float32)
    sum_loss = tl.zeros([BLOCK], dtype=tl.float32)
    sum_mean = tl.zeros([BLOCK], dtype=tl.float32)  # sum of L_i / n_i over non-empty sequences
    non_empty = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, num_seqs, BLOCK):
        seq = off + tl.arange(0, BLOCK)
        ok = seq < num_seqs
        stats = tl.load(stats_ptr + seq.to(tl.int64)[:, None] * NUM_STATS + cols[None, :],
                        mask=ok[:, None] & (cols[None, :] < NUM_STATS), other=0.0)
        totals += tl.sum(stats, axis=0)
        n = tl.sum(tl.where(cols[None, :] == 0, stats, 0.0), axis=1)  # column STAT_TOKENS
        loss = tl.load(seq_loss_ptr + seq, mask=ok, other=0.0)
        sum_loss += loss
        sum_mean += tl.where(n > 0, loss / tl.maximum(n, 1.0), 0.0)
        non_empty += (n > 0).to(tl.float32)
    sum_loss_s = tl.sum(sum_loss, axis=0)
    n_tok = _column(totals, cols, 0)
    n_seq = tl.sum(non_empty, axis=0)

    dp = _normalizer(dp_ptr, dp_value, DP, 1.0)
    if MODE == 0:  # token-mean
        numerator = sum_loss_s
        denominator = _normalizer(tokens_ptr, tokens_value, TOKENS, n_tok)
    elif MODE == 1:  # token-sum
        numerator = sum_loss_s
        denominator = tl.full([], 1.0, dtype=tl.float32)
    elif MODE == 2:  # seq-mean-token-sum
        numerator = sum_loss_s
        denominator = _normalizer(seqs_ptr, seqs_value, SEQS, n_seq)
    elif MODE == 3:  # seq-mean-token-mean (the kernel folded 1 / n_i into the token gradients)
        numerator = tl.sum(sum_mean, axis=0)
        denominator = _normalizer(seqs_ptr, seqs_value, SEQS, n_seq)
    else:  # seq-mean-token-sum-norm; a zero width (empty batch) gives 0 like a zero count
        numerator = sum_loss_s
        denominator = _normalizer(seqs_ptr, seqs_value, SEQS, n_seq) * tl.cast(loss_scale_factor, tl.float32)
    scale = tl.where(denominator > 0, dp / tl.where(denominator > 0, denominator, 1.0), 0.0)
    tl.store(loss_ptr, numerator * scale)
    tl.store(aux_ptr + 0, scale)

    per_token = tl.where(n_tok > 0, totals / tl.maximum(n_tok, 1.0), 0.0)  # per-token means of the columns
    tl.store(aux_ptr + 1, _column(per_token, cols, 1) + _column(per_token, cols, 2))  # disjoint flags
    tl.store(aux_ptr + 2, _column(per_token, cols, 6))
    tl.store(aux_ptr + 3, _column(per_token, cols, 7))
    tl.store(aux_ptr + 4, _column(per_token, cols, 1))
    tl.store(aux_ptr + 5, _column(per_token, cols, 2))
    tl.store(aux_ptr + 6, tl.where(n_seq > 0, _column(totals, cols, 8) / tl.maximum(n_seq, 1.0), 0.0))
    tl.store(aux_ptr + 7, _column(per_token, cols, 3))
    tl.store(aux_ptr + 8, _column(per_token, cols, 4))
    tl.store(aux_ptr + 9, _column(per_token, cols, 5))


@triton.jit
def _scale_grad_kernel(grad_ptr, upstream_ptr, scale_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """Backward: out = grad * upstream * scale, cast to the output's dtype (log_prob's)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    factor = tl.load(upstream_ptr).to(tl.float32) * tl.load(scale_ptr)
    grad = tl.load(grad_ptr + offs, mask=inside, other=0.0)
    tl.store(out_ptr + offs, (grad * factor).to(out_ptr.dtype.element_ty), mask=inside)


def interpreter_active() -> bool:
    """Whether this module's kernels run in the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(_policy_loss_kernel, InterpretedFunction)


def check_device(device: torch.device) -> None:
    """CPU tensors need the Triton interpreter; raise a RuntimeError saying how to enable it."""
    if device.type == "cpu" and not interpreter_active():
        raise RuntimeError(
            "backend='triton' got CPU tensors, but Triton kernels run on CPU only in the Triton interpreter: "
            "set the environment variable TRITON_INTERPRET=1 before triton is first imported "
            "(or use backend='reference' / move the tensors to CUDA)")


def _block_size(num_tokens: int, num_seqs: int) -> int:
    """A power of two near the mean sequence length, in [MIN_BLOCK, MAX_BLOCK] (shapes only, no sync)."""
    mean = -(-num_tokens // max(num_seqs, 1))
    return min(max(triton.next_power_of_2(max(mean, 1)), MIN_BLOCK), MAX_BLOCK)


def launch(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
           response_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
           rollout_is_weights: Optional[torch.Tensor], *, adv_per_seq: bool, method: str, divergence: str,
           gate: str, surrogate: str, length_mode: str, horizon: int, delta: float, delta_low: float,
           delta_high: float, w_min: float, delta_b: float, delta_b_quantile: Optional[float],
           delta_b_max_mult: float, ratio_cap: float, log_ratio_clamp: Optional[float], clip_ratio_low: float,
           clip_ratio_high: float, clip_ratio_c: Optional[float], loss_agg_mode: str, loss_scale_factor: float,
           normalizers: dict, block: int = 0):
    """Run the token kernel and the reduction kernel on validated inputs: two launches, no host sync.

    Args: the tensors of `policy_loss` (padded `[B, T]` or packed `[N]` + `cu_seqlens [S + 1]`); the
    config's fields (`length_mode` "sequence", "padded" or "int" with the int in `horizon`;
    `loss_scale_factor` resolved, the width T by default); `normalizers` maps "dp_size",
    "batch_num_tokens", "global_batch_size" to None, a number or a 0-dim tensor on the device; `block`:
    positions per block, a power of two (0 picks one from the shapes; a program takes TILE // block
    sequences).

    Returns:
        loss `[]` f32; aux `[NUM_AUX]` f32: the backward scale, then the metrics in METRICS order;
        grad `[like log_prob]` f32: d loss / d log_prob_t up to the backward scale (0 at masked positions).
    """
    packed = cu_seqlens is not None
    num_seqs = cu_seqlens.numel() - 1 if packed else log_prob.shape[0]
    width = 0 if packed else log_prob.shape[1]
    f32 = dict(dtype=torch.float32, device=log_prob.device)
    per_seq_mean = loss_agg_mode == "seq-mean-token-mean"
    if num_seqs == 0 or log_prob.numel() == 0:
        seq_loss, stats = torch.zeros(num_seqs, **f32), torch.zeros(num_seqs, NUM_STATS, **f32)
        grad = torch.zeros(log_prob.shape, **f32)
    else:
        # the kernel writes every element: each position belongs to exactly one row or packed sequence
        seq_loss, stats = torch.empty(num_seqs, **f32), torch.empty(num_seqs, NUM_STATS, **f32)
        grad = torch.empty(log_prob.shape, **f32)
        mask = None if response_mask is None else response_mask.contiguous()
        if mask is not None and mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # same bytes; a uint8 pointer loads everywhere
        if method == "cppo" and length_mode == "padded" and packed:
            horizon_kind, max_len = HORIZON_MAX_LEN, (cu_seqlens[1:] - cu_seqlens[:-1]).max()  # on device
        elif method == "cppo" and length_mode in ("padded", "int"):
            horizon_kind, max_len = HORIZON_ARG, None
            horizon = width if length_mode == "padded" else horizon
        else:
            horizon_kind, max_len = HORIZON_LAST, None
        quantile = method == "cppo" and delta_b_quantile is not None
        scan_first = quantile or (mask is not None and (
            per_seq_mean or (method == "cppo" and horizon_kind == HORIZON_LAST)))
        inf = float("inf")
        block = block or _block_size(log_prob.numel(), num_seqs)
        rows = max(TILE // block, 1)
        _policy_loss_kernel[(triton.cdiv(num_seqs, rows),)](
            log_prob.contiguous(), old_log_prob.contiguous(), advantages.contiguous(), mask,
            None if rollout_is_weights is None else rollout_is_weights.contiguous(), cu_seqlens.contiguous()
            if packed else None, max_len,
            grad, seq_loss, stats,
            num_seqs, width, int(horizon),
            float(delta), float(delta_low), float(delta_high), float(w_min), float(delta_b),
            float(delta_b_quantile or 0.0), float(delta_b_max_mult * delta_b), float(ratio_cap),
            inf if log_ratio_clamp is None else float(log_ratio_clamp),
            1.0 - clip_ratio_low, 1.0 + clip_ratio_high, inf if clip_ratio_c is None else float(clip_ratio_c),
            METHOD=METHOD_IDS[method], KL=divergence == "binary_kl", SOFT=gate == "soft", LOGP=surrogate == "logp",
            QUANTILE=quantile, HORIZON=horizon_kind, SCAN_FIRST=scan_first, PACKED=packed,
            HAS_MASK=mask is not None, HAS_RW=rollout_is_weights is not None, ADV_PER_SEQ=adv_per_seq,
            PER_SEQ_MEAN=per_seq_mean, NUM_STATS=NUM_STATS, ROWS=rows, BLOCK=block,
            num_warps=NUM_WARPS,
        )

    loss, aux = torch.empty((), **f32), torch.empty(NUM_AUX, **f32)
    kinds, args = [], []  # per normalizer: 0 not given, 1 a number, 2 a 0-dim tensor (read on the device)
    for name in ("dp_size", "batch_num_tokens", "global_batch_size"):
        value = normalizers.get(name)
        if isinstance(value, torch.Tensor):
            kinds.append(2)
            args += [value, 0.0]
        else:
            kinds.append(0 if value is None else 1)
            args += [None, float(value or 0)]
    _reduce_kernel[(1,)](
        seq_loss, stats, loss, aux, num_seqs, *args, float(loss_scale_factor),
        MODE=LOSS_AGG_MODES.index(loss_agg_mode), DP=kinds[0], TOKENS=kinds[1], SEQS=kinds[2],
        NUM_STATS=NUM_STATS, STATS_POW2=triton.next_power_of_2(NUM_STATS), BLOCK=REDUCE_BLOCK,
    )
    return loss, aux, grad


def scale_grad(grad: torch.Tensor, upstream: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """Backward in one launch: grad * upstream * scale in `dtype` (upstream, scale: 1-element tensors)."""
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    if grad.numel():
        _scale_grad_kernel[(triton.cdiv(grad.numel(), SCALE_BLOCK),)](grad, upstream, scale, out, grad.numel(),
                                                                       BLOCK=SCALE_BLOCK)
    return out


def metrics(aux: torch.Tensor, method: str) -> dict:
    """SPEC section 8: the reference's keys for `method`, as 0-dim views of the reduction's `aux`."""
    return {name: aux[AUX_METRICS + i] for i, name in enumerate(METRICS) if method in METRIC_METHODS[name].split()}
