"""The calibrated delta_b's order statistics (docs/math.md section 3; docs/kernels.md, "Calibrated delta_b"):
bisection on order-preserving int32 keys of the float32 D, counting in registers when the tile is small enough
and in passes over memory otherwise."""

from __future__ import annotations

import triton
import triton.language as tl

from . import ids
from .common import key_value, tile_keys


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
