"""The reduction (docs/math.md sections 6 and 9) and the backward's scaling.

The token kernel leaves per-sequence sums (L_i and the rest, a row of NUM_STATS per sequence in one flat
`stats` buffer); `reduce_stats`, one `@triton.jit` function, turns them into the loss of the aggregation mode,
the backward scale d loss / d L_i and the metrics, with no host sync (the global normalizers are numbers or
0-dim device tensors read here). The token kernel's last program to finish runs it, so the forward is one launch;
`scale_grad_kernel` is the whole backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..config import METHOD_METRICS
from .common import (AGG_SEQ_MEAN_TOKEN_MEAN, AGG_SEQ_MEAN_TOKEN_SUM, AGG_TOKEN_MEAN, AGG_TOKEN_SUM, METHOD_CPPO,
                     METHOD_PPO, NUM_STATS, STAT_CLIP_DUAL, STAT_CLIP_HIGH, STAT_CLIP_LOW, STAT_DELTA_B, STAT_DIV,
                     STAT_KL, STAT_LOSS, STAT_RATIO_CAPPED, STAT_REJ_BUDGET, STAT_REJ_TOKEN, STAT_TOKENS)

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
# (name, index into aux) of each method's metrics
METRIC_POSITIONS = {method: tuple((name, 1 + i) for i, name in enumerate(names))
                    for method, names in METHOD_METRICS.items()}


def aux_size(method: str) -> int:
    """Entries of `aux` for `method`: the backward scale and the method's metrics."""
    return 1 + len(METHOD_METRICS[method])


REDUCE_BLOCK = tl.constexpr(256)  # sequences per step of the reduction
# the token kernel's `sums`: aux (at most 8 entries: cppo's), then a row of NUM_STATS per sequence
OUT_AUX = tl.constexpr(0)
OUT_WIDTH = tl.constexpr(max(aux_size(method) for method in METHOD_METRICS))
STATS_POW2 = tl.constexpr(1 << (NUM_STATS.value - 1).bit_length())


@triton.jit
def _normalizer(ptr, value, default):
    """A global normalizer: the 0-dim tensor at `ptr`, else the number `value`, or `default` where the number is
    absent (given as -1: a count is never negative)."""
    if ptr is not None:
        return tl.load(ptr).to(tl.float32)
    return tl.where(value >= 0, value, default)


@triton.jit
def _column(totals, cols, j):
    """Entry j of a small vector, as a scalar."""
    return tl.sum(tl.where(cols == j, totals, 0.0), axis=0)


