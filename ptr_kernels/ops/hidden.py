"""The loss from the LM head's input: token chunks through the head's GEMM and the vocabulary kernels.

No `[N, V]` tensor exists. Forward, per chunk of `chunk` tokens: logits = hidden_chunk @ weight^T (+ bias) into
one reused `[chunk, V]` buffer in float32 (float64 for float64 input; cuBLAS accumulates and writes float32 from
bf16 / fp16 operands), then `runtime.logits_forward` on it: log pi(y_t), the Top-K D_t, the entropy and log Z
per token. Then the token kernel and the reduction run once over all tokens (`runtime.fused_forward` with D
given), exactly as on the from-logits path.

CPPO and DPPO decide a token only once its whole sequence is known (the prefix budget, the calibrated
delta_b), so no gradient can be written while the chunks stream through the forward. The backward recomputes
each chunk's logits (the fourth GEMM), turns them into d loss / d logits with `runtime.logits_backward` (in the
weight's dtype, in place in the logits buffer when that is the same dtype), then grad_hidden = dlogits @ W,
grad_W += dlogits^T @ hidden in a float32 accumulator and grad_bias += the columns' sums. docs/from_hidden.md
has the passes, the memory and the precision.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .plan import KernelPlan
from .runtime import (LogitsForward, accumulator_dtype, contiguous, fused_forward, logits_backward, logits_forward,
                      masked_mean)

# half operands with a float32 result in one cuBLAS call (`torch.mm(..., out_dtype=)`, recent torch, CUDA only)
HALF_GEMM_TO_FLOAT32 = "dtype_out" in torch.ops.aten.mm.overloads()


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool = False) -> torch.Tensor:
    """out = a @ b, or out += a @ b, accumulated and written in out's dtype (float32 from bf16 / fp16 operands)."""
    extra = {}
    if a.dtype != out.dtype:
        if a.is_cuda and HALF_GEMM_TO_FLOAT32:  # no float32 copy of the weight
            extra["out_dtype"] = out.dtype
        else:  # CPU (the interpreter) or an older torch: upcast copies (a half product is exact in float32)
            a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate:
        return torch.addmm(out, a, b, out=out, **extra)
    return torch.mm(a, b, out=out, **extra)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor):
    """hidden @ weight^T (+ bias) into `out` `[rows, V]`."""
    _matmul_into(out, hidden, weight.t())
    if bias is not None:
        out += bias
    return out


def _rows(t: Optional[torch.Tensor], start: int, end: int) -> Optional[torch.Tensor]:
    return None if t is None else t[start:end]


def hidden_forward(hidden, weight, bias, input_ids, mask, old_log_prob, topk_ids, topk_log_probs, *, chunk: int,
                   temperature: float, topk: int) -> LogitsForward:
    """The vocabulary pass over token chunks: hidden `[N, H]`; input_ids, mask (or None), old_log_prob `[N]`
    and topk_ids / topk_log_probs `[N, K]` (or None), contiguous. Returns `logits_forward`'s per-token values
    (`[N]` float32 each); one `[min(chunk, N), V]` buffer holds each chunk's logits in turn."""
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    totals = LogitsForward(
        torch.empty(num_tokens, **f32), torch.empty(num_tokens, **f32) if topk_ids is not None else None,
        torch.empty(num_tokens, **f32), torch.empty(num_tokens, **f32))
    buffer = hidden.new_empty((min(chunk, num_tokens), vocab), dtype=accumulator_dtype(hidden.dtype))
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        logits = _chunk_logits(hidden[start:end], weight, bias, buffer[:end - start])
        part = logits_forward(logits, input_ids[start:end], _rows(mask, start, end), old_log_prob[start:end],
                              _rows(topk_ids, start, end), _rows(topk_log_probs, start, end),
                              temperature=temperature, topk=topk)
        for total, piece in zip(totals, part):
            if total is not None:
                total[start:end] = piece
    return totals


