"""The kernels' numbering: branch ids, the columns of the per-sequence statistics and of `aux`, the indices into
`params`, the layouts of a shard's row and of a work item's rows, the slots of the launch state, block sizes.

Kernels read these as attributes of this module (`ids.STAT_LOSS`), never as globals of their own module: at every
launch Triton compares each global constexpr a kernel uses with its value at compile time (over a microsecond each on
a GPU machine's host, about a hundred of them here), and it never checks a module's attributes.
"""

from __future__ import annotations

import triton.language as tl

from .. import carried_state
from ..reference import logits as reference_logits
from ..config import METHOD_METRICS

# ---- branch ids (compile-time) ----
METHOD_CPPO = tl.constexpr(0)
METHOD_DPPO = tl.constexpr(1)
METHOD_PPO = tl.constexpr(2)
DIV_BINARY_TV = tl.constexpr(0)  # |pi - mu|
DIV_BINARY_KL = tl.constexpr(1)  # KL(mu || pi) on {y_t, rest}
DIV_GIVEN = tl.constexpr(2)  # read from memory (the from-logits path computes Top-K divergences)
GATE_HARD = tl.constexpr(0)
GATE_SOFT = tl.constexpr(1)
SURROGATE_RATIO = tl.constexpr(0)  # -A r M
SURROGATE_LOGP = tl.constexpr(1)  # -A sg(min(r, cap)) log_prob M
# where T_w comes from: the last valid position, an int horizon (params), the padded row width, the longest
# packed sequence, or per sequence from the carried state (a shard of a longer sequence, docs/math.md section 8)
HORIZON_LAST = tl.constexpr(0)
HORIZON_ARG = tl.constexpr(1)
HORIZON_MAX_LEN = tl.constexpr(2)
HORIZON_GIVEN = tl.constexpr(3)
HORIZON_WIDTH = tl.constexpr(4)
# where delta_b_i comes from: the config's delta_b, the calibrated quantile, or the carried state (a shard)
BUDGET_FIXED = tl.constexpr(0)
BUDGET_QUANTILE = tl.constexpr(1)
BUDGET_GIVEN = tl.constexpr(2)
# loss_agg_mode, in the order of config.LOSS_AGG_MODES
AGG_TOKEN_MEAN = tl.constexpr(0)
AGG_TOKEN_SUM = tl.constexpr(1)
AGG_SEQ_MEAN_TOKEN_SUM = tl.constexpr(2)
AGG_SEQ_MEAN_TOKEN_MEAN = tl.constexpr(3)
AGG_SEQ_MEAN_TOKEN_SUM_NORM = tl.constexpr(4)

# ---- per-sequence statistics `[S, NUM_STATS]` written by the token kernel, read by the reduction ----
STAT_LOSS = tl.constexpr(0)  # L_i
STAT_TOKENS = tl.constexpr(1)  # n_i
STAT_REJ_TOKEN = tl.constexpr(2)  # rejected by the token threshold (ppo: clipped)
STAT_REJ_BUDGET = tl.constexpr(3)  # rejected by the prefix budget only
STAT_CLIP_LOW = tl.constexpr(4)
STAT_CLIP_HIGH = tl.constexpr(5)
STAT_CLIP_DUAL = tl.constexpr(6)
STAT_KL = tl.constexpr(7)  # sum of -x_t (the clamped log-ratio)
STAT_DIV = tl.constexpr(8)  # sum of D
STAT_DELTA_B = tl.constexpr(9)  # delta_b_i (0 for an empty sequence)
STAT_RATIO_CAPPED = tl.constexpr(10)  # kept with r_t > ratio_cap (cppo, dppo)
NUM_STATS = tl.constexpr(11)

