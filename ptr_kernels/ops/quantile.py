"""The calibrated delta_b's order statistics (docs/math.md section 3; docs/kernels.md, "Calibrated delta_b"):
bisection on order-preserving int32 keys of the float32 D, counting in registers when the tile is small enough
and in passes over memory otherwise; for a one-row tile of several chunks, a histogram of the keys inside the
clamp's bounds built by the pre-pass items, the keys of the wanted bins gathered by the gathering items, and the
selection among them in registers by chunk 0."""

from __future__ import annotations

import triton
import triton.language as tl

from . import ids
from .common import key_value, order_key, tile_keys


@triton.jit
def rank_counts(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len, bound, keys, valid,
                DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                RESIDENT: tl.constexpr):
    """Per row `[ROWS]`: #{valid t : key(D_t) <= bound} and the smallest valid key above `bound` (ids.INT32_MAX if
    none), from the keys in registers (RESIDENT: `keys`, `valid` hold the whole tile) or a pass over memory."""
    if RESIDENT:
        count = tl.sum((valid & (keys <= bound[:, None])).to(tl.int32), axis=1)
        above = tl.min(tl.where(valid & (keys > bound[:, None]), keys, ids.INT32_MAX), axis=1)
    else:
        count_acc = tl.zeros([ROWS, BLOCK], dtype=tl.int32)
        above_acc = tl.full([ROWS, BLOCK], ids.INT32_MAX, dtype=tl.int32)
        for off in range(0, tile_len, BLOCK):
            key, ok = tile_keys(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, off, DIVERGENCE, HAS_MASK,
                                BLOCK)
            count_acc += (ok & (key <= bound[:, None])).to(tl.int32)
            above_acc = tl.minimum(above_acc, tl.where(ok & (key > bound[:, None]), key, ids.INT32_MAX))
        count = tl.sum(count_acc, axis=1)
        above = tl.min(above_acc, axis=1)
    return count, above


@triton.jit
def select_quantile(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len, need, kb, ka, frac,
                    key_lo, key_hi,
                    DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    RESIDENT: tl.constexpr):
    """Per row: d_(kb) + frac * (d_(ka) - d_(kb)) from the order statistics kb <= ka (0-based) of the valid D.

    Bisection on the int32 keys in [key_lo, key_hi] (the range of the row's keys) for the smallest key with
    at least kb + 1 keys <= it, all rows of the tile together (rows where `need` is False do not iterate);
    then d_(ka) is the same value or the next larger key. RESIDENT (a tile of at most ids.RESIDENT_BLOCKS * BLOCK
    positions per row): the keys are loaded once and every step counts in registers; else one counting pass
    over memory per step.
    """
    keys = key_lo
    valid = need
    if RESIDENT:
        keys, valid = tile_keys(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, 0, DIVERGENCE, HAS_MASK,
                                ids.RESIDENT_BLOCKS * BLOCK)
    key_lo = tl.where(need, key_lo, 0)
    key_hi = tl.where(need, key_hi, 0)
    while tl.max((key_lo < key_hi).to(tl.int32), axis=0) > 0:
        active = key_lo < key_hi
        mid = ((key_lo.to(tl.int64) + key_hi.to(tl.int64)) >> 1).to(tl.int32)  # floor, no int32 overflow
        count, _ = rank_counts(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len, mid, keys, valid,
                               DIVERGENCE, HAS_MASK, ROWS, BLOCK, RESIDENT)
        enough = count >= kb + 1
        key_hi = tl.where(active & enough, mid, key_hi)
        key_lo = tl.where(active & ~enough, mid + 1, key_lo)
    key_b = key_lo
    # how many keys tie with d_(kb), and the next larger key
    n_le, above = rank_counts(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len, key_b, keys, valid,
                              DIVERGENCE, HAS_MASK, ROWS, BLOCK, RESIDENT)
    key_a = tl.where(n_le >= ka + 1, key_b, above)
    d_b = key_value(key_b)
    d_a = key_value(key_a)
    return d_b + frac * (d_a - d_b)


