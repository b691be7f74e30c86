"""The loss from the LM head's input: token chunks through the head's GEMM and the vocabulary kernels.

No `[N, V]` tensor exists. Forward, per chunk of `chunk` tokens: logits = hidden_chunk @ weight^T (+ bias) into
one reused `[chunk, V]` buffer in float32 (float64 for float64 input; cuBLAS accumulates and writes float32 from
bf16 / fp16 operands), then `logits.logits_forward` on it: log pi(y_t), the Top-K D_t, the entropy and log Z per
token. Then the token kernel and the reduction run once over all tokens (`autograd.fused_forward` with D given),
exactly as on the from-logits path.

CPPO and DPPO decide a token only once its whole sequence is known (the prefix budget, the calibrated
delta_b), so no gradient can be written while the chunks stream through the forward. The backward recomputes
each chunk's logits (the fourth GEMM), turns them into d loss / d logits with `logits.logits_backward` (in the
weight's dtype, in place in the logits buffer when that is the same dtype), then grad_hidden = dlogits @ W,
grad_W += dlogits^T @ hidden in a float32 accumulator and grad_bias += the columns' sums. docs/from_hidden.md
has the passes, the memory and the precision.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..config import LOGIT_DIVERGENCES
from ..validation import Layout, resolve_loss_scale_factor
from . import logits as logits_ops
from .autograd import check_device, contiguous, finish, fused_forward
from .from_logits import _masked_mean
from .plan import kernel_plan

CHUNK_BUDGET_BYTES = 1 << 30  # one chunk's logits and their gradient, at most
CHUNK_FREE_FRACTION = 4  # ... and at most a quarter of the device's free memory
MIN_CHUNK, MAX_CHUNK = 16, 8192  # tokens per chunk: a GEMM of at least a few tiles, at most a bounded buffer
# half operands with a float32 result in one cuBLAS call (`torch.mm(..., out_dtype=)`, recent torch, CUDA only)
HALF_GEMM_TO_FLOAT32 = "dtype_out" in torch.ops.aten.mm.overloads()


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the logits and of the weight gradient's sum: float32, float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


def default_chunk_size(vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk: the largest power of two whose logits (float32) and logits gradient (`dtype`) fit in
    1 GiB and in a quarter of the free device memory, within [16, 8192]. (V = 152064 in bf16: 1024 tokens.)"""
    budget = CHUNK_BUDGET_BYTES
    if device.type == "cuda":  # a driver query, not a stream sync; the caching allocator's free blocks count
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(budget, free // CHUNK_FREE_FRACTION)
    per_token = vocab * (accumulator_dtype(dtype).itemsize + dtype.itemsize)
    tokens = max(budget // per_token, 1)
    return max(MIN_CHUNK, min(MAX_CHUNK, 1 << (tokens.bit_length() - 1)))


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
                   temperature: float, topk: int) -> logits_ops.LogitsForward:
    """The vocabulary pass over token chunks: hidden `[N, H]`; input_ids, mask (or None), old_log_prob `[N]`
    and topk_ids / topk_log_probs `[N, K]` (or None), contiguous. Returns `logits_forward`'s per-token values
    (`[N]` float32 each); one `[min(chunk, N), V]` buffer holds each chunk's logits in turn."""
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    totals = logits_ops.LogitsForward(
        torch.empty(num_tokens, **f32), torch.empty(num_tokens, **f32) if topk_ids is not None else None,
        torch.empty(num_tokens, **f32), torch.empty(num_tokens, **f32))
    buffer = hidden.new_empty((min(chunk, num_tokens), vocab), dtype=accumulator_dtype(hidden.dtype))
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        logits = _chunk_logits(hidden[start:end], weight, bias, buffer[:end - start])
        part = logits_ops.logits_forward(logits, input_ids[start:end], _rows(mask, start, end),
                                         old_log_prob[start:end], _rows(topk_ids, start, end),
                                         _rows(topk_log_probs, start, end), temperature=temperature, topk=topk)
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
        dlogits = logits_ops.logits_backward(logits, input_ids[start:end], row_mask, log_normalizer[start:end],
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


class FusedPolicyLossFromHidden(torch.autograd.Function):
    """`(loss, aux, entropy_mean)` of validated inputs; hidden, weight and bias get the gradients.

    The token tensors travel in `inputs`, so autograd never tracks them (docs/math.md section 10)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, inputs: tuple, options: dict):
        input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids, \
            topk_log_probs = inputs
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
                                   topk_log_probs, chunk=options["chunk"], temperature=options["temperature"],
                                   topk=options["topk"])
        divergence = None if per_token.divergence is None else per_token.divergence.view(token_shape)
        loss, aux, grad_log_prob = fused_forward(
            per_token.log_prob.view(token_shape), old_log_prob, advantages, mask, cu_seqlens, rollout_is_weights,
            divergence, plan=options["plan"], adv_per_seq=options["adv_per_seq"],
            loss_scale_factor=options["loss_scale_factor"], normalizers=options["normalizers"])
        entropy = _masked_mean(per_token.entropy, mask)
        ctx.mark_non_differentiable(aux, entropy)
        ctx.save_for_backward(flat_hidden, weight, bias, ids, flat_mask, per_token.log_normalizer,
                              grad_log_prob.reshape(-1), aux)
        ctx.hidden_shape, ctx.chunk, ctx.temperature = hidden.shape, options["chunk"], options["temperature"]
        return loss, aux, entropy

    @staticmethod
    @once_differentiable  # the backward is kernels and GEMMs: a double backward raises instead of returning 0
    def backward(ctx, grad_loss, grad_aux, grad_entropy):
        hidden, weight, bias, ids, mask, log_normalizer, grad_log_prob, aux = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = hidden_backward(
            hidden, weight, bias, ids, mask, log_normalizer, grad_log_prob, grad_loss, aux, chunk=ctx.chunk,
            temperature=ctx.temperature, needs_grad=ctx.needs_input_grad[:3])
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(ctx.hidden_shape)
        return grad_hidden, grad_weight, grad_bias, None, None


@torch.compiler.disable  # a Python loop over chunks: under torch.compile it runs eagerly (a graph break)
def triton_policy_loss_from_hidden(hidden, weight, bias, input_ids, old_log_prob, advantages, response_mask, *,
                                   layout: Layout, cu_seqlens, rollout_topk_ids, rollout_topk_log_probs,
                                   temperature: float, config, chunk_size: Optional[int], rollout_is_weights,
                                   dp_size, batch_num_tokens, global_batch_size):
    """`policy_loss_from_hidden(..., backend="triton")` on validated inputs: `(loss, metrics)`."""
    check_device(hidden.device)
    topk = config.divergence in LOGIT_DIVERGENCES
    topk_ids, topk_log_probs = (rollout_topk_ids, rollout_topk_log_probs) if topk else (None, None)
    loss_scale_factor = float(resolve_loss_scale_factor(config.loss_agg_mode, config.loss_scale_factor, layout) or 0)
    options = dict(plan=kernel_plan(config, topk), temperature=float(temperature),
                   topk=logits_ops.TOPK_IDS.get(config.divergence, logits_ops.TOPK_NONE.value),
                   chunk=chunk_size or default_chunk_size(weight.shape[0], weight.dtype, hidden.device),
                   adv_per_seq=layout.adv_per_seq, loss_scale_factor=loss_scale_factor,
                   normalizers=(dp_size, batch_num_tokens, global_batch_size))
    inputs = (input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids,
              topk_log_probs)
    loss, aux, entropy = FusedPolicyLossFromHidden.apply(hidden, weight, bias, inputs, options)
    loss, metrics = finish(loss, aux, config.method, hidden.dtype)
    metrics["entropy"] = entropy.to(loss.dtype)
    return loss, metrics
