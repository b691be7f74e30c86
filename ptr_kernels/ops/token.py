"""The token kernel: docs/math.md sections 2-5 and the per-sequence sums of sections 6 and 9.

Design (docs/kernels.md has the long form):
- 1-D grid of work items (chunks.py): CHUNK positions of a tile of ROWS sequences (padded rows or packed
  sequences), walked in blocks of BLOCK positions, `[ROWS, BLOCK]` at a time; ROWS * BLOCK = TILE, so short
  sequences share a program and a long one spreads over many (offsets in int64).
- the pre-pass items (only when `chunks.needs_prepass`): n_i, the last valid position (T_w of
  length_mode="sequence" with a mask) and, for the calibrated delta_b, #{D <= lo}, #{D < hi} and the range of D.
  The quantile is clamped to [lo, hi] = [delta_b, delta_b_max_mult * delta_b], so the counts settle the common
  cases; otherwise chunk 0 selects the two order statistics by bisection on order-preserving int32 keys of the
  float32 D, over the whole sequence, and hands delta_b_i to the later chunks.
- the deciding items: cppo's budget sums of the earlier chunks (the carried state of docs/math.md section 8),
  then per token `common.trust_region_step` (mask or gate, loss, d L_i / d log_prob); the tile's last chunk adds
  the chunks' sums into the sequences' rows.
Packed `cu_seqlens` are checked here, per sequence, at no extra launch: a sequence whose offsets are out of
order or out of [0, N] is read as empty and poisons its loss and statistics with NaN (docs/kernels.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import ids
from .chunks import (finish_item, item_index, needs_prepass, publish, read_rows, reset_launch_state, scratch_rows,
                     wait_for_chunks, work_item)
from .common import (divergence_tile, finite_or_nan, load_zeroed, log_ratio, nan_min, order_key, position_weight,
                     tile_positions, trust_region_step, valid_positions)
from .quantile import (calibrated_budget, clear_select_row, gather_keys, quantile_ranks, select_gathered,
                       select_quantile, window_base, window_bins)
from .reduce import reduce_stats

NUM_WARPS = 8  # 4 positions per thread: no register spills on sm_90 (4 warps: up to 255 registers and spills)


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
    longest = tl.zeros([ids.MAX_BLOCK], dtype=tl.int64)
    for off in range(0, num_seqs, ids.MAX_BLOCK):
        i = off + tl.arange(0, ids.MAX_BLOCK)
        ok = i < num_seqs
        length = tl.load(cu_ptr + i + 1, mask=ok, other=0).to(tl.int64) - tl.load(cu_ptr + i, mask=ok, other=0)
        longest = tl.maximum(longest, length)
    return tl.max(longest, axis=0).to(tl.float32)


@triton.jit
def _prepass(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, lo_pos, hi_pos, delta_b, delta_b_hi, quantile_scale,
             select_row, DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr, QUANTILE: tl.constexpr,
             HISTOGRAM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row over positions [lo_pos, hi_pos): n, the last valid position + 1, and for the calibrated delta_b
    #{k D <= lo}, #{k D < hi} and the range of D's order keys (the clamp applies to k * Quantile_q(D): compare k * D
    with its bounds, monotone in D). HISTOGRAM (a chunk of a one-row tile of several chunks): also the largest key
    with k D <= lo, the smallest with k D >= hi, the keys outside the window, and the keys inside (lo, hi) added to
    the tile's histogram at `select_row` (quantile.gather_keys)."""
    last_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    n_acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
    lo_acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
    hi_acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
    kmin_acc = tl.full([ROWS, BLOCK], ids.INT32_MAX, dtype=tl.int32)
    kmax_acc = tl.full([ROWS, BLOCK], ids.INT32_MIN, dtype=tl.int32)
    below_acc = tl.full([ROWS, BLOCK], ids.INT32_MIN, dtype=tl.int32)
    above_acc = tl.full([ROWS, BLOCK], ids.INT32_MAX, dtype=tl.int32)
    outside_acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
    base = window_base(delta_b, quantile_scale)
    for off in range(lo_pos, hi_pos, BLOCK):
        pos, inside, offs = tile_positions(start, length, off, BLOCK)
        valid = valid_positions(mask_ptr, offs, inside, HAS_MASK)
        last_acc = tl.maximum(last_acc, tl.where(valid, (pos + 1).to(tl.float32), 0.0))
        n_acc += valid.to(tl.int32)
        if QUANTILE:
            d = divergence_tile(lp_ptr, olp_ptr, div_ptr, offs, valid, DIVERGENCE)
            key = order_key(d)
            lo_acc += (valid & (d * quantile_scale <= delta_b)).to(tl.int32)
            hi_acc += (valid & (d * quantile_scale < delta_b_hi)).to(tl.int32)
            kmin_acc = tl.minimum(kmin_acc, tl.where(valid, key, ids.INT32_MAX))
            kmax_acc = tl.maximum(kmax_acc, tl.where(valid, key, ids.INT32_MIN))
            if HISTOGRAM:
                below = valid & (d * quantile_scale <= delta_b)
                above = valid & (d * quantile_scale >= delta_b_hi)
                in_window, key_bin = window_bins(d, key, valid, delta_b, delta_b_hi, base, quantile_scale)
                below_acc = tl.maximum(below_acc, tl.where(below, key, ids.INT32_MIN))
                above_acc = tl.minimum(above_acc, tl.where(above, key, ids.INT32_MAX))
                outside_acc += (valid & ~below & ~above & ~in_window).to(tl.int32)  # NaN D among them
                # integer adds, so the same histogram in any order; a key at a time: a [SELECT_BINS] accumulator
                # held across the loop took the kernel past 128 registers, one program per SM instead of two
                tl.atomic_add(select_row + ids.SELECT_HIST + key_bin, 1, mask=in_window, sem="relaxed")
    return (tl.sum(n_acc, axis=1), tl.max(last_acc, axis=1), tl.sum(lo_acc, axis=1), tl.sum(hi_acc, axis=1),
            tl.min(kmin_acc, axis=1), tl.max(kmax_acc, axis=1), tl.max(below_acc, axis=1), tl.min(above_acc, axis=1),
            tl.sum(outside_acc, axis=1))


