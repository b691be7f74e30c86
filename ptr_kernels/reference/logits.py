"""The from-logits reference: docs/math.md section 7 in plain PyTorch, materializing the distribution.

`log_softmax(logits / temperature)` is materialized in float64 (`[..., V]`), log pi(y_t) gathered from it (the
gradient reaches the logits through it alone, by autograd), the Top-K divergence computed from it (no
gradient), and the rest is the token-level reference (`tokens.reference_policy_loss` with D given): the
same trust-region code, not a second statement of it.
"""

from __future__ import annotations

import torch

from ..carried_state import NO_CARRIED_STATE, CarriedState
from ..config import PolicyLossConfig
from ..validation import Layout, mask_as_bool
from .tokens import compute_dtype, reference_policy_loss

OTHER_FLOOR = 1e-12  # p(other) floor, for mu and pi alike


def topk_divergence(log_pi: torch.Tensor, input_ids: torch.Tensor, old_log_prob: torch.Tensor,
                    topk_ids: torch.Tensor, topk_log_probs: torch.Tensor, kind: str) -> torch.Tensor:
    """Top-K TV or KL (docs/math.md section 7) per token, in log_pi's dtype.

    log_pi `[..., V]` = log pi; input_ids, old_log_prob `[...]`; topk_ids, topk_log_probs `[..., K]` (ids
    within [0, V)). The set is TopK union {y_t} plus "other": p_mu of a top-K id is exp(its rollout log-prob),
    p_mu(y_t) = exp(old_log_prob) when y_t is not among them. A zero probability contributes 0 to the KL.
    """
    dt = log_pi.dtype
    lp_k = log_pi.gather(-1, topk_ids)
    lmu_k = topk_log_probs.to(dt)
    pi_k, mu_k = lp_k.exp(), lmu_k.exp()
    lp_y = log_pi.gather(-1, input_ids[..., None])[..., 0]
    olp = old_log_prob.to(dt)
    pi_y, mu_y = lp_y.exp(), olp.exp()
    y_joins = ~(topk_ids == input_ids[..., None]).any(-1)  # y_t not in the top-K: one more member of the set
    pi_other = (1 - pi_k.sum(-1) - torch.where(y_joins, pi_y, 0.0)).clamp(min=OTHER_FLOOR)
    mu_other = (1 - mu_k.sum(-1) - torch.where(y_joins, mu_y, 0.0)).clamp(min=OTHER_FLOOR)
    if kind == "topk_tv":
        return 0.5 * ((mu_k - pi_k).abs().sum(-1) + torch.where(y_joins, (mu_y - pi_y).abs(), 0.0)
                      + (mu_other - pi_other).abs())
    if kind == "topk_kl":
        kl_k = torch.where(mu_k > 0, mu_k * (lmu_k - lp_k), 0.0).sum(-1)
        kl_y = torch.where(y_joins & (mu_y > 0), mu_y * (olp - lp_y), 0.0)
        return kl_k + kl_y + mu_other * (mu_other.log() - pi_other.log())
    raise ValueError(f"unknown Top-K divergence {kind!r}")


def reference_policy_loss_from_logits(logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens,
                                      rollout_is_weights, topk_ids, topk_log_probs, *, temperature: float,
                                      config: PolicyLossConfig, layout: Layout, normalizers: tuple,
                                      carried: CarriedState = NO_CARRIED_STATE):
    """`policy_loss_from_logits(..., backend="reference")` on validated inputs: `(loss, metrics)`, or
    `(loss, metrics, final_state)` when `carried` asks for it (docs/math.md section 8, as `policy_loss`).

    Loss and metrics come back in float32 (float64 for float64 logits), the logits' gradient in their dtype.
    Masked positions take no part: their logits rows and ids are replaced before any arithmetic.
    """
    mask = mask_as_bool(response_mask, input_ids)
    # masked rows may hold anything (ids -100, NaN logits): a NaN row would reach the gradient as 0 * NaN
    z = torch.where(mask[..., None], logits, 0).to(torch.float64) / temperature
    log_pi = torch.log_softmax(z, dim=-1)
    ids = torch.where(mask, input_ids, 0).long()
    log_prob = log_pi.gather(-1, ids[..., None])[..., 0]
    divergence = None
    if topk_ids is not None:
        with torch.no_grad():
            topk_ids = torch.where(mask[..., None], topk_ids, 0).long()
            divergence = topk_divergence(log_pi, ids, old_log_prob, topk_ids, topk_log_probs, config.divergence)
    loss, metrics, *final_state = reference_policy_loss(
        log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, config=config,
        layout=layout, normalizers=normalizers, carried=carried, divergence_values=divergence)
    with torch.no_grad():
        entropy = -torch.where(log_pi == float("-inf"), 0.0, log_pi.exp() * log_pi).sum(-1)
        count = mask.sum()
        metrics["entropy"] = torch.where(count > 0, torch.where(mask, entropy, 0.0).sum() / count.clamp(min=1), 0.0)
    out = compute_dtype(logits.dtype)
    return (loss.to(out), {name: value.to(out) for name, value in metrics.items()},
            *(state.to(out) for state in final_state))
