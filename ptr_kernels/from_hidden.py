"""Public API: `policy_loss_from_hidden`, the policy loss straight from the LM head's input, never the whole logits."""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from .api import BACKENDS
from .config import PolicyLossConfig, resolve_config
from .from_logits import check_logits_inputs, check_per_token_rows
from .validation import Layout


def policy_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                            old_log_prob: torch.Tensor, advantages: torch.Tensor,
                            response_mask: Optional[torch.Tensor] = None, *, bias: Optional[torch.Tensor] = None,
                            cu_seqlens: Optional[torch.Tensor] = None, temperature: float = 1.0,
                            rollout_topk_ids: Optional[torch.Tensor] = None,
                            rollout_topk_log_probs: Optional[torch.Tensor] = None,
                            config: Optional[PolicyLossConfig] = None, backend: str = "auto",
                            chunk_size: Optional[int] = None, rollout_is_weights: Optional[torch.Tensor] = None,
                            dp_size=1, batch_num_tokens=None, global_batch_size=None, **overrides):
    """The loss of `policy_loss_from_logits` with logits = hidden @ weight^T + bias, computed by token chunks.

    The LM head and the loss in one operation: pi = softmax((hidden @ weight^T + bias) / temperature), then
    docs/math.md sections 2-7 as `policy_loss_from_logits` (every method, binary and Top-K divergence, gate and
    aggregation). The gradients go into hidden, weight and bias. The Triton backend never holds more than one
    chunk of logits (`chunk_size` tokens x V, float32) and one chunk of their gradient; docs/from_hidden.md.

    Args:
        hidden: `[B, T, H]` (padded) or `[N, H]` (packed, with cu_seqlens), float32 / bfloat16 / float16
            (float64 too): the final hidden states at the positions that predict y_t. Any values at masked
            positions (they take no part, and get a zero gradient).
        weight: `[V, H]`, the LM head as `nn.Linear` stores it, hidden's dtype and device.
        input_ids: `[B, T]` / `[N]` int32 or int64: the sampled tokens y_t, in [0, V) at valid positions.
        old_log_prob: `[B, T]` / `[N]`: log mu(y_t) of the rollout policy.
        advantages: `[B, T]` or `[B]` (padded), `[N]` or `[S]` (packed).
        response_mask: `[B, T]` / `[N]` (bool, int or float; nonzero is valid), or None: every position valid.
        bias: `[V]` or None, hidden's dtype and device.
        cu_seqlens: `[S + 1]` int32 / int64 offsets of the packed sequences (packed input only).
        temperature: the sampling temperature (finite, > 0): logits / temperature.
        rollout_topk_ids: `[B, T, K]` / `[N, K]` int32 or int64, the rollout engine's top-K ids (distinct per
            valid position, in [0, V)); required with K >= 1 for `topk_tv` / `topk_kl`, unused otherwise.
        rollout_topk_log_probs: same shape, float: their log-probs under mu (-inf: probability 0).
        config, overrides: a `PolicyLossConfig` and/or its fields as keywords (method, divergence, ...).
        backend: "auto" (Triton for CUDA tensors, reference elsewhere), "reference" (float64, materializes
            the logits) or "triton" (CUDA, or CPU in the Triton interpreter).
        chunk_size: (triton) tokens per chunk, a positive int; None picks one from V and the free memory
            (a power of two in [16, 8192]; 1024 at V = 152064 in bf16). The reference ignores it.
        rollout_is_weights: `[B, T]` / `[N]` rollout importance weights rho_t, or None.
        dp_size, batch_num_tokens, global_batch_size: the aggregation's normalizers, as in `policy_loss`.

    Returns:
        `(loss, metrics)`: loss `[]` float32 (float64 for float64 input) and the metrics of
        `policy_loss_from_logits`, entropy included, as 0-dim tensors. Gradients come back in the dtypes of
        hidden, weight and bias. Bad inputs raise ValueError naming the argument.
    """
    config = resolve_config(config, overrides)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: expected one of {', '.join(map(repr, BACKENDS))}")
    layout = check_hidden_inputs(hidden, weight, bias, input_ids, old_log_prob, advantages, response_mask,
                                 cu_seqlens, rollout_topk_ids, rollout_topk_log_probs, temperature, config,
                                 chunk_size, rollout_is_weights, dp_size, batch_num_tokens, global_batch_size,
                                 values_in_kernel=backend != "reference")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda else "reference"
    kwargs = dict(cu_seqlens=cu_seqlens, rollout_topk_ids=rollout_topk_ids,
                  rollout_topk_log_probs=rollout_topk_log_probs, temperature=temperature, config=config,
                  rollout_is_weights=rollout_is_weights, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                  global_batch_size=global_batch_size)
    if backend == "reference":
        from .reference.hidden import policy_loss_from_hidden_reference
        return policy_loss_from_hidden_reference(hidden, weight, input_ids, old_log_prob, advantages,
                                                 response_mask, bias=bias, **kwargs)
    from .ops.hidden import triton_policy_loss_from_hidden  # imports triton: TRITON_INTERPRET is set by now
    return triton_policy_loss_from_hidden(hidden, weight, bias, input_ids, old_log_prob, advantages, response_mask,
                                          layout=layout, chunk_size=chunk_size, **kwargs)


def check_hidden_inputs(hidden, weight, bias, input_ids, old_log_prob, advantages, response_mask, cu_seqlens,
                        topk_ids, topk_log_probs, temperature, config: PolicyLossConfig, chunk_size,
                        rollout_is_weights, dp_size, batch_num_tokens, global_batch_size, *,
                        values_in_kernel: bool) -> Layout:
    """Validate the from-hidden inputs (ValueError naming the argument); returns the token layout.

    The head (hidden, weight, bias) and chunk_size here; the rest as `check_logits_inputs` does for logits of
    shape hidden.shape[:-1] + (V,), given as a one-element stand-in expanded to that shape (no memory).
    """
    check_per_token_rows("hidden", hidden, "H", cu_seqlens)
    size = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != size or weight.shape[0] < 1:
        raise ValueError(f"weight has shape {tuple(getattr(weight, 'shape', ()))}, expected [V, H = {size}] "
                         "with V >= 1 (the LM head as nn.Linear stores it)")
    _check_like_hidden("weight", weight, hidden)
    vocab = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias has shape {tuple(getattr(bias, 'shape', ()))}, expected [V = {vocab}]")
        _check_like_hidden("bias", bias, hidden)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: expected a positive int (tokens per chunk) "
                         "or None")
    logits_stand_in = hidden.new_empty(()).expand(*hidden.shape[:-1], vocab)
    return check_logits_inputs(logits_stand_in, input_ids, old_log_prob, advantages, response_mask, cu_seqlens,
                               topk_ids, topk_log_probs, temperature, config, False, rollout_is_weights, dp_size,
                               batch_num_tokens, global_batch_size, values_in_kernel=values_in_kernel,
                               source="hidden")


def _check_like_hidden(name: str, t: torch.Tensor, hidden: torch.Tensor) -> None:
    if t.dtype != hidden.dtype:
        raise ValueError(f"{name} is {t.dtype} but hidden is {hidden.dtype}: the head's GEMM takes one dtype")
    if t.device != hidden.device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
