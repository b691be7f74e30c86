"""The token kernel: docs/math.md sections 2-5 and the per-sequence sums of sections 6 and 9.

Design (docs/kernels.md has the long form):
- 1-D grid over tiles of ROWS sequences (padded rows or packed sequences); a program walks its sequences
  together in blocks of BLOCK positions, `[ROWS, BLOCK]` at a time, up to its longest one, so any length and
  any number of sequences work (offsets in int64). ROWS * BLOCK = TILE: short sequences share a program.
- pass A (only when needed): n_i, the last valid position (T_w of length_mode="sequence" with a mask) and, for
  the calibrated delta_b, #{D <= lo}, #{D < hi} and the range of D. The quantile is clamped to
  [lo, hi] = [delta_b, delta_b_max_mult * delta_b], so the counts settle the common cases; otherwise the two
  order statistics are selected by bisection on order-preserving int32 keys of the float32 D.
- pass B: per token `common.trust_region_step` (mask or gate, loss, d L_i / d log_prob), per-sequence sums.
Packed `cu_seqlens` are checked here, per sequence, at no extra launch: a sequence whose offsets are out of
order or out of [0, N] is read as empty and poisons its loss and statistics with NaN (docs/kernels.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (AGG_SEQ_MEAN_TOKEN_MEAN, BUDGET_GIVEN, BUDGET_QUANTILE, DIV_GIVEN, HORIZON_ARG, HORIZON_GIVEN,
                     HORIZON_LAST, HORIZON_MAX_LEN, HORIZON_WIDTH, INT32_MAX, INT32_MIN, METHOD_CPPO, METHOD_PPO,
                     NUM_STATS, P_DELTA_B, P_DELTA_B_HI, P_HORIZON, P_LOG_RATIO_CLAMP, P_QUANTILE,
                     P_QUANTILE_SCALE, P_RATIO_CAP, P_W_MIN, SHARD_DELTA_B, SHARD_FINAL, SHARD_LENGTH, SHARD_OFFSET,
                     SHARD_WIDTH, STAT_CLIP_DUAL, STAT_CLIP_HIGH, STAT_CLIP_LOW, STAT_DELTA_B, STAT_DIV, STAT_KL,
                     STAT_LOSS, STAT_RATIO_CAPPED, STAT_REJ_BUDGET, STAT_REJ_TOKEN, STAT_TOKENS, STATE_S, STATE_SLACK,
                     STATE_W, binary_divergence, finite_or_nan, key_value, load_zeroed, log_ratio, nan_min, order_key,
                     position_weight, trust_region_step, valid_positions)
from .reduce import OUT_WIDTH, reduce_stats

MAX_BLOCK = tl.constexpr(1024)
MIN_BLOCK = 16
TILE = tl.constexpr(1024)  # ROWS * BLOCK positions per program step: ROWS = TILE // BLOCK
NUM_WARPS = 8  # 4 positions per thread: no register spills on sm_90 (4 warps: up to 255 registers and spills)


@triton.jit
def _tile(start, length, off, BLOCK: tl.constexpr):
    """Positions `[1, BLOCK]` (0-based in the sequence), in-sequence flags and int64 offsets `[ROWS, BLOCK]`."""
    pos = off + tl.arange(0, BLOCK)[None, :]
    inside = pos < length[:, None]
    return pos, inside, start[:, None] + pos


@triton.jit
def _divergence_tile(lp_ptr, olp_ptr, div_ptr, offs, valid, DIVERGENCE: tl.constexpr):
    """D over one tile: given (from-logits path) or binary from log_prob and old_log_prob."""
    if DIVERGENCE == DIV_GIVEN:
        return load_zeroed(div_ptr, offs, valid)
    return binary_divergence(load_zeroed(lp_ptr, offs, valid), load_zeroed(olp_ptr, offs, valid), valid,
                             DIVERGENCE)


@triton.jit
def _tile_keys(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, off,
               DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Order keys of D over one tile, and the validity of each position."""
    pos, inside, offs = _tile(start, length, off, BLOCK)
    valid = valid_positions(mask_ptr, offs, inside, HAS_MASK)
    return order_key(_divergence_tile(lp_ptr, olp_ptr, div_ptr, offs, valid, DIVERGENCE)), valid


