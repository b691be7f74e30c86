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
from . import ids

# (name, index into aux) of each method's metrics
METRIC_POSITIONS = {method: tuple((name, 1 + i) for i, name in enumerate(names))
                    for method, names in METHOD_METRICS.items()}


def aux_size(method: str) -> int:
    """Entries of `aux` for `method`: the backward scale and the method's metrics."""
    return 1 + len(METHOD_METRICS[method])


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
    sums_ptr,  # [ids.OUT_WIDTH + S * ids.NUM_STATS]: aux written here, the stats read from ids.OUT_WIDTH on
    loss_ptr,  # []: the loss
    num_seqs, cu_ptr, extent, dp_ptr, dp_factor, tokens_ptr, tokens, seqs_ptr, seqs,
    METHOD: tl.constexpr, MODE: tl.constexpr,
):
    """The loss of aggregation MODE (docs/math.md section 6) and the metrics (section 9) from the per-sequence
    sums, ids.REDUCE_BLOCK sequences at a time. aux = [d loss / d L_i (times n_i for seq-mean-token-mean), metrics...].
    The sums come from other programs: loaded from L2 (`.cg`), never from a stale L1 line. Packed offsets
    (`cu_ptr`, N = `extent`) are checked once more here, all of them: offsets out of order can leave a
    sequence's row unwritten, and every output must then be NaN."""
    stats_ptr = sums_ptr + ids.OUT_WIDTH
    aux_ptr = sums_ptr + ids.OUT_AUX
    cols = tl.arange(0, ids.STATS_POW2)
    totals = tl.zeros([ids.STATS_POW2], dtype=tl.float32)
    sum_loss = tl.zeros([ids.REDUCE_BLOCK], dtype=tl.float32)
    sum_mean = tl.zeros([ids.REDUCE_BLOCK], dtype=tl.float32)  # sum of L_i / n_i over non-empty sequences
    non_empty = tl.zeros([ids.REDUCE_BLOCK], dtype=tl.float32)
    bad_offsets = tl.zeros([ids.REDUCE_BLOCK], dtype=tl.int32)  # the token kernel marks them with a NaN n_i
    for off in range(0, num_seqs, ids.REDUCE_BLOCK):
        seq = off + tl.arange(0, ids.REDUCE_BLOCK)
        ok = seq < num_seqs
        stats = tl.load(stats_ptr + seq.to(tl.int64)[:, None] * ids.NUM_STATS + cols[None, :],
                        mask=ok[:, None] & (cols[None, :] < ids.NUM_STATS), other=0.0, cache_modifier=".cg")
        totals += tl.sum(stats, axis=0)
        n = tl.sum(tl.where(cols[None, :] == ids.STAT_TOKENS, stats, 0.0), axis=1)
        loss = tl.sum(tl.where(cols[None, :] == ids.STAT_LOSS, stats, 0.0), axis=1)
        sum_loss += loss
        # an empty sequence has L_i = 0 (NaN only when the kernel flagged bad offsets: keep it visible)
        sum_mean += tl.where(n > 0, loss / tl.maximum(n, 1.0), loss)
        non_empty += (n > 0).to(tl.float32)
        bad_offsets += (n != n).to(tl.int32)
    if cu_ptr is not None:
        for off in range(0, num_seqs, ids.REDUCE_BLOCK):
            seq = off + tl.arange(0, ids.REDUCE_BLOCK)
            ok = seq < num_seqs
            begin = tl.load(cu_ptr + seq, mask=ok, other=0).to(tl.int64)
            end = tl.load(cu_ptr + seq + 1, mask=ok, other=0).to(tl.int64)
            wrong = (begin < 0) | (end < begin) | (end > extent) | ((seq == 0) & (begin != 0))
            wrong |= (seq == num_seqs - 1) & (end != extent)
            bad_offsets += (ok & wrong).to(tl.int32)
    offsets_ok = tl.sum(bad_offsets, axis=0) == 0
    if cu_ptr is not None:  # no sequence, yet tokens
        offsets_ok &= (num_seqs > 0) | (extent == 0)
    totals = tl.where(offsets_ok, totals, float("nan"))
    sum_loss_s = tl.sum(sum_loss, axis=0)
    n_tok = _column(totals, cols, ids.STAT_TOKENS)
    n_seq = tl.sum(non_empty, axis=0)

    # dp_size (a tensor at dp_ptr, times dp_factor; or the number dp_factor), over loss_scale_factor when MODE is
    # seq-mean-token-sum-norm: the host folds that division into dp_factor (`runtime.reduction_arguments`)
    dp = dp_factor
    if dp_ptr is not None:
        dp = tl.load(dp_ptr).to(tl.float32) * dp_factor
    if MODE == ids.AGG_TOKEN_MEAN:
        numerator = sum_loss_s
        denominator = _normalizer(tokens_ptr, tokens, n_tok)
    elif MODE == ids.AGG_TOKEN_SUM:
        numerator = sum_loss_s
        denominator = tl.full([], 1.0, dtype=tl.float32)
    elif MODE == ids.AGG_SEQ_MEAN_TOKEN_SUM:
        numerator = sum_loss_s
        denominator = _normalizer(seqs_ptr, seqs, n_seq)
    elif MODE == ids.AGG_SEQ_MEAN_TOKEN_MEAN:  # the token kernel folded 1 / n_i into the token gradients
        numerator = tl.sum(sum_mean, axis=0)
        denominator = _normalizer(seqs_ptr, seqs, n_seq)
    else:  # seq-mean-token-sum-norm; a zero width (empty batch) gives 0 like a zero count
        numerator = sum_loss_s
        denominator = _normalizer(seqs_ptr, seqs, n_seq)
    scale = tl.where(denominator > 0, dp / tl.where(denominator > 0, denominator, 1.0), 0.0)
    # bad offsets left gradient positions unwritten: a NaN scale makes every one of them NaN
    scale = tl.where(offsets_ok, scale, float("nan"))
    tl.store(loss_ptr, numerator * scale)
    tl.store(aux_ptr + ids.AUX_SCALE, scale)

    # per-token means of the columns (0 for an empty batch; totals * 0 keeps the NaN of bad offsets)
    per_token = tl.where(n_tok > 0, totals / tl.maximum(n_tok, 1.0), totals * 0.0)
    rej_token = _column(per_token, cols, ids.STAT_REJ_TOKEN)
    rej_budget = _column(per_token, cols, ids.STAT_REJ_BUDGET)
    tl.store(aux_ptr + ids.AUX_MASK_FRAC, rej_token + rej_budget)  # disjoint flags
    tl.store(aux_ptr + ids.AUX_PPO_KL, _column(per_token, cols, ids.STAT_KL))
    tl.store(aux_ptr + ids.AUX_DIVERGENCE_MEAN, _column(per_token, cols, ids.STAT_DIV))
    if METHOD != ids.METHOD_PPO:
        tl.store(aux_ptr + ids.AUX_RATIO_CAP_FRAC, _column(per_token, cols, ids.STAT_RATIO_CAPPED))
    if METHOD == ids.METHOD_CPPO:
        tl.store(aux_ptr + ids.AUX_MASK_FRAC_TOKEN, rej_token)
        tl.store(aux_ptr + ids.AUX_MASK_FRAC_BUDGET, rej_budget)
        delta_b_sum = _column(totals, cols, ids.STAT_DELTA_B)
        tl.store(aux_ptr + ids.AUX_DELTA_B_MEAN,
                 tl.where(n_seq > 0, delta_b_sum / tl.maximum(n_seq, 1.0), delta_b_sum * 0.0))
    elif METHOD == ids.METHOD_PPO:
        tl.store(aux_ptr + ids.AUX_CLIP_FRAC_LOW, _column(per_token, cols, ids.STAT_CLIP_LOW))
        tl.store(aux_ptr + ids.AUX_CLIP_FRAC_HIGH, _column(per_token, cols, ids.STAT_CLIP_HIGH))
        tl.store(aux_ptr + ids.AUX_CLIP_FRAC_DUAL, _column(per_token, cols, ids.STAT_CLIP_DUAL))


@triton.jit
def scale_grad_kernel(grad_ptr, upstream_ptr, scale_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """Backward: out = grad * upstream * scale, cast to the output's dtype (log_prob's)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    factor = tl.load(upstream_ptr).to(tl.float32) * tl.load(scale_ptr + ids.AUX_SCALE)
    grad = tl.load(grad_ptr + offs, mask=inside, other=0.0)
    tl.store(out_ptr + offs, (grad * factor).to(out_ptr.dtype.element_ty), mask=inside)