# ---- a shard of a longer sequence: `[S, SHARD_WIDTH]` float64 per sequence (layout: carried_state.py) ----
STATE_SLACK = tl.constexpr(carried_state.STATE_SLACK)  # sum w (delta_b_i - D) = delta_b_i W - S
STATE_S = tl.constexpr(carried_state.STATE_S)  # S = sum w D
STATE_W = tl.constexpr(carried_state.STATE_W)  # W = sum w
STATE_WIDTH = tl.constexpr(carried_state.STATE_WIDTH)
SHARD_OFFSET = tl.constexpr(carried_state.SHARD_OFFSET)  # global position of the shard's first position
SHARD_LENGTH = tl.constexpr(carried_state.SHARD_LENGTH)  # T_w of the whole sequence
SHARD_DELTA_B = tl.constexpr(carried_state.SHARD_DELTA_B)  # delta_b_i of the whole sequence
SHARD_FINAL = tl.constexpr(carried_state.SHARD_FINAL)  # first of the STATE_WIDTH columns written: the state after
SHARD_WIDTH = tl.constexpr(carried_state.SHARD_WIDTH)

# ---- the config's run-time numbers: one float32 `params [NUM_PARAMS]` per (config, device), ops/plan.py ----
P_DELTA = tl.constexpr(0)
P_DELTA_LOW = tl.constexpr(1)
P_DELTA_HIGH = tl.constexpr(2)
P_W_MIN = tl.constexpr(3)
P_DELTA_B = tl.constexpr(4)
P_QUANTILE = tl.constexpr(5)
P_QUANTILE_SCALE = tl.constexpr(6)
P_DELTA_B_HI = tl.constexpr(7)  # delta_b_max_mult * delta_b
P_RATIO_CAP = tl.constexpr(8)
P_LOG_RATIO_CLAMP = tl.constexpr(9)  # inf when off
P_RATIO_LO = tl.constexpr(10)  # 1 - clip_ratio_low
P_RATIO_HI = tl.constexpr(11)  # 1 + clip_ratio_high
P_CLIP_C = tl.constexpr(12)  # inf when off
P_HORIZON = tl.constexpr(13)  # an int length_mode (HORIZON_ARG)
NUM_PARAMS = tl.constexpr(14)

INT32_MAX = tl.constexpr(2147483647)
INT32_MIN = tl.constexpr(-2147483648)

# ---- `aux` and `sums` (ops/reduce.py) ----
# `aux` written by the reduction: the backward scale, then the method's metrics in config.METHOD_METRICS order
# (docs/math.md section 9): the three every method reports, then cppo's / dppo's or ppo's own in the same slots, so
# that the metrics dict is one unbind of `aux [aux_size(method)]` with no entry to spare
AUX_SCALE = tl.constexpr(0)
AUX_MASK_FRAC = tl.constexpr(1)
AUX_PPO_KL = tl.constexpr(2)
AUX_DIVERGENCE_MEAN = tl.constexpr(3)
AUX_RATIO_CAP_FRAC = AUX_CLIP_FRAC_LOW = tl.constexpr(4)  # cppo and dppo / ppo
AUX_MASK_FRAC_TOKEN = AUX_CLIP_FRAC_HIGH = tl.constexpr(5)  # cppo / ppo
AUX_MASK_FRAC_BUDGET = AUX_CLIP_FRAC_DUAL = tl.constexpr(6)  # cppo / ppo
AUX_DELTA_B_MEAN = tl.constexpr(7)  # cppo
REDUCE_BLOCK = tl.constexpr(256)  # sequences per step of the reduction
# the token kernel's `sums`: aux (at most 8 entries: cppo's), then a row of NUM_STATS per sequence
OUT_AUX = tl.constexpr(0)
OUT_WIDTH = tl.constexpr(1 + max(len(names) for names in METHOD_METRICS.values()))
STATS_POW2 = tl.constexpr(1 << (NUM_STATS.value - 1).bit_length())

