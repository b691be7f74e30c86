"""Public API: `policy_loss_from_hidden`, the policy loss straight from the LM head's input, never the whole logits."""

from __future__ import annotations

from typing import Optional

import torch

from .api import resolve_backend, triton_backend
from .config import PolicyLossConfig, resolve_config
from .reference.hidden import reference_policy_loss_from_hidden
from .validation import check_hidden_inputs, read_topk


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
    backend = resolve_backend(backend, hidden)
    normalizers = (dp_size, batch_num_tokens, global_batch_size)
    layout = check_hidden_inputs(hidden, weight, bias, input_ids, old_log_prob, advantages, response_mask,
                                 cu_seqlens, rollout_topk_ids, rollout_topk_log_probs, temperature, config,
                                 chunk_size, rollout_is_weights, normalizers, values_in_kernel=backend == "triton")
    rollout_topk_ids, rollout_topk_log_probs = read_topk(config, rollout_topk_ids, rollout_topk_log_probs)
    inputs = (hidden, weight, bias, input_ids, old_log_prob, advantages, response_mask, cu_seqlens,
              rollout_is_weights, rollout_topk_ids, rollout_topk_log_probs)
    if backend == "reference":
        return reference_policy_loss_from_hidden(*inputs, temperature=temperature, config=config, layout=layout,
                                                 normalizers=normalizers)
    return triton_backend().triton_policy_loss_from_hidden(*inputs, temperature=temperature, config=config,
                                                           layout=layout, normalizers=normalizers,
                                                           chunk_size=chunk_size)