def hidden_backward(hidden, weight, bias, input_ids, mask, log_normalizer, grad_log_prob, upstream, aux, *,
                    chunk: int, temperature: float, needs_grad: tuple):
    """(grad_hidden, grad_weight, grad_bias), each None unless `needs_grad` asks for it, from the forward's
    log Z and d loss / d log_prob `[N]`: the chunk's logits again, d loss / d logits, and three GEMMs."""
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulator_dtype(weight.dtype)
    logits_buffer = hidden.new_empty((min(chunk, num_tokens), vocab), dtype=acc)
    # the gradient of the logits must be in the weight's dtype for the GEMMs; in place where that is acc
    grad_buffer = logits_buffer if weight.dtype == acc else torch.empty_like(logits_buffer, dtype=weight.dtype)
    grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None
    grad_weight = torch.zeros_like(weight, dtype=acc) if needs_grad[1] else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=hidden.device) if bias is not None and needs_grad[2] else None
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        rows = hidden[start:end]
        logits = _chunk_logits(rows, weight, bias, logits_buffer[:end - start])
        row_mask = _rows(mask, start, end)
        dlogits = logits_backward(logits, input_ids[start:end], row_mask, log_normalizer[start:end],
                                  grad_log_prob[start:end], upstream, aux, temperature=temperature,
                                  out=grad_buffer[:end - start])
        if grad_hidden is not None:
            _matmul_into(grad_hidden[start:end], dlogits, weight)
        if grad_weight is not None:
            if row_mask is not None:  # a masked row's gradient is 0, its hidden state anything: no 0 * NaN
                rows = torch.where(row_mask[:, None] != 0, rows, 0)
            _matmul_into(grad_weight, dlogits.t(), rows, accumulate=True)
        if grad_bias is not None:
            grad_bias += dlogits.sum(0, dtype=acc)
    return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


class HiddenLossForward(NamedTuple):
    """`hidden_loss_forward`'s results: the loss, aux and the entropy's mean, and what the backward reads."""

    loss: torch.Tensor
    aux: torch.Tensor
    entropy: torch.Tensor
    hidden: torch.Tensor  # [N, H]
    ids: torch.Tensor  # [N], contiguous
    mask: Optional[torch.Tensor]  # [N] or None, contiguous
    log_normalizer: torch.Tensor  # [N] log Z per token
    grad_log_prob: torch.Tensor  # [N] d loss / d log_prob up to the backward scale


def hidden_loss_forward(hidden, weight, bias, input_ids, old_log_prob, advantages, response_mask, cu_seqlens,
                        rollout_is_weights, topk_ids, topk_log_probs, *, plan: KernelPlan, chunk: int,
                        temperature: float, adv_per_seq: bool, loss_scale_factor, normalizers: tuple):
    """The from-hidden forward on validated inputs: `hidden_forward` over the token chunks, then the token kernel
    and the reduction once over all tokens (`fused_forward` with D given), exactly as on the from-logits path."""
    token_shape, num_tokens = input_ids.shape, input_ids.numel()
    flat_hidden = hidden.reshape(num_tokens, hidden.shape[-1])
    mask = contiguous(response_mask)  # bool, int or float: != 0 is valid, in every kernel
    flat_mask = None if mask is None else mask.reshape(-1)
    ids = input_ids.contiguous().reshape(-1)
    old_log_prob = old_log_prob.contiguous()
    if topk_ids is not None:
        topk_ids = topk_ids.contiguous().reshape(num_tokens, -1)
        topk_log_probs = topk_log_probs.contiguous().reshape(num_tokens, -1)
    per_token = hidden_forward(flat_hidden, weight, bias, ids, flat_mask, old_log_prob.reshape(-1), topk_ids,
                               topk_log_probs, chunk=chunk, temperature=temperature, topk=plan.topk)
    divergence = None if per_token.divergence is None else per_token.divergence.view(token_shape)
    loss, aux, grad_log_prob = fused_forward(
        per_token.log_prob.view(token_shape), old_log_prob, advantages, mask, cu_seqlens, rollout_is_weights,
        divergence, plan=plan, adv_per_seq=adv_per_seq, loss_scale_factor=loss_scale_factor,
        normalizers=normalizers)
    return HiddenLossForward(loss, aux, masked_mean(per_token.entropy, mask), flat_hidden, ids, flat_mask,
                             per_token.log_normalizer, grad_log_prob.reshape(-1))