@triton.jit
def _count_le(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len, bound,
              DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row: #{valid t : key(D_t) <= bound} `[ROWS]`."""
    acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
    for off in range(0, tile_len, BLOCK):
        key, valid = _tile_keys(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, off, DIVERGENCE, HAS_MASK,
                                BLOCK)
        acc += (valid & (key <= bound[:, None])).to(tl.int32)
    return tl.sum(acc, axis=1)


@triton.jit
def _select_quantile(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len, need, kb, ka, frac,
                     key_lo, key_hi,
                     DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
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
        enough = _count_le(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len, mid,
                           DIVERGENCE, HAS_MASK, ROWS, BLOCK) >= kb + 1
        key_hi = tl.where(active & enough, mid, key_hi)
        key_lo = tl.where(active & ~enough, mid + 1, key_lo)
    key_b = key_lo
    # one more pass: how many keys tie with d_(kb), and the next larger key
    n_le = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
    above = tl.full([ROWS, BLOCK], INT32_MAX, dtype=tl.int32)
    for off in range(0, tile_len, BLOCK):
        key, valid = _tile_keys(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, off, DIVERGENCE, HAS_MASK,
                                BLOCK)
        n_le += (valid & (key <= key_b[:, None])).to(tl.int32)
        above = tl.minimum(above, tl.where(valid & (key > key_b[:, None]), key, INT32_MAX))
    key_a = tl.where(tl.sum(n_le, axis=1) >= ka + 1, key_b, tl.min(above, axis=1))
    d_b = key_value(key_b)
    d_a = key_value(key_a)
    return d_b + frac * (d_a - d_b)


@triton.jit
def _sequences(cu_ptr, seq, seq_ok, num_seqs, extent, PACKED: tl.constexpr):
    """Start, length `[ROWS]` (int64) and a bad-offsets flag of the tile's sequences; `extent` is the padded row
    width T, or N of packed input.

    Packed offsets are checked here: sequence i must satisfy 0 <= cu[i] <= cu[i + 1] <= N, and cu[0] = 0,
    cu[S] = N. A bad sequence is read as empty (no access outside the tensors) and flagged.
    """
    total = extent
    width = extent
    if PACKED:
        start = tl.load(cu_ptr + seq, mask=seq_ok, other=0).to(tl.int64)
        end = tl.load(cu_ptr + seq + 1, mask=seq_ok, other=0).to(tl.int64)
        bad = (start < 0) | (end < start) | (end > total)
        bad |= ((seq == 0) & (start != 0)) | ((seq == num_seqs - 1) & (end != total))
        bad &= seq_ok
        return tl.where(bad, 0, start), tl.where(bad, 0, end - start), bad
    start = seq.to(tl.int64) * width
    return start, tl.where(seq_ok, width, 0).to(tl.int64), seq_ok & ~seq_ok


@triton.jit
def _longest(cu_ptr, num_seqs):
    """max_i (cu[i + 1] - cu[i]): T_w of length_mode="padded" for packed input, read by every program."""
    longest = tl.zeros([MAX_BLOCK], dtype=tl.int64)
    for off in range(0, num_seqs, MAX_BLOCK):
        i = off + tl.arange(0, MAX_BLOCK)
        ok = i < num_seqs
        length = tl.load(cu_ptr + i + 1, mask=ok, other=0).to(tl.int64) - tl.load(cu_ptr + i, mask=ok, other=0)
        longest = tl.maximum(longest, length)
    return tl.max(longest, axis=0).to(tl.float32)


@triton.jit
def token_kernel(
    lp_ptr, olp_ptr, adv_ptr, mask_ptr, rw_ptr, div_ptr, cu_ptr,  # inputs; mask, rw, div, cu may be None
    shard_ptr,  # a shard of longer sequences: [S, SHARD_WIDTH] f64 in and out (carried_state.py), or None
    grad_ptr, loss_ptr, sums_ptr, counter_ptr,  # out: [like log_prob], [], [OUT_WIDTH + S * NUM_STATS] f32; [] i32
    params_ptr,  # [NUM_PARAMS] f32: the config's numbers (ops/plan.py)
    dp_ptr, dp_factor, tokens_ptr, tokens, seqs_ptr, seqs,  # the normalizers (reduce.reduce_stats)
    num_seqs, extent,  # S; the padded row width T, or N of packed input
    METHOD: tl.constexpr, DIVERGENCE: tl.constexpr, GATE: tl.constexpr, SURROGATE: tl.constexpr,
    BUDGET: tl.constexpr, HORIZON: tl.constexpr, ADV_PER_SEQ: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    """A tile of ROWS = TILE // BLOCK sequences per program, walked in blocks of BLOCK positions: pass A (T_w,
    quantile counts) when needed, then pass B (mask, loss, gradient, per-sequence sums). The last program to
    finish turns every sequence's sums into the loss and the metrics (`reduce.reduce_stats`), so the forward is
    one launch at every shape: `counter_ptr` counts the programs done, and that program sets it back to 0.

    `sums` holds aux (the backward scale, then the metrics) and from OUT_WIDTH on a row of NUM_STATS per
    sequence; the loss has its own `[]`. A shard of a longer sequence (docs/math.md section 8) reads its carried state, the global
    position of its first token, T_w (HORIZON_GIVEN) and delta_b_i (BUDGET_GIVEN) from its row of `shard`, and
    writes the state after the shard there.
    """
    PACKED: tl.constexpr = cu_ptr is not None
    HAS_MASK: tl.constexpr = mask_ptr is not None
    HAS_SHARD: tl.constexpr = shard_ptr is not None
    ROWS: tl.constexpr = TILE // BLOCK
    QUANTILE: tl.constexpr = BUDGET == BUDGET_QUANTILE
    PER_SEQ_MEAN: tl.constexpr = MODE == AGG_SEQ_MEAN_TOKEN_MEAN  # d loss / d L_i has a factor 1 / n_i
    # pass A counts what pass B needs before its first token: n_i (1 / n_i), the last valid position (T_w), the
    # quantile's counts; without a mask the first two are the sequence's length
    SCAN_FIRST: tl.constexpr = QUANTILE or (HAS_MASK and (PER_SEQ_MEAN or (METHOD == METHOD_CPPO and HORIZON == HORIZON_LAST)))
    seq = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    seq_ok = seq < num_seqs
    start, length, bad = _sequences(cu_ptr, seq, seq_ok, num_seqs, extent, PACKED)
    tile_len = tl.max(length, axis=0)  # the tile walks its longest sequence
    w_min = tl.load(params_ptr + P_W_MIN)
    delta_b = tl.load(params_ptr + P_DELTA_B)
    delta_b_hi = tl.load(params_ptr + P_DELTA_B_HI)
    quantile_scale = tl.load(params_ptr + P_QUANTILE_SCALE)
    ratio_cap = tl.load(params_ptr + P_RATIO_CAP)
    log_ratio_clamp = tl.load(params_ptr + P_LOG_RATIO_CLAMP)
    if HAS_SHARD:
        shard_row = shard_ptr + seq.to(tl.int64) * SHARD_WIDTH

    # ---- pass A: n_i, the last valid position and the counts of the calibrated delta_b ----
    last = length.to(tl.float32)
    n_valid = length.to(tl.int32)
    if SCAN_FIRST:
        last_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        n_acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
        lo_acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
        hi_acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
        kmin_acc = tl.full([ROWS, BLOCK], INT32_MAX, dtype=tl.int32)
        kmax_acc = tl.full([ROWS, BLOCK], INT32_MIN, dtype=tl.int32)
        for off in range(0, tile_len, BLOCK):
            pos, inside, offs = _tile(start, length, off, BLOCK)
            valid = valid_positions(mask_ptr, offs, inside, HAS_MASK)
            last_acc = tl.maximum(last_acc, tl.where(valid, (pos + 1).to(tl.float32), 0.0))
            n_acc += valid.to(tl.int32)
            if QUANTILE:
                d = _divergence_tile(lp_ptr, olp_ptr, div_ptr, offs, valid, DIVERGENCE)
                key = order_key(d)
                # the clamp applies to k * Quantile_q(D): compare k * D with its bounds (monotone in D)
                lo_acc += (valid & (d * quantile_scale <= delta_b)).to(tl.int32)
                hi_acc += (valid & (d * quantile_scale < delta_b_hi)).to(tl.int32)
                kmin_acc = tl.minimum(kmin_acc, tl.where(valid, key, INT32_MAX))
                kmax_acc = tl.maximum(kmax_acc, tl.where(valid, key, INT32_MIN))
        n_valid = tl.sum(n_acc, axis=1)
        if HAS_MASK:
            last = tl.max(last_acc, axis=1)
    if HAS_SHARD:  # positions are global: the shard starts at position offset + 1
        offset = tl.load(shard_row + SHARD_OFFSET, mask=seq_ok, other=0).to(tl.int64)
        last = tl.where(last > 0, last + offset.to(tl.float32), 0.0)

    # ---- T_w and the per-sequence budget delta_b_i, `[ROWS]` ----
    if HORIZON == HORIZON_ARG:
        horizon = tl.load(params_ptr + P_HORIZON)
    elif HORIZON == HORIZON_WIDTH:
        horizon = tl.cast(extent, tl.float32)
    elif HORIZON == HORIZON_MAX_LEN:
        horizon = _longest(cu_ptr, num_seqs)
    elif HORIZON == HORIZON_GIVEN:
        horizon = tl.load(shard_row + SHARD_LENGTH, mask=seq_ok, other=0).to(tl.float32)
    else:
        horizon = last
    span = tl.maximum(horizon - 1.0, 1.0) + tl.zeros([ROWS], dtype=tl.float32)
    db = delta_b + tl.zeros([ROWS], dtype=tl.float32)
    if BUDGET == BUDGET_GIVEN:
        db = finite_or_nan(tl.load(shard_row + SHARD_DELTA_B, mask=seq_ok, other=0.0).to(tl.float32))
    if QUANTILE:
        n = n_valid
        n_lo = tl.sum(lo_acc, axis=1)
        n_hi = tl.sum(hi_acc, axis=1)
        # torch.quantile: position q (n - 1), linear interpolation between ranks floor and ceil
        rank = tl.load(params_ptr + P_QUANTILE) * (n - 1).to(tl.float32)
        kb = tl.floor(rank).to(tl.int32)
        frac = rank - kb.to(tl.float32)
        ka = kb + (frac > 0).to(tl.int32)
        # k d_(ka) <= lo: k * quantile clamps to lo; k d_(kb) >= hi: to hi (an empty row keeps lo, unused)
        at_lo = (n == 0) | (n_lo >= ka + 1)
        db = tl.where(at_lo, delta_b, delta_b_hi)
        need = seq_ok & ~at_lo & (n_hi > kb)
        if tl.max(need.to(tl.int32), axis=0) > 0:
            value = _select_quantile(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len, need, kb, ka,
                                     frac, tl.min(kmin_acc, axis=1), tl.max(kmax_acc, axis=1),
                                     DIVERGENCE, HAS_MASK, ROWS, BLOCK)
            db = tl.where(need, tl.minimum(tl.maximum(quantile_scale * value, delta_b), delta_b_hi), db)

    # ---- pass B: per-token mask, loss and gradient; per-sequence sums ----
    if ADV_PER_SEQ:
        adv_seq = finite_or_nan(tl.load(adv_ptr + seq, mask=seq_ok, other=0.0).to(tl.float32))
    if PER_SEQ_MEAN:
        inv_n = 1.0 / tl.maximum(n_valid, 1).to(tl.float32)
    if HAS_SHARD:  # the prefix of the earlier shards
        carry_slack = finite_or_nan(tl.load(shard_row + STATE_SLACK, mask=seq_ok, other=0.0).to(tl.float32))
        carry_s = finite_or_nan(tl.load(shard_row + STATE_S, mask=seq_ok, other=0.0).to(tl.float32))
        carry_w = finite_or_nan(tl.load(shard_row + STATE_W, mask=seq_ok, other=0.0).to(tl.float32))
    else:
        carry_slack = tl.zeros([ROWS], dtype=tl.float32)  # sum of w (delta_b_i - D) = delta_b_i W - S
        carry_s = tl.zeros([ROWS], dtype=tl.float32)  # S (soft gate, and the state)
        carry_w = tl.zeros([ROWS], dtype=tl.float32)  # W (soft gate, and the state)
    # per-position accumulators, reduced once at the end; those a method never adds to stay constant 0
    loss_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    tok_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    rej_tok_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    rej_bud_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    clip_lo_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    clip_hi_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    clip_du_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    kl_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    capped_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    div_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for off in range(0, tile_len, BLOCK):
        pos, inside, offs = _tile(start, length, off, BLOCK)
        valid = valid_positions(mask_ptr, offs, inside, HAS_MASK)
        lp = load_zeroed(lp_ptr, offs, valid)
        olp = load_zeroed(olp_ptr, offs, valid)
        if ADV_PER_SEQ:
            adv = tl.where(valid, adv_seq[:, None], 0.0)
        else:
            adv = load_zeroed(adv_ptr, offs, valid)
        x, dx = log_ratio(lp, olp, log_ratio_clamp)
        # r_t; a zero-advantage token contributes 0 whatever its ratio: no exp overflow there (NaN stays NaN)
        r = tl.exp(tl.where(adv == 0.0, nan_min(x, 0.0), x))
        d = _divergence_tile(lp_ptr, olp_ptr, div_ptr, offs, valid, DIVERGENCE)
        weight = valid.to(tl.float32)
        if METHOD == METHOD_CPPO:
            if HAS_SHARD:
                weight = tl.where(valid, position_weight(pos + offset[:, None], span[:, None], w_min), 0.0)
            else:
                weight = tl.where(valid, position_weight(pos, span[:, None], w_min), 0.0)
        loss, grad, rej_tok, rej_bud, clip_lo, clip_hi, clip_du, carry_slack, carry_s, carry_w = \
            trust_region_step(lp, x, dx, r, d, adv, valid, weight, db, carry_slack, carry_s, carry_w, params_ptr,
                              METHOD, GATE, SURROGATE, HAS_SHARD)
        if rw_ptr is not None:
            rw = load_zeroed(rw_ptr, offs, valid)
            loss = loss * rw
            grad = grad * rw  # a NaN weight: NaN loss and NaN gradient at the token
        if PER_SEQ_MEAN:
            grad = grad * inv_n[:, None]
        tl.store(grad_ptr + offs, grad, mask=inside)

        loss_acc += loss
        tok_acc += valid.to(tl.float32)
        rej_tok_acc += rej_tok.to(tl.float32)
        rej_bud_acc += rej_bud.to(tl.float32)
        clip_lo_acc += clip_lo.to(tl.float32)
        clip_hi_acc += clip_hi.to(tl.float32)
        clip_du_acc += clip_du.to(tl.float32)
        kl_acc -= x  # masked positions: x = 0
        if METHOD != METHOD_PPO:  # kept, with the ratio over the logp surrogate's cap (r of A = 0 uncapped here)
            capped_acc += (valid & ~(rej_tok | rej_bud) & (tl.exp(x) > ratio_cap)).to(tl.float32)
        div_acc += d

    n_tokens = tl.sum(tok_acc, axis=1)
    # bad cu_seqlens: NaN loss, metrics and (through a NaN n_i, which the reduction turns into a NaN scale)
    # gradient, never a plausible number
    poison = tl.where(bad, float("nan"), 0.0)
    row = sums_ptr + OUT_WIDTH + seq.to(tl.int64) * NUM_STATS
    tl.store(row + STAT_LOSS, tl.sum(loss_acc, axis=1) + poison, mask=seq_ok)
    tl.store(row + STAT_TOKENS, n_tokens + poison, mask=seq_ok)
    tl.store(row + STAT_REJ_TOKEN, tl.sum(rej_tok_acc, axis=1) + poison, mask=seq_ok)
    tl.store(row + STAT_REJ_BUDGET, tl.sum(rej_bud_acc, axis=1) + poison, mask=seq_ok)
    tl.store(row + STAT_CLIP_LOW, tl.sum(clip_lo_acc, axis=1) + poison, mask=seq_ok)
    tl.store(row + STAT_CLIP_HIGH, tl.sum(clip_hi_acc, axis=1) + poison, mask=seq_ok)
    tl.store(row + STAT_CLIP_DUAL, tl.sum(clip_du_acc, axis=1) + poison, mask=seq_ok)
    tl.store(row + STAT_KL, tl.sum(kl_acc, axis=1) + poison, mask=seq_ok)
    tl.store(row + STAT_DIV, tl.sum(div_acc, axis=1) + poison, mask=seq_ok)
    tl.store(row + STAT_RATIO_CAPPED, tl.sum(capped_acc, axis=1) + poison, mask=seq_ok)
    tl.store(row + STAT_DELTA_B, tl.where(n_tokens > 0, db, 0.0) + poison, mask=seq_ok)
    if HAS_SHARD:
        tl.store(shard_row + SHARD_FINAL + STATE_SLACK, carry_slack + poison, mask=seq_ok)
        tl.store(shard_row + SHARD_FINAL + STATE_S, carry_s + poison, mask=seq_ok)
        tl.store(shard_row + SHARD_FINAL + STATE_W, carry_w + poison, mask=seq_ok)
    # ---- the reduction, by the last program to finish (the others' stats are then in memory) ----
    tl.debug_barrier()  # every thread's stats stores are issued before this program counts itself done
    done = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        reduce_stats(sums_ptr, loss_ptr, num_seqs, dp_ptr, dp_factor, tokens_ptr, tokens, seqs_ptr, seqs, METHOD, MODE)
        tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch


def block_size(num_tokens: int, num_seqs: int) -> int:
    """A power of two near the mean sequence length, in [MIN_BLOCK, MAX_BLOCK] (shapes only, no sync)."""
    mean = -(-num_tokens // max(num_seqs, 1))
    return min(max(1 << (mean - 1).bit_length(), MIN_BLOCK), MAX_BLOCK.value)  # plain Python: host time per call


def launch_token_kernel(log_prob, old_log_prob, advantages, mask, rollout_is_weights, divergence, cu_seqlens, shard,
                        grad, loss, sums, counter, params, *, num_seqs: int, extent: int, constexprs: dict,
                        reduction: tuple):
    """One launch of `token_kernel` on contiguous inputs (the mask of any dtype, or None) and preallocated outputs:
    `grad` like log_prob, `loss []` and `sums [OUT_WIDTH + S * NUM_STATS]` (aux, the per-sequence stats) f32.

    `shard`: `carried_state.pack_shard(...)` for shards of longer sequences, else None; `counter`:
    `reduce.program_counter(device)`; `params`: `plan.params(device)`; `extent` the padded width T or N (packed);
    `constexprs` from `plan.layout_constexprs`; `reduction` from `reduce.reduction_arguments`.
    """
    token_kernel[(max(-(-num_seqs // (TILE.value // constexprs["BLOCK"])), 1),)](
        log_prob, old_log_prob, advantages, mask, rollout_is_weights, divergence, cu_seqlens, shard, grad, loss,
        sums, counter, params, *reduction, num_seqs, extent, **constexprs,
    )
