"""The from-hidden reference: the LM head materialized in float64, then the from-logits reference.

logits = hidden @ weight^T + bias in float64 (`[..., V]`), then `reference.logits.reference_policy_loss_from_logits`
on them: the gradients reach hidden, weight and bias by autograd through that one product. Masked positions
take no part: their hidden states are replaced by 0 before the product, so garbage there (NaN) cannot reach
the weight's gradient as 0 * NaN.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import PolicyLossConfig
from ..validation import Layout, mask_as_bool
from .logits import reference_policy_loss_from_logits
from .tokens import compute_dtype


def materialized_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        valid: torch.Tensor) -> torch.Tensor:
    """hidden @ weight^T + bias in float64, with the hidden states of positions where `valid` is False set to 0."""
    rows = torch.where(valid[..., None], hidden, 0).to(torch.float64)
    logits = rows @ weight.to(torch.float64).t()
    return logits if bias is None else logits + bias.to(torch.float64)


def reference_policy_loss_from_hidden(hidden, weight, bias, input_ids, old_log_prob, advantages, response_mask,
                                      cu_seqlens, rollout_is_weights, topk_ids, topk_log_probs, *, temperature: float,
                                      config: PolicyLossConfig, layout: Layout, normalizers: tuple):
    """`policy_loss_from_hidden(..., backend="reference")` on validated inputs: `(loss, metrics)` in float32
    (float64 for float64 input), the from-logits reference on the materialized logits."""
    logits = materialized_logits(hidden, weight, bias, mask_as_bool(response_mask, input_ids))
    loss, metrics = reference_policy_loss_from_logits(
        logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, topk_ids,
        topk_log_probs, temperature=temperature, config=config, layout=layout, normalizers=normalizers)
    out = compute_dtype(hidden.dtype)
    return loss.to(out), {name: value.to(out) for name, value in metrics.items()}