@triton.jit
def _prepass_totals(counter_ptr, scratch, tile, first_over, num_tiles, num_chunks, QUANTILE: tl.constexpr,
                    SELECT: tl.constexpr, ROWS: tl.constexpr, CHUNK_STEP: tl.constexpr):
    """The sums of `_prepass` over the tile's pre-pass items (stage 0), once each has published: n, the last valid
    position + 1, #{k D <= lo}, #{k D < hi}, the range of the keys, and (SELECT) the largest key <= lo, the
    smallest >= hi and the keys outside the histogram's window, `[ROWS]` each."""
    n = tl.zeros([ROWS], dtype=tl.int32)
    last = tl.zeros([ROWS], dtype=tl.float32)
    n_lo = tl.zeros([ROWS], dtype=tl.int32)
    n_hi = tl.zeros([ROWS], dtype=tl.int32)
    key_lo = tl.full([ROWS], ids.INT32_MAX, dtype=tl.int32)
    key_hi = tl.full([ROWS], ids.INT32_MIN, dtype=tl.int32)
    key_below = tl.full([ROWS], ids.INT32_MIN, dtype=tl.int32)
    key_above = tl.full([ROWS], ids.INT32_MAX, dtype=tl.int32)
    outside = tl.zeros([ROWS], dtype=tl.int32)
    for c0 in range(0, num_chunks, CHUNK_STEP):
        rows, ok = wait_for_chunks(counter_ptr, scratch, 0, tile, first_over, num_tiles, c0, num_chunks, ids.DONE,
                                   ROWS, CHUNK_STEP)
        n += tl.sum(read_rows(rows, ids.ITEM_N, ok).to(tl.int32), axis=0)
        last = tl.maximum(last, tl.max(read_rows(rows, ids.ITEM_LAST, ok), axis=0))
        if QUANTILE:
            n_lo += tl.sum(read_rows(rows, ids.ITEM_LO, ok).to(tl.int32), axis=0)
            n_hi += tl.sum(read_rows(rows, ids.ITEM_HI, ok).to(tl.int32), axis=0)
            low = read_rows(rows, ids.ITEM_KEY_MIN, ok).to(tl.int32, bitcast=True)
            high = read_rows(rows, ids.ITEM_KEY_MAX, ok).to(tl.int32, bitcast=True)
            key_lo = tl.minimum(key_lo, tl.min(tl.where(ok, low, ids.INT32_MAX), axis=0))
            key_hi = tl.maximum(key_hi, tl.max(tl.where(ok, high, ids.INT32_MIN), axis=0))
            if SELECT:
                below = read_rows(rows, ids.ITEM_KEY_BELOW, ok).to(tl.int32, bitcast=True)
                above = read_rows(rows, ids.ITEM_KEY_ABOVE, ok).to(tl.int32, bitcast=True)
                key_below = tl.maximum(key_below, tl.max(tl.where(ok, below, ids.INT32_MIN), axis=0))
                key_above = tl.minimum(key_above, tl.min(tl.where(ok, above, ids.INT32_MAX), axis=0))
                outside += tl.sum(read_rows(rows, ids.ITEM_OUTSIDE, ok).to(tl.int32), axis=0)
    return n, last, n_lo, n_hi, key_lo, key_hi, key_below, key_above, outside


