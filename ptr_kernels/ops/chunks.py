"""The token kernel's work items and how its programs hand results to each other (docs/kernels.md).

A work item is one chunk of CHUNK positions of a tile of ROWS sequences, so that a long sequence is spread over
many programs and the cost follows the tokens, not the longest sequence. Chunk 0 of every tile is a "main" item
(item = tile); the later chunks of long tiles are "overflow" items after them. A chunk hands on what its
successors need through a row of `scratch` per item and sequence, and a flag per item that only grows
(READY_*); the tile's last chunk sums the chunks' statistics in chunk order (deterministic) into the sequence's row.

Deadlock freedom: a program takes its item from a ticket (an atomic count in start order), and an item only
waits for items of smaller tickets, which have started and wait only for smaller ones still. In the Triton
interpreter, which runs the programs one after another in order, every wait is already satisfied. When the
kernel needs a whole sequence before deciding any token (`needs_prepass`: the calibrated delta_b, n_i or the last
valid position under a mask), the pre-pass items come first (and for a long sequence's quantile the gathering
items), then the deciding ones, which read the pre-pass rows of their tile. The stages before the deciding one
run on the overflow items only: chunk 1's item also does chunk 0's part, and a tile of one chunk makes its
pre-pass in its deciding item. Each item has a slot per stage (a flag, a scratch row), `stage * items + item`.

The flags, the ticket and the count of finished programs live in one int32 buffer per device (`runtime.launch_state`),
all zero between launches: the last program to finish sets them back.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import ids


@triton.constexpr_function
def needs_prepass(method, budget, horizon, mode, has_mask):
    """Whether a token's decision needs its whole sequence first: the calibrated delta_b_i, or (under a mask) n_i
    for seq-mean-token-mean or cppo's T_w = the last valid position."""
    per_seq_mean = mode == ids.AGG_SEQ_MEAN_TOKEN_MEAN.value
    cppo_last = method == ids.METHOD_CPPO.value and horizon == ids.HORIZON_LAST.value
    return budget == ids.BUDGET_QUANTILE.value or (has_mask and (per_seq_mean or cppo_last))


@triton.jit
def tile_start(cu_ptr, tile, extent, ROWS: tl.constexpr, PACKED: tl.constexpr):
    """Offset of the tile's first token: cu[tile * ROWS], or tile * ROWS * T of padded rows."""
    if PACKED:
        return tl.load(cu_ptr + tile * ROWS).to(tl.int64)
    return tile.to(tl.int64) * ROWS * extent


@triton.jit
def work_item(cu_ptr, item, num_tiles, extent, ROWS: tl.constexpr, PACKED: tl.constexpr):
    """(tile, chunk, first overflow index) of `item`.

    Items below num_tiles are chunk 0 of that tile. The overflow items of tile t are num_tiles + o(t) + c - 1
    for its chunks c >= 1: o(t) = t (chunks per row - 1) for padded rows (every tile has the same chunks),
    or start(t) // ids.CHUNK for packed ones, which leaves room for them (a tile of sum L tokens has at most
    L // ids.CHUNK chunks beyond its first), found by a search over the tiles' starts. An overflow item beyond its
    tile's chunks is a gap (chunk >= the tile's chunks)."""
    is_main = item < num_tiles
    over = (item - num_tiles).to(tl.int64)
    tile = item.to(tl.int64)
    if PACKED:
        if item >= num_tiles:
            # the last tile whose o(t) <= over: SEARCH_WAYS tiles probed per step, so a few dependent loads
            lo = tl.zeros([], dtype=tl.int64)
            hi = tl.maximum(num_tiles - 1, 0).to(tl.int64)
            while lo < hi:
                stride = (hi - lo + ids.SEARCH_WAYS) // ids.SEARCH_WAYS  # cdiv(hi - lo + 1, ways)
                probe = lo + tl.arange(0, ids.SEARCH_WAYS).to(tl.int64) * stride
                first = tl.load(cu_ptr + probe * ROWS, mask=probe <= hi, other=0).to(tl.int64) // ids.CHUNK
                lo = tl.max(tl.where((probe <= hi) & (first <= over), probe, lo), axis=0)
                hi = tl.minimum(hi, lo + stride - 1)
            tile = lo
        first_over = tile_start(cu_ptr, tile, extent, ROWS, PACKED) // ids.CHUNK
    else:
        later = tl.maximum(tl.cdiv(extent, ids.CHUNK), 1).to(tl.int64) - 1  # chunks per row after the first
        if item >= num_tiles:
            tile = over // tl.maximum(later, 1)
        first_over = tile * later
    chunk = tl.where(is_main, 0, over - first_over + 1)
    return tile, chunk, first_over


