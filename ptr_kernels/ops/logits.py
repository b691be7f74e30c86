"""The vocabulary kernels of the from-logits path (docs/math.md section 7).

`logits_forward_kernel`, one program per token, reads the token's logits row once, in blocks of BLOCK_V:
an online logsumexp of z = logits / temperature (running max, rescaled sums) that also gives the entropy of
pi = softmax(z), then gathers z at y_t and at the rollout's K top-K ids to write log pi(y_t), the Top-K
divergence D_t and log Z per token (`[N]` float32 each). The trust region itself runs afterwards in the
token kernel (`ops/token.py` with DIV_GIVEN): its one shared step, not a copy.

`logits_backward_kernel` reads the row once more and writes d loss / d logits =
coef_t * (onehot(y_t) - softmax(z_t)) / temperature once, in the logits' dtype (optionally into the logits
buffer itself), with coef_t = upstream * the aggregation's scale * the token kernel's d l_t / d log_prob_t.
No `[N, V]` float32 intermediate exists anywhere: extra memory is O(N) here plus O(N K) of the inputs.

Masked positions (and any input they hold, e.g. input_ids = -100) are never read: their logits rows are
skipped and their outputs are 0. At a valid position an id outside [0, V) or a repeated top-K id makes
log_prob or D NaN (the host raises ValueError first where it can check without a sync).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import ids


@triton.jit
def _row_start(n, width, stride_row, stride_pos):
    """Element offset (int64) of token n's logits row: `[B, T, V]` has n = b T + t, packed `[N, V]` width N."""
    n = n.to(tl.int64)
    return (n // width) * stride_row + (n % width) * stride_pos


@triton.jit
def _is_valid(mask_ptr, n, HAS_MASK: tl.constexpr):
    """m_t of token n (int1 scalar); any nonzero mask value is valid."""
    if HAS_MASK:
        return tl.load(mask_ptr + n) != 0
    return n >= 0


@triton.jit
def _topk_divergence(row, n, lp, lse, y, valid, olp_ptr, topk_ids_ptr, topk_lp_ptr, vocab, num_k, inv_t,
                     TOPK: tl.constexpr, BLOCK_K: tl.constexpr):
    """D_t on A'_t = TopK_t union {y_t} plus the bucket "other" (docs/math.md section 7).

    p_mu of a top-K id is exp(its rollout log-prob); p_mu(y_t) = exp(old_log_prob_t) when y_t is not among
    them. A probability of 0 (log-prob -inf) contributes 0 to the KL. NaN if an id is out of range or repeated.
    """
    ks = tl.arange(0, BLOCK_K)
    k_in = ks < tl.where(valid, num_k, 0)  # (not `valid & ...`: a scalar mask does not broadcast everywhere)
    base = n.to(tl.int64) * num_k
    kid = tl.load(topk_ids_ptr + base + ks, mask=k_in, other=0)
    kid_ok = (kid >= 0) & (kid < vocab)
    pairs = (kid[:, None] == kid[None, :]) & k_in[:, None] & k_in[None, :]
    bad = (tl.sum(pairs.to(tl.int32), axis=1) > 1) | (k_in & ~kid_ok)  # repeated or out of range
    lp_k = tl.load(row + kid, mask=k_in & kid_ok, other=float("-inf")).to(tl.float32) * inv_t - lse
    lmu_k = tl.load(topk_lp_ptr + base + ks, mask=k_in, other=float("-inf")).to(tl.float32)
    pi_k = tl.exp(lp_k)
    mu_k = tl.exp(lmu_k)
    y_in_topk = tl.sum((k_in & (kid == y)).to(tl.int32), axis=0) > 0
    olp = tl.load(olp_ptr + n, mask=valid, other=0.0).to(tl.float32)
    pi_y = tl.exp(lp)
    mu_y = tl.exp(olp)
    pi_other = tl.maximum(1.0 - tl.sum(pi_k, axis=0) - tl.where(y_in_topk, 0.0, pi_y), ids.OTHER_FLOOR)
    mu_other = tl.maximum(1.0 - tl.sum(mu_k, axis=0) - tl.where(y_in_topk, 0.0, mu_y), ids.OTHER_FLOOR)
    if TOPK == ids.TOPK_TV:
        d = 0.5 * (tl.sum(tl.abs(mu_k - pi_k), axis=0) + tl.where(y_in_topk, 0.0, tl.abs(mu_y - pi_y))
                   + tl.abs(mu_other - pi_other))
    else:
        d = (tl.sum(tl.where(mu_k > 0.0, mu_k * (lmu_k - lp_k), 0.0), axis=0)
             + tl.where(y_in_topk | (mu_y == 0.0), 0.0, mu_y * (olp - lp))
             + mu_other * (tl.log(mu_other) - tl.log(pi_other)))
    return tl.where(tl.max(bad.to(tl.int32), axis=0) > 0, float("nan"), d)


@triton.jit
def logits_forward_kernel(
    logits_ptr, ids_ptr, mask_ptr, olp_ptr, topk_ids_ptr, topk_lp_ptr,  # inputs
    lp_ptr, div_ptr, entropy_ptr, lse_ptr,  # outputs, [N] float32 each (0 at masked positions)
    width, stride_row, stride_pos, vocab, num_k, inv_temperature,
    TOPK: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Token n = program 0: log Z, entropy, log pi(y_t) and (TOPK) the Top-K divergence, one pass over V."""
    n = tl.program_id(0)
    valid = _is_valid(mask_ptr, n, HAS_MASK)
    row = logits_ptr + _row_start(n, width, stride_row, stride_pos)
    inv_t = tl.cast(inv_temperature, tl.float32)
    cols = tl.arange(0, BLOCK_V)
    # running max m, s = sum exp(z - m), t = sum exp(z - m) (z - m); a finite start keeps exp(m - m_new) a
    # number when a block holds only -inf (a token the vocabulary masks out has probability 0, not NaN)
    m = tl.full([], -1e30, tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for off in range(0, tl.where(valid, vocab, 0), BLOCK_V):  # masked rows: no iteration
        inside = off + cols < vocab
        z = tl.load(row + off + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))  # NaN in z still shows: exp(NaN) enters s
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        shifted = tl.where(z == float("-inf"), 0.0, z - m_new)  # no 0 * -inf
        t = alpha * (t + s * (m - m_new)) + tl.sum(e * shifted, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    s = tl.where(valid, s, 1.0)  # a masked row: no log(0) in the discarded lanes
    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - t / s  # -sum p log p with log p = z - m - log s

    y = tl.load(ids_ptr + n, mask=valid, other=0)
    y_ok = (y >= 0) & (y < vocab)
    z_y = tl.load(row + y, mask=valid & y_ok, other=0.0).to(tl.float32) * inv_t
    lp = tl.where(y_ok, z_y - lse, float("nan"))
    tl.store(lp_ptr + n, tl.where(valid, lp, 0.0))
    tl.store(lse_ptr + n, tl.where(valid, lse, 0.0))
    tl.store(entropy_ptr + n, tl.where(valid, entropy, 0.0))
    if TOPK != ids.TOPK_NONE:
        d = _topk_divergence(row, n, lp, lse, y, valid, olp_ptr, topk_ids_ptr, topk_lp_ptr, vocab, num_k, inv_t,
                             TOPK, BLOCK_K)
        tl.store(div_ptr + n, tl.where(valid, d, 0.0))


@triton.jit
def logits_backward_kernel(
    logits_ptr, ids_ptr, mask_ptr, lse_ptr, grad_lp_ptr, upstream_ptr, aux_ptr, out_ptr,
    width, stride_row, stride_pos, out_stride_row, out_stride_pos, vocab, inv_temperature,
    HAS_MASK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Token n = program 0: out[n, :] = coef (onehot(y) - softmax(z)) / temperature in out's dtype.

    coef = upstream * aux[ids.AUX_SCALE] * grad_lp[n]. Rows with coef = 0 (masked, or cut by the trust region)
    are written as zeros without reading the logits. `out` may be the logits buffer: each block is read
    before it is written, by the same program.
    """
    n = tl.program_id(0)
    valid = _is_valid(mask_ptr, n, HAS_MASK)
    inv_t = tl.cast(inv_temperature, tl.float32)
    coef = tl.load(grad_lp_ptr + n) * tl.load(upstream_ptr).to(tl.float32) * tl.load(aux_ptr + ids.AUX_SCALE)
    coef = tl.where(valid, coef * inv_t, 0.0)
    read = coef != 0.0  # True for NaN: a NaN coefficient shows
    lse = tl.load(lse_ptr + n)
    y = tl.load(ids_ptr + n, mask=read, other=-1)
    row = logits_ptr + _row_start(n, width, stride_row, stride_pos)
    out = out_ptr + _row_start(n, width, out_stride_row, out_stride_pos)
    cols = tl.arange(0, BLOCK_V)
    for off in range(0, vocab, BLOCK_V):
        c = off + cols
        inside = c < vocab
        z = tl.load(row + c, mask=c < tl.where(read, vocab, 0), other=float("-inf")).to(tl.float32) * inv_t
        p = tl.exp(z - lse)
        g = tl.where(read, coef * (tl.where(c == y, 1.0, 0.0) - p), 0.0)
        tl.store(out + c, g.to(out_ptr.dtype.element_ty), mask=inside)