@triton.jit
def calibrated_budget(value, need, db, delta_b, delta_b_hi, quantile_scale):
    """delta_b_i = clamp(k * Quantile_q(D), delta_b, max_mult * delta_b) where the row needs its quantile `value`;
    elsewhere `db` (the clamp's bound that the pre-pass counts already decided)."""
    return tl.where(need, tl.minimum(tl.maximum(quantile_scale * value, delta_b), delta_b_hi), db)


# ---- a sequence over several chunks (tiles of one row): a histogram, then the keys of one or two bins ----

@triton.jit
def window_base(delta_b, quantile_scale):
    """The first key of the histogram's window: ids.SELECT_MARGIN keys below the key of lo / k (a key strictly
    inside (lo, hi) that falls outside the window is counted, and the tile then bisects over memory)."""
    return order_key(delta_b / quantile_scale) - ids.SELECT_MARGIN


@triton.jit
def window_bins(d, key, valid, lo, hi, base, quantile_scale):
    """Per position: whether k D is strictly inside (lo, hi) (the complement of the pre-pass counts' k D <= lo
    and k D >= hi) with its key in the window, and the key's bin."""
    scaled = d * quantile_scale
    offset = key - base
    in_window = valid & (scaled > lo) & (scaled < hi)
    in_window &= (offset >= 0) & (offset < (ids.SELECT_BINS << ids.SELECT_SHIFT))
    return in_window, offset >> ids.SELECT_SHIFT


@triton.jit
def order_statistic(keys, ok, rank):
    """The key of 0-based rank `rank` among the keys `[C]` where `ok` (bisection in registers)."""
    lo = tl.min(tl.where(ok, keys, ids.INT32_MAX), axis=0)
    hi = tl.max(tl.where(ok, keys, ids.INT32_MIN), axis=0)
    while lo < hi:
        mid = ((lo.to(tl.int64) + hi.to(tl.int64)) >> 1).to(tl.int32)
        enough = tl.sum((ok & (keys <= mid)).to(tl.int32), axis=0) >= rank + 1
        hi = tl.where(enough, mid, hi)
        lo = tl.where(enough, lo, mid + 1)
    return lo


@triton.jit
def quantile_ranks(params_ptr, n, n_lo, n_hi, seq_ok):
    """torch.quantile's position q (n - 1): the ranks kb <= ka (0-based) it interpolates between, and `frac`;
    whether k d_(ka) <= lo (delta_b_i = lo, also for an empty row) and whether the row needs the order statistics
    (k d_(kb) < hi: else delta_b_i = hi). `[ROWS]` each, from the pre-pass counts."""
    rank = tl.load(params_ptr + ids.P_QUANTILE) * (n - 1).to(tl.float32)
    kb = tl.floor(rank).to(tl.int32)
    frac = rank - kb.to(tl.float32)
    ka = kb + (frac > 0).to(tl.int32)
    at_lo = (n == 0) | (n_lo >= ka + 1)
    return kb, ka, frac, at_lo, seq_ok & ~at_lo & (n_hi > kb)


@triton.jit
def target_bins(row, n_lo, n_hi, kb, ka):
    """From the tile's histogram `row` (a one-row tile: `[1]` counts and ranks): the bins [first, last] holding
    the region ranks kb - n_lo and ka - n_lo (the bins between are empty: kb, ka are neighbours), the keys in
    them, the region keys below them, whether each rank is in the region (kb below it is the largest key <= lo,
    ka past it the smallest key >= hi), and the two ranks; scalars."""
    low = tl.sum(kb - n_lo, axis=0)
    high = tl.sum(ka - n_lo, axis=0)
    in_b = low >= 0  # kb < n_hi: the tile needs the quantile
    in_a = tl.sum(ka - n_hi, axis=0) < 0  # ka >= n_lo likewise
    bins = tl.arange(0, ids.SELECT_BINS)
    hist = tl.load(row + ids.SELECT_HIST + bins, cache_modifier=".cg")
    cum = tl.cumsum(hist, axis=0)
    bin_b = tl.sum((cum <= low).to(tl.int32), axis=0)
    bin_a = tl.sum((cum <= high).to(tl.int32), axis=0)
    first = tl.where(in_b, bin_b, bin_a)
    last = tl.where(in_a, bin_a, bin_b)
    count = tl.sum(tl.where((bins >= first) & (bins <= last) & (in_b | in_a), hist, 0), axis=0)
    before = tl.sum(tl.where(bins < first, hist, 0), axis=0)
    return first, last, count, before, in_b, in_a, low, high