@triton.jit
def _budget_sums(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, lo_pos, hi_pos, offset, span, w_min, db,
                 DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row over positions [lo_pos, hi_pos): sum w (delta_b_i - D), S = sum w D and W = sum w, the carried
    state a chunk hands to the later chunks of its sequence (docs/math.md section 8)."""
    slack_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    s_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    w_acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    for off in range(lo_pos, hi_pos, BLOCK):
        pos, inside, offs = tile_positions(start, length, off, BLOCK)
        valid = valid_positions(mask_ptr, offs, inside, HAS_MASK)
        d = divergence_tile(lp_ptr, olp_ptr, div_ptr, offs, valid, DIVERGENCE)
        weight = tl.where(valid, position_weight(pos + offset[:, None], span[:, None], w_min), 0.0)
        slack_acc += weight * (db[:, None] - d)
        s_acc += weight * d
        w_acc += weight
    return tl.sum(slack_acc, axis=1), tl.sum(s_acc, axis=1), tl.sum(w_acc, axis=1)


@triton.jit
def _stats_row(cols, loss, tokens, rej_token, rej_budget, clip_low, clip_high, clip_dual, kl, div, capped):
    """One `[ROWS, ids.STATS_POW2]` block of per-sequence sums, in the columns STAT_* (ids.STAT_DELTA_B left 0)."""
    row = tl.where(cols == ids.STAT_LOSS, loss[:, None], 0.0)
    row = tl.where(cols == ids.STAT_TOKENS, tokens[:, None], row)
    row = tl.where(cols == ids.STAT_REJ_TOKEN, rej_token[:, None], row)
    row = tl.where(cols == ids.STAT_REJ_BUDGET, rej_budget[:, None], row)
    row = tl.where(cols == ids.STAT_CLIP_LOW, clip_low[:, None], row)
    row = tl.where(cols == ids.STAT_CLIP_HIGH, clip_high[:, None], row)
    row = tl.where(cols == ids.STAT_CLIP_DUAL, clip_dual[:, None], row)
    row = tl.where(cols == ids.STAT_KL, kl[:, None], row)
    row = tl.where(cols == ids.STAT_DIV, div[:, None], row)
    return tl.where(cols == ids.STAT_RATIO_CAPPED, capped[:, None], row)


# num_seqs is never specialized: a launch with S == 1 would compile a variant of its own, and Triton 3.6 fails
# to compile that packed variant (its coalescing pass asserts on the constant tile search in chunks.work_item)
@triton.jit(do_not_specialize=["num_seqs"])
def token_kernel(
    lp_ptr, olp_ptr, adv_ptr, mask_ptr, rw_ptr, div_ptr, cu_ptr,  # inputs; mask, rw, div, cu may be None
    shard_ptr,  # a shard of longer sequences: [S, ids.SHARD_WIDTH] f64 in and out (carried_state.py), or None
    grad_ptr, loss_ptr, sums_ptr, counter_ptr,  # out: [like log_prob], [], sums (below); the launch state (chunks.py)
    params_ptr,  # [ids.NUM_PARAMS] f32: the config's numbers (ops/plan.py)
    dp_ptr, dp_factor, tokens_ptr, tokens, seqs_ptr, seqs,  # the normalizers (reduce.reduce_stats)
    num_seqs, extent,  # S; the padded row width T, or N of packed input
    METHOD: tl.constexpr, DIVERGENCE: tl.constexpr, GATE: tl.constexpr, SURROGATE: tl.constexpr,
    BUDGET: tl.constexpr, HORIZON: tl.constexpr, ADV_PER_SEQ: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One work item (chunks.py) per program: CHUNK positions of a tile of ROWS = TILE // BLOCK sequences (`ids`),
    walked in blocks of BLOCK positions (mask, loss, gradient, per-sequence sums). The last program to finish
    turns every sequence's sums into the loss and the metrics (`reduce.reduce_stats`), so the forward is one
    launch at every shape.

    `sums` holds aux (the backward scale, then the metrics), from ids.OUT_WIDTH on a row of ids.NUM_STATS per sequence,
    then the items' scratch rows; the loss has its own `[]`. A shard of a longer sequence (docs/math.md section
    8) reads its carried state, the global position of its first token, T_w (ids.HORIZON_GIVEN) and delta_b_i
    (ids.BUDGET_GIVEN) from its row of `shard`, and its last chunk writes the state after the shard there.
    """
    PACKED: tl.constexpr = cu_ptr is not None
    HAS_MASK: tl.constexpr = mask_ptr is not None
    HAS_SHARD: tl.constexpr = shard_ptr is not None
    ROWS: tl.constexpr = ids.TILE // BLOCK
    QUANTILE: tl.constexpr = BUDGET == ids.BUDGET_QUANTILE
    PER_SEQ_MEAN: tl.constexpr = MODE == ids.AGG_SEQ_MEAN_TOKEN_MEAN  # d loss / d L_i has a factor 1 / n_i
    PREPASS: tl.constexpr = needs_prepass(METHOD, BUDGET, HORIZON, MODE, HAS_MASK)
    ticket = tl.atomic_add(counter_ptr + ids.COUNT_TICKET, 1, sem="relaxed")  # start order, nothing published
    CHUNK_STEP: tl.constexpr = ids.CHUNK_ROWS // ROWS  # earlier chunks read at once
    # a one-row tile of several chunks selects its quantile from a histogram, gathering the keys of its bins
    SELECT: tl.constexpr = QUANTILE and ROWS == 1
    STAGES: tl.constexpr = 3 if SELECT else 2
    num_tiles = tl.cdiv(num_seqs, ROWS)
    if PREPASS:
        # the pre-pass items (stage 0), the gathering items (stage 1, SELECT), then the deciding ones, when a tile
        # can have several chunks (runtime.stage_count decides the same). The stages before the last run on the
        # overflow items only (runtime.launch_sizes): chunk 1's item also does chunk 0's part, and a tile of one
        # chunk makes its pre-pass in its deciding item. A slot (flag, scratch row) per item and stage.
        staged = tl.full([], PACKED, tl.int1) | (extent > ids.CHUNK)
        overflow = tl.where(staged, (tl.num_programs(0) - num_tiles) // STAGES, 0)
        items = tl.where(staged, num_tiles + overflow, tl.num_programs(0))
        early = ticket < (STAGES - 1) * overflow
        stage = tl.where(early, ticket // tl.maximum(overflow, 1), STAGES - 1)
        item = tl.where(early, num_tiles + ticket % tl.maximum(overflow, 1), ticket - (STAGES - 1) * overflow)
        decide_base = tl.where(staged, (STAGES - 1) * items, 0)
        slots = tl.where(staged, tl.maximum(STAGES * items, tl.num_programs(0)), tl.num_programs(0))
    else:
        items = tl.num_programs(0)
        stage = tl.zeros([], dtype=tl.int32) + STAGES - 1
        item = ticket
        decide_base = 0
        slots = tl.num_programs(0)
    index = tl.where(stage == STAGES - 1, decide_base, stage * items) + item  # the item's slot
    tile, chunk, first_over = work_item(cu_ptr, item, num_tiles, extent, ROWS, PACKED)
    seq = tile * ROWS + tl.arange(0, ROWS)
    seq_ok = seq < num_seqs
    start, length, bad = _sequences(cu_ptr, seq, seq_ok, num_seqs, extent, PACKED)
    # a tile holding a bad packed sequence is one chunk of nothing: its offsets would place later chunks (and the
    # flags they wait for) anywhere; the loss is NaN anyway
    tile_len = tl.where(tl.max(bad.to(tl.int32), axis=0) > 0, 0, tl.max(length, axis=0))
    num_chunks = tl.maximum(tl.cdiv(tile_len, ids.CHUNK), 1)
    if PREPASS and PACKED:
        # chunk 0's early stages are done by the item that work_item hands chunk 1; offsets out of order elsewhere
        # can hand it to another tile, and then this one runs as one chunk of nothing too, rather than wait
        if num_chunks > 1:
            owner, owner_chunk, _ = work_item(cu_ptr, num_tiles + first_over, num_tiles, extent, ROWS, PACKED)
            tile_len = tl.where((owner != tile) | (owner_chunk != 1), 0, tile_len)
            num_chunks = tl.maximum(tl.cdiv(tile_len, ids.CHUNK), 1)
    lo_pos = chunk * ids.CHUNK
    hi_pos = tl.minimum(lo_pos + ids.CHUNK, tile_len)
    scratch = sums_ptr + ids.OUT_WIDTH + tl.maximum(num_seqs, 1).to(tl.int64) * ids.NUM_STATS
    own = scratch_rows(scratch, index, ROWS)
    delta_b = tl.load(params_ptr + ids.P_DELTA_B)
    delta_b_hi = tl.load(params_ptr + ids.P_DELTA_B_HI)
    quantile_scale = tl.load(params_ptr + ids.P_QUANTILE_SCALE)
    select_row = counter_ptr + ids.FLAGS + slots + first_over * ids.SELECT_WIDTH  # SELECT's

    # a gap: no chunk here (an overflow item can only land on chunk 0 through bad offsets)
    if (tile >= num_tiles) | (chunk >= num_chunks) | (chunk < 0) | ((chunk < 1) & (item >= num_tiles)):
        finish_item(counter_ptr, index)
    elif stage < STAGES - 1:  # an overflow item: its chunk, and chunk 0 too for chunk 1's item
        first = tl.where(chunk == 1, 0, chunk)
        if stage == 0:
            if PREPASS:
                for c in range(first, chunk + 1):
                    c_index = item_index(tile, c, first_over, num_tiles)
                    c_own = scratch_rows(scratch, c_index, ROWS)
                    n, last, n_lo, n_hi, key_min, key_max, key_below, key_above, outside = _prepass(
                        lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, c * ids.CHUNK,
                        tl.minimum((c + 1) * ids.CHUNK, tile_len), delta_b, delta_b_hi, quantile_scale, select_row,
                        DIVERGENCE, HAS_MASK, QUANTILE, SELECT, ROWS, BLOCK)
                    tl.store(c_own + ids.ITEM_N, n.to(tl.float32))
                    tl.store(c_own + ids.ITEM_LAST, last)
                    tl.store(c_own + ids.ITEM_LO, n_lo.to(tl.float32))
                    tl.store(c_own + ids.ITEM_HI, n_hi.to(tl.float32))
                    tl.store(c_own + ids.ITEM_KEY_MIN, key_min.to(tl.float32, bitcast=True))
                    tl.store(c_own + ids.ITEM_KEY_MAX, key_max.to(tl.float32, bitcast=True))
                    if SELECT:
                        tl.store(c_own + ids.ITEM_KEY_BELOW, key_below.to(tl.float32, bitcast=True))
                        tl.store(c_own + ids.ITEM_KEY_ABOVE, key_above.to(tl.float32, bitcast=True))
                        tl.store(c_own + ids.ITEM_OUTSIDE, outside.to(tl.float32))
                    publish(counter_ptr, c_index, ids.DONE)
        else:  # gathering (SELECT)
            if SELECT:
                n, _, n_lo, n_hi, _, _, _, _, outside = _prepass_totals(
                    counter_ptr, scratch, tile, first_over, num_tiles, num_chunks, QUANTILE, SELECT, ROWS, CHUNK_STEP)
                kb, ka, _, _, need = quantile_ranks(params_ptr, n, n_lo, n_hi, seq_ok)
                gather = tl.max(need.to(tl.int32), axis=0) > 0
                for c in range(first, chunk + 1):
                    if gather:
                        gather_keys(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, c * ids.CHUNK,
                                    tl.minimum((c + 1) * ids.CHUNK, tile_len), select_row, n_lo, n_hi, outside, kb,
                                    ka, delta_b, delta_b_hi, quantile_scale, DIVERGENCE, HAS_MASK, BLOCK)
                    publish(counter_ptr, items + item_index(tile, c, first_over, num_tiles), ids.DONE)
    else:
        w_min = tl.load(params_ptr + ids.P_W_MIN)
        ratio_cap = tl.load(params_ptr + ids.P_RATIO_CAP)
        log_ratio_clamp = tl.load(params_ptr + ids.P_LOG_RATIO_CLAMP)
        if HAS_SHARD:
            shard_row = shard_ptr + seq.to(tl.int64) * ids.SHARD_WIDTH
        # ---- n_i, the last valid position and the quantile's counts: the sums of the tile's pre-pass items ----
        last = length.to(tl.float32)
        n_valid = length.to(tl.int32)
        if PREPASS:
            if num_chunks == 1:  # the whole tile is this item's
                n_valid, last_max, n_lo, n_hi, key_lo, key_hi, key_below, key_above, outside = _prepass(
                    lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, 0, tile_len, delta_b, delta_b_hi,
                    quantile_scale, select_row, DIVERGENCE, HAS_MASK, QUANTILE, False, ROWS, BLOCK)
            else:
                n_valid, last_max, n_lo, n_hi, key_lo, key_hi, key_below, key_above, outside = _prepass_totals(
                    counter_ptr, scratch, tile, first_over, num_tiles, num_chunks, QUANTILE, SELECT, ROWS, CHUNK_STEP)
            if HAS_MASK:
                last = last_max
        offset = tl.zeros([ROWS], dtype=tl.int64)
        if HAS_SHARD:  # positions are global: the shard starts at position offset + 1
            offset = tl.load(shard_row + ids.SHARD_OFFSET, mask=seq_ok, other=0).to(tl.int64)
            last = tl.where(last > 0, last + offset.to(tl.float32), 0.0)

        # ---- T_w and the per-sequence budget delta_b_i, `[ROWS]` ----
        if HORIZON == ids.HORIZON_ARG:
            horizon = tl.load(params_ptr + ids.P_HORIZON)
        elif HORIZON == ids.HORIZON_WIDTH:
            horizon = tl.cast(extent, tl.float32)
        elif HORIZON == ids.HORIZON_MAX_LEN:
            horizon = _longest(cu_ptr, num_seqs)
        elif HORIZON == ids.HORIZON_GIVEN:
            horizon = tl.load(shard_row + ids.SHARD_LENGTH, mask=seq_ok, other=0).to(tl.float32)
        else:
            horizon = last
        span = tl.maximum(horizon - 1.0, 1.0) + tl.zeros([ROWS], dtype=tl.float32)
        db = delta_b + tl.zeros([ROWS], dtype=tl.float32)
        if BUDGET == ids.BUDGET_GIVEN:
            db = finite_or_nan(tl.load(shard_row + ids.SHARD_DELTA_B, mask=seq_ok, other=0.0).to(tl.float32))
        if QUANTILE:
            # k d_(ka) <= lo: k * quantile clamps to lo; k d_(kb) >= hi: to hi (an empty row keeps lo, unused)
            kb, ka, frac, at_lo, need = quantile_ranks(params_ptr, n_valid, n_lo, n_hi, seq_ok)
            db = tl.where(at_lo, delta_b, delta_b_hi)
            if tl.max(need.to(tl.int32), axis=0) > 0:
                if (num_chunks == 1) | (chunk == 0):  # selects; chunk 0 for the tile's chunks
                    if num_chunks == 1:  # the whole sequence is this item's
                        if tile_len <= ids.RESIDENT_BLOCKS * BLOCK:
                            value = select_quantile(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len,
                                                    need, kb, ka, frac, key_lo, key_hi, DIVERGENCE, HAS_MASK, ROWS,
                                                    BLOCK, True)
                        else:
                            value = select_quantile(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len,
                                                    need, kb, ka, frac, key_lo, key_hi, DIVERGENCE, HAS_MASK, ROWS,
                                                    BLOCK, False)
                    elif SELECT:  # among the keys the gathering items gathered (each of them has published)
                        for c0 in range(0, num_chunks, CHUNK_STEP):
                            wait_for_chunks(counter_ptr, scratch, items, tile, first_over, num_tiles, c0, num_chunks,
                                            ids.DONE, ROWS, CHUNK_STEP)
                        value = select_gathered(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len,
                                                select_row, need, n_lo, n_hi, outside, kb, ka, frac, key_below,
                                                key_above, key_lo, key_hi, DIVERGENCE, HAS_MASK, BLOCK)
                    else:  # bisecting over the whole tile
                        value = select_quantile(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len, need,
                                                kb, ka, frac, key_lo, key_hi, DIVERGENCE, HAS_MASK, ROWS, BLOCK, False)
                    db = calibrated_budget(value, need, db, delta_b, delta_b_hi, quantile_scale)
                    if num_chunks > 1:  # the tile's other chunks read delta_b_i in chunk 0's row
                        tl.store(own + ids.ITEM_DELTA_B, db)
                        publish(counter_ptr, index, ids.READY_DELTA_B)
                else:
                    rows, ok = wait_for_chunks(counter_ptr, scratch, decide_base, tile, first_over, num_tiles, 0,
                                               1, ids.READY_DELTA_B, ROWS, CHUNK_STEP)  # chunk 0's row
                    db = tl.sum(read_rows(rows, ids.ITEM_DELTA_B, ok), axis=0)
            elif SELECT:
                if (num_chunks > 1) & (chunk == 0):  # nobody reads the tile's histogram: back to zero
                    clear_select_row(select_row)

        # ---- the carried state before this chunk: the shard's, plus the budget sums of the earlier chunks ----
        if HAS_SHARD:
            carry_slack = finite_or_nan(tl.load(shard_row + ids.STATE_SLACK, mask=seq_ok, other=0.0).to(tl.float32))
            carry_s = finite_or_nan(tl.load(shard_row + ids.STATE_S, mask=seq_ok, other=0.0).to(tl.float32))
            carry_w = finite_or_nan(tl.load(shard_row + ids.STATE_W, mask=seq_ok, other=0.0).to(tl.float32))
        else:
            carry_slack = tl.zeros([ROWS], dtype=tl.float32)  # sum of w (delta_b_i - D) = delta_b_i W - S
            carry_s = tl.zeros([ROWS], dtype=tl.float32)  # S (soft gate, and the state)
            carry_w = tl.zeros([ROWS], dtype=tl.float32)  # W (soft gate, and the state)
        if METHOD == ids.METHOD_CPPO:
            if chunk < num_chunks - 1:  # the later chunks start from these sums
                slack, s, w = _budget_sums(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, lo_pos, hi_pos,
                                           offset, span, w_min, db, DIVERGENCE, HAS_MASK, ROWS, BLOCK)
                tl.store(own + ids.ITEM_SLACK, slack)
                tl.store(own + ids.ITEM_S, s)
                tl.store(own + ids.ITEM_W, w)
                publish(counter_ptr, index, ids.READY_SUMS)
            for c0 in range(0, chunk, CHUNK_STEP):  # the same tree of sums in every run
                rows, ok = wait_for_chunks(counter_ptr, scratch, decide_base, tile, first_over, num_tiles, c0,
                                           chunk, ids.READY_SUMS, ROWS, CHUNK_STEP)
                carry_slack += tl.sum(read_rows(rows, ids.ITEM_SLACK, ok), axis=0)
                carry_s += tl.sum(read_rows(rows, ids.ITEM_S, ok), axis=0)
                carry_w += tl.sum(read_rows(rows, ids.ITEM_W, ok), axis=0)

        # ---- per-token mask, loss and gradient; the chunk's per-sequence sums ----
        if ADV_PER_SEQ:
            adv_seq = finite_or_nan(tl.load(adv_ptr + seq, mask=seq_ok, other=0.0).to(tl.float32))
        if PER_SEQ_MEAN:
            inv_n = 1.0 / tl.maximum(n_valid, 1).to(tl.float32)
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
        for off in range(lo_pos, hi_pos, BLOCK):
            pos, inside, offs = tile_positions(start, length, off, BLOCK)
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
            d = divergence_tile(lp_ptr, olp_ptr, div_ptr, offs, valid, DIVERGENCE)
            weight = valid.to(tl.float32)
            if METHOD == ids.METHOD_CPPO:
                weight = tl.where(valid, position_weight(pos + offset[:, None], span[:, None], w_min), 0.0)
            loss, grad, rej_tok, rej_bud, clip_lo, clip_hi, clip_du, carry_slack, carry_s, carry_w = \
                trust_region_step(lp, x, dx, r, d, adv, valid, weight, db, carry_slack, carry_s, carry_w,
                                  params_ptr, METHOD, GATE, SURROGATE, HAS_SHARD)
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
            if METHOD != ids.METHOD_PPO:  # kept, with the ratio over the logp surrogate's cap (r of A = 0 uncapped)
                capped_acc += (valid & ~(rej_tok | rej_bud) & (tl.exp(x) > ratio_cap)).to(tl.float32)
            div_acc += d
        cols = tl.arange(0, ids.STATS_POW2)[None, :]
        stats = _stats_row(cols, tl.sum(loss_acc, axis=1), tl.sum(tok_acc, axis=1), tl.sum(rej_tok_acc, axis=1),
                           tl.sum(rej_bud_acc, axis=1), tl.sum(clip_lo_acc, axis=1), tl.sum(clip_hi_acc, axis=1),
                           tl.sum(clip_du_acc, axis=1), tl.sum(kl_acc, axis=1), tl.sum(div_acc, axis=1),
                           tl.sum(capped_acc, axis=1))
        in_stats = cols < ids.NUM_STATS
        if chunk < num_chunks - 1:  # the tile's last chunk adds these
            tl.store(own[:, None] + ids.ITEM_STATS + cols, stats, mask=in_stats)
            publish(counter_ptr, index, ids.READY_STATS)
        else:
            total = tl.zeros([ROWS, ids.STATS_POW2], dtype=tl.float32)
            for c0 in range(0, chunk, CHUNK_STEP):  # the same tree of sums in every run
                rows, ok = wait_for_chunks(counter_ptr, scratch, decide_base, tile, first_over, num_tiles, c0,
                                           chunk, ids.READY_STATS, ROWS, CHUNK_STEP)
                for j in tl.static_range(ids.NUM_STATS):  # a column at a time: `[chunks, rows]` loads
                    part = tl.sum(read_rows(rows, ids.ITEM_STATS + j, ok), axis=0)
                    total = tl.where(cols == j, total + part[:, None], total)
            total += stats
            n_tokens = tl.sum(tl.where(cols == ids.STAT_TOKENS, total, 0.0), axis=1)
            total = tl.where(cols == ids.STAT_DELTA_B, tl.where(n_tokens > 0, db, 0.0)[:, None], total)
            # bad cu_seqlens: NaN loss, metrics and (through a NaN n_i, which the reduction turns into a NaN
            # scale) gradient, never a plausible number
            poison = tl.where(bad, float("nan"), 0.0)
            row = sums_ptr + ids.OUT_WIDTH + seq.to(tl.int64) * ids.NUM_STATS
            tl.store(row[:, None] + cols, total + poison[:, None], mask=seq_ok[:, None] & in_stats)
            if HAS_SHARD:
                tl.store(shard_row + ids.SHARD_FINAL + ids.STATE_SLACK, carry_slack + poison, mask=seq_ok)
                tl.store(shard_row + ids.SHARD_FINAL + ids.STATE_S, carry_s + poison, mask=seq_ok)
                tl.store(shard_row + ids.SHARD_FINAL + ids.STATE_W, carry_w + poison, mask=seq_ok)
            finish_item(counter_ptr, index)
    # ---- the reduction, by the last program to finish (the others' stats are then in memory) ----
    tl.debug_barrier()  # every thread's stores are issued before this program counts itself done
    done = tl.atomic_add(counter_ptr + ids.COUNT_DONE, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        reduce_stats(sums_ptr, loss_ptr, num_seqs, cu_ptr, extent, dp_ptr, dp_factor, tokens_ptr, tokens, seqs_ptr,
                     seqs, METHOD, MODE)
        reset_launch_state(counter_ptr, slots)