# ---- the token kernel's tiles and work items (ops/token.py, ops/chunks.py) ----
MAX_BLOCK = tl.constexpr(1024)
TILE = tl.constexpr(1024)  # ROWS * BLOCK positions per program step: ROWS = TILE // BLOCK
RESIDENT_BLOCKS = tl.constexpr(4)  # a tile of at most 4 blocks per row selects its quantile in registers
CHUNK = tl.constexpr(4096)  # positions of a sequence per work item (a multiple of every BLOCK)
CHUNK_ROWS = tl.constexpr(256)  # chunks x rows read at once when a chunk reads the rows of the earlier ones
SEARCH_WAYS = tl.constexpr(128)  # tiles probed per step when an overflow item looks for its packed tile
# the int32 launch state: the count of finished programs, the next ticket, then a flag per item slot (an item's
# slot in a stage: stage * items + item)
COUNT_DONE = tl.constexpr(0)
COUNT_TICKET = tl.constexpr(1)
FLAGS = tl.constexpr(2)
# an item's flag: delta_b_i published (chunk 0, when it selected the quantile), the chunk's budget sums, its
# statistics; DONE (= READY_STATS) ends every slot, pre-pass or gap (chunk 0's pre-pass and gathering slots by
# chunk 1's item), so a wait never outlives what it waits for
READY_DELTA_B = tl.constexpr(1)
READY_SUMS = tl.constexpr(2)
READY_STATS = tl.constexpr(3)
DONE = tl.constexpr(3)
# scratch per item and sequence (float32; counts and order keys as their bits): the pre-pass' counts, or the
# budget sums, delta_b_i and the statistics of a deciding item
ITEM_N = tl.constexpr(0)
ITEM_LAST = tl.constexpr(1)
ITEM_LO = tl.constexpr(2)
ITEM_HI = tl.constexpr(3)
ITEM_KEY_MIN = tl.constexpr(4)
ITEM_KEY_MAX = tl.constexpr(5)
ITEM_KEY_BELOW = tl.constexpr(6)  # the largest key with k D <= lo (the calibrated delta_b of a long sequence)
ITEM_KEY_ABOVE = tl.constexpr(7)  # the smallest key with k D >= hi
ITEM_OUTSIDE = tl.constexpr(8)  # keys neither <= lo, >= hi nor in the histogram's window (NaN D among them)
ITEM_SLACK = tl.constexpr(0)
ITEM_S = tl.constexpr(1)
ITEM_W = tl.constexpr(2)
ITEM_DELTA_B = tl.constexpr(3)
ITEM_STATS = tl.constexpr(4)
ITEM_WIDTH = tl.constexpr(4 + NUM_STATS.value)

# the calibrated delta_b of a sequence over several chunks (ops/quantile.py): a row of the launch state per such
# tile (after the flags) holds a histogram of the keys strictly inside the clamp's bounds (lo, hi), over a window
# of 2^24 keys from SELECT_MARGIN below the key of lo / k (a binade and more: delta_b_max_mult = 2), then the
# keys of the one or two bins that hold the wanted order statistics; zero between launches
SELECT_BINS = tl.constexpr(1024)
SELECT_SHIFT = tl.constexpr(14)  # 2^24 keys / SELECT_BINS
SELECT_MARGIN = tl.constexpr(4096)
SELECT_CANDIDATES = tl.constexpr(1024)  # keys gathered at most; more, and the tile bisects over memory
SELECT_ARRIVED = tl.constexpr(0)  # the tile's deciding items that have gathered their keys
SELECT_GATHERED = tl.constexpr(1)  # keys gathered so far
SELECT_HIST = tl.constexpr(2)
SELECT_KEYS = tl.constexpr(2 + SELECT_BINS.value)
SELECT_WIDTH = tl.constexpr(2 + SELECT_BINS.value + SELECT_CANDIDATES.value)

# ---- the vocabulary kernels (ops/logits.py) ----
TOPK_NONE = tl.constexpr(0)  # a binary divergence: the token kernel computes it from log_prob itself
TOPK_TV = tl.constexpr(1)
TOPK_KL = tl.constexpr(2)
OTHER_FLOOR = tl.constexpr(reference_logits.OTHER_FLOOR)  # p(other) floor, for mu and pi (docs/math.md section 7)