@triton.jit
def gathers(outside, count):
    """Whether a tile's keys are gathered and selected in registers: every key inside (lo, hi) fell in the window
    and the target bins hold at most ids.SELECT_CANDIDATES keys (else chunk 0 bisects over memory)."""
    return (tl.sum(outside, axis=0) == 0) & (count <= ids.SELECT_CANDIDATES)


@triton.jit
def gather_keys(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, lo_pos, hi_pos, row, n_lo, n_hi, outside,
                kb, ka, delta_b, delta_b_hi, quantile_scale,
                DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """A gathering item of a one-row tile of several chunks: the keys of its chunk [lo_pos, hi_pos) in the target
    bins, appended to the tile's row (in any order: only their order statistics are read), unless keys fell
    outside the window or the bins hold more than ids.SELECT_CANDIDATES (chunk 0 then bisects over memory)."""
    first, last, count, _, _, _, _, _ = target_bins(row, n_lo, n_hi, kb, ka)
    if gathers(outside, count) & (count > 0):
        base = window_base(delta_b, quantile_scale)
        for off in range(lo_pos, hi_pos, BLOCK):
            key, valid = tile_keys(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, off, DIVERGENCE, HAS_MASK,
                                   BLOCK)
            in_window, key_bin = window_bins(key_value(key), key, valid, delta_b, delta_b_hi, base, quantile_scale)
            take = tl.reshape(in_window & (key_bin >= first) & (key_bin <= last), [BLOCK]).to(tl.int32)
            taken = tl.sum(take, axis=0)
            if taken > 0:
                slot = tl.atomic_add(row + ids.SELECT_GATHERED, taken, sem="relaxed")
                tl.store(row + ids.SELECT_KEYS + slot + tl.cumsum(take, axis=0) - 1, tl.reshape(key, [BLOCK]),
                         mask=take > 0)


@triton.jit
def select_gathered(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len, row, need, n_lo, n_hi, outside,
                    kb, ka, frac, key_below, key_above, key_lo, key_hi,
                    DIVERGENCE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """Chunk 0 of a one-row tile of several chunks, once every gathering item is done: d_(kb) + frac (d_(ka) -
    d_(kb)) `[1]` from the gathered keys in registers, or (keys outside the window, too many in the bins) by
    bisection over the whole sequence; the tile's row is then set back to zero."""
    _, _, count, before, in_b, in_a, low, high = target_bins(row, n_lo, n_hi, kb, ka)
    if gathers(outside, count):
        c = tl.arange(0, ids.SELECT_CANDIDATES)
        ok = c < count
        keys = tl.load(row + ids.SELECT_KEYS + c, mask=ok, other=0, cache_modifier=".cg")
        key_b = tl.where(in_b, order_statistic(keys, ok, low - before), tl.sum(key_below, axis=0))
        key_a = tl.where(in_a, order_statistic(keys, ok, high - before), tl.sum(key_above, axis=0))
        d_b = key_value(key_b)
        value = tl.zeros([1], dtype=tl.float32) + (d_b + tl.sum(frac, axis=0) * (key_value(key_a) - d_b))
    else:
        value = select_quantile(lp_ptr, olp_ptr, div_ptr, mask_ptr, start, length, tile_len, need, kb, ka, frac,
                                key_lo, key_hi, DIVERGENCE, HAS_MASK, 1, BLOCK, False)
    clear_select_row(row)
    return value


@triton.jit
def clear_select_row(row):
    """The tile's histogram row back to zero for the next launch (every reader is done with it)."""
    tl.store(row + ids.SELECT_HIST + tl.arange(0, ids.SELECT_BINS), tl.zeros([ids.SELECT_BINS], dtype=tl.int32))
    tl.store(row + ids.SELECT_ARRIVED, 0)
    tl.store(row + ids.SELECT_GATHERED, 0)