@triton.jit
def reduce_stats(
    sums_ptr,  # [OUT_WIDTH + S * NUM_STATS]: aux written here, the stats read from OUT_WIDTH on
    loss_ptr,  # []: the loss
    num_seqs, cu_ptr, extent, dp_ptr, dp_factor, tokens_ptr, tokens, seqs_ptr, seqs,
    METHOD: tl.constexpr, MODE: tl.constexpr,
):
    """The loss of aggregation MODE (docs/math.md section 6) and the metrics (section 9) from the per-sequence
    sums, REDUCE_BLOCK sequences at a time. aux = [d loss / d L_i (times n_i for seq-mean-token-mean), metrics...].
    The sums come from other programs: loaded from L2 (`.cg`), never from a stale L1 line. Packed offsets
    (`cu_ptr`, N = `extent`) are checked once more here, all of them: offsets out of order can leave a
    sequence's row unwritten, and every output must then be NaN."""
    stats_ptr = sums_ptr + OUT_WIDTH
    aux_ptr = sums_ptr + OUT_AUX
    cols = tl.arange(0, STATS_POW2)
    totals = tl.zeros([STATS_POW2], dtype=tl.float32)
    sum_loss = tl.zeros([REDUCE_BLOCK], dtype=tl.float32)
    sum_mean = tl.zeros([REDUCE_BLOCK], dtype=tl.float32)  # sum of L_i / n_i over non-empty sequences
    non_empty = tl.zeros([REDUCE_BLOCK], dtype=tl.float32)
    bad_offsets = tl.zeros([REDUCE_BLOCK], dtype=tl.int32)  # the token kernel marks them with a NaN n_i
    for off in range(0, num_seqs, REDUCE_BLOCK):
        seq = off + tl.arange(0, REDUCE_BLOCK)
        ok = seq < num_seqs
        stats = tl.load(stats_ptr + seq.to(tl.int64)[:, None] * NUM_STATS + cols[None, :],
                        mask=ok[:, None] & (cols[None, :] < NUM_STATS), other=0.0, cache_modifier=".cg")
        totals += tl.sum(stats, axis=0)
        n = tl.sum(tl.where(cols[None, :] == STAT_TOKENS, stats, 0.0), axis=1)
        loss = tl.sum(tl.where(cols[None, :] == STAT_LOSS, stats, 0.0), axis=1)
        sum_loss += loss
        # an empty sequence has L_i = 0 (NaN only when the kernel flagged bad offsets: keep it visible)
        sum_mean += tl.where(n > 0, loss / tl.maximum(n, 1.0), loss)
        non_empty += (n > 0).to(tl.float32)
        bad_offsets += (n != n).to(tl.int32)
    if cu_ptr is not None:
        for off in range(0, num_seqs, REDUCE_BLOCK):
            seq = off + tl.arange(0, REDUCE_BLOCK)
            ok = seq < num_seqs
            begin = tl.load(cu_ptr + seq, mask=ok, other=0).to(tl.int64)
            end = tl.load(cu_ptr + seq + 1, mask=ok, other=0).to(tl.int64)
            wrong = (begin < 0) | (end < begin) | (end > extent) | ((seq == 0) & (begin != 0))
            wrong |= (seq == num_seqs - 1) & (end != extent)
            bad_offsets += (ok & wrong).to(tl.int32)
    offsets_ok = tl.sum(bad_offsets, axis=0) == 0
    totals = tl.where(offsets_ok, totals, float("nan"))
    sum_loss_s = tl.sum(sum_loss, axis=0)
    n_tok = _column(totals, cols, STAT_TOKENS)
    n_seq = tl.sum(non_empty, axis=0)

    # dp_size (a tensor at dp_ptr, times dp_factor; or the number dp_factor), over loss_scale_factor when MODE is
    # seq-mean-token-sum-norm: the host folds that division into dp_factor (`reduction_arguments`)
    dp = dp_factor
    if dp_ptr is not None:
        dp = tl.load(dp_ptr).to(tl.float32) * dp_factor
    if MODE == AGG_TOKEN_MEAN:
        numerator = sum_loss_s
        denominator = _normalizer(tokens_ptr, tokens, n_tok)
    elif MODE == AGG_TOKEN_SUM:
        numerator = sum_loss_s
        denominator = tl.full([], 1.0, dtype=tl.float32)
    elif MODE == AGG_SEQ_MEAN_TOKEN_SUM:
        numerator = sum_loss_s
        denominator = _normalizer(seqs_ptr, seqs, n_seq)
    elif MODE == AGG_SEQ_MEAN_TOKEN_MEAN:  # the token kernel folded 1 / n_i into the token gradients
        numerator = tl.sum(sum_mean, axis=0)
        denominator = _normalizer(seqs_ptr, seqs, n_seq)
    else:  # seq-mean-token-sum-norm; a zero width (empty batch) gives 0 like a zero count
        numerator = sum_loss_s
        denominator = _normalizer(seqs_ptr, seqs, n_seq)
    scale = tl.where(denominator > 0, dp / tl.where(denominator > 0, denominator, 1.0), 0.0)
    # bad offsets left gradient positions unwritten: a NaN scale makes every one of them NaN
    scale = tl.where(offsets_ok, scale, float("nan"))
    tl.store(loss_ptr, numerator * scale)
    tl.store(aux_ptr + AUX_SCALE, scale)

    # per-token means of the columns (0 for an empty batch; totals * 0 keeps the NaN of bad offsets)
    per_token = tl.where(n_tok > 0, totals / tl.maximum(n_tok, 1.0), totals * 0.0)
    rej_token = _column(per_token, cols, STAT_REJ_TOKEN)
    rej_budget = _column(per_token, cols, STAT_REJ_BUDGET)
    tl.store(aux_ptr + AUX_MASK_FRAC, rej_token + rej_budget)  # disjoint flags
    tl.store(aux_ptr + AUX_PPO_KL, _column(per_token, cols, STAT_KL))
    tl.store(aux_ptr + AUX_DIVERGENCE_MEAN, _column(per_token, cols, STAT_DIV))
    if METHOD != METHOD_PPO:
        tl.store(aux_ptr + AUX_RATIO_CAP_FRAC, _column(per_token, cols, STAT_RATIO_CAPPED))
    if METHOD == METHOD_CPPO:
        tl.store(aux_ptr + AUX_MASK_FRAC_TOKEN, rej_token)
        tl.store(aux_ptr + AUX_MASK_FRAC_BUDGET, rej_budget)
        delta_b_sum = _column(totals, cols, STAT_DELTA_B)
        tl.store(aux_ptr + AUX_DELTA_B_MEAN,
                 tl.where(n_seq > 0, delta_b_sum / tl.maximum(n_seq, 1.0), delta_b_sum * 0.0))
    elif METHOD == METHOD_PPO:
        tl.store(aux_ptr + AUX_CLIP_FRAC_LOW, _column(per_token, cols, STAT_CLIP_LOW))
        tl.store(aux_ptr + AUX_CLIP_FRAC_HIGH, _column(per_token, cols, STAT_CLIP_HIGH))
        tl.store(aux_ptr + AUX_CLIP_FRAC_DUAL, _column(per_token, cols, STAT_CLIP_DUAL))


@triton.jit
def scale_grad_kernel(grad_ptr, upstream_ptr, scale_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """Backward: out = grad * upstream * scale, cast to the output's dtype (log_prob's)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    factor = tl.load(upstream_ptr).to(tl.float32) * tl.load(scale_ptr + AUX_SCALE)
    grad = tl.load(grad_ptr + offs, mask=inside, other=0.0)
    tl.store(out_ptr + offs, (grad * factor).to(out_ptr.dtype.element_ty), mask=inside)