@triton.jit
def item_index(tile, chunk, first_over, num_tiles):
    """The item (within its stage) of chunk `chunk` of the tile whose overflow items start at first_over."""
    return tl.where(chunk == 0, tile, num_tiles + first_over + chunk - 1)


@triton.jit
def scratch_rows(scratch_ptr, index, ROWS: tl.constexpr):
    """Pointers to the scratch rows of slot `index` (stage * items + item: pre-pass and deciding items apart):
    `[ROWS]`, or `[C, ROWS]` for an index `[C, 1]`."""
    return scratch_ptr + (index.to(tl.int64) * ROWS + tl.arange(0, ROWS)) * ids.ITEM_WIDTH


@triton.jit
def read_rows(rows, field, ok):
    """Column `field` of published scratch rows `[C, ROWS]` (0 where the chunk mask `ok [C, 1]` is False), from L2
    (`.cg`): other programs wrote them, and an L1 line could be stale."""
    return tl.load(rows + field, mask=ok, other=0.0, cache_modifier=".cg")


@triton.jit
def publish(counter_ptr, index, state):
    """Raise item `index`'s flag to `state` once every thread's stores before are issued (release)."""
    tl.debug_barrier()
    tl.atomic_xchg(counter_ptr + ids.FLAGS + index, state, sem="release")


@triton.jit
def finish_item(counter_ptr, index):
    """Item `index` is done, with nothing more to hand on (relaxed: no data is published with it); a flag that
    only ends the waits of items mapped onto it by bad packed offsets."""
    tl.atomic_xchg(counter_ptr + ids.FLAGS + index, ids.DONE, sem="relaxed")


@triton.jit
def wait_for_chunks(counter_ptr, scratch_ptr, base, tile, first_over, num_tiles, c0, count, state,
                    ROWS: tl.constexpr, CHUNK_STEP: tl.constexpr):
    """The scratch rows `[CHUNK_STEP, ROWS]` of a tile's chunks c0 .. c0 + CHUNK_STEP - 1 (those below `count`,
    the mask `[CHUNK_STEP, 1]`; read them with `read_rows`) in the stage whose items start at `base`, once every
    one's flag is at least `state`: one vector of acquire loads per spin, so waiting for many chunks costs one
    round trip, not one each."""
    c = c0 + tl.arange(0, CHUNK_STEP)
    ok = c < count
    index = base + item_index(tile, c, first_over, num_tiles)
    ready = tl.zeros([], dtype=tl.int32)  # a scalar carried by the loop (a vector one breaks Triton 3.6)
    while ready == 0:
        seen = tl.atomic_add(counter_ptr + ids.FLAGS + index, 0, mask=ok, sem="acquire")
        ready = (tl.min(tl.where(ok, seen, state), axis=0) >= state).to(tl.int32)
    return scratch_rows(scratch_ptr, index[:, None], ROWS), ok[:, None]


@triton.jit
def reset_launch_state(counter_ptr, num_flags):
    """The last program: every flag, the ticket and the count back to 0 for the next launch."""
    for off in range(0, num_flags, 1024):
        i = off + tl.arange(0, 1024)
        tl.store(counter_ptr + ids.FLAGS + i, tl.zeros([1024], dtype=tl.int32), mask=i < num_flags)
    tl.store(counter_ptr + ids.COUNT_TICKET, 0)  # the launch's end makes these visible to the next one
    tl.store(counter_ptr + ids.COUNT_DONE, 0)
