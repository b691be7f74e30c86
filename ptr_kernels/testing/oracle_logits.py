"""The literal oracle of the from-logits loss: docs/math.md section 7 token by token, in Python float64.

Per valid token: log pi over the vocabulary from its logits (a max-shifted log-sum-exp), the entropy, the
Top-K divergence built as the set TopK_t union {y_t} plus "other", literally; then the literal loop of
`oracle.py` with that log pi(y_t) and D_t; finally d loss / d logits by hand:
d loss / d log_prob_t * (onehot(y_t) - pi_t) / temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import LOGIT_DIVERGENCES, PolicyLossConfig
from ..validation import mask_as_bool
from .oracle import policy_loss_literal

OTHER_FLOOR = 1e-12


@dataclass
class LiteralLogitsResult:
    """loss, loss_magnitude and near_tie as in `oracle.LiteralResult`; metrics with `entropy`; float64 CPU
    tensors: grad `[like logits]` (d loss / d logits), log_prob and divergence `[like input_ids]` (0 masked)."""

    loss: float
    loss_magnitude: float
    grad: torch.Tensor
    metrics: dict
    log_prob: torch.Tensor
    divergence: torch.Tensor
    near_tie: torch.Tensor


def log_softmax_literal(logits: list, temperature: float) -> list:
    """log softmax(logits / temperature) of one row of Python floats."""
    z = [v / temperature for v in logits]
    top = max(z)
    lse = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - lse for v in z]


def topk_divergence_literal(log_pi: list, y: int, old_log_prob: float, topk_ids: list, topk_log_probs: list,
                            kind: str) -> float:
    """D_t of docs/math.md section 7 for one token: the set TopK union {y} (mu(y) = exp(old_log_prob) when y
    is not in the top-K) plus "other", each p(other) floored at 1e-12."""
    members = {a: (lmu, log_pi[a]) for a, lmu in zip(topk_ids, topk_log_probs)}  # id -> (log mu, log pi)
    if y not in members:
        members[y] = (old_log_prob, log_pi[y])
    probs = [(math.exp(lmu), lmu, math.exp(lpi), lpi) for lmu, lpi in members.values()]
    mu_other = max(1.0 - sum(p[0] for p in probs), OTHER_FLOOR)
    pi_other = max(1.0 - sum(p[2] for p in probs), OTHER_FLOOR)
    probs.append((mu_other, math.log(mu_other), pi_other, math.log(pi_other)))
    if kind == "topk_tv":
        return 0.5 * sum(abs(mu - pi) for mu, _, pi, _ in probs)
    return sum(mu * (lmu - lpi) for mu, lmu, _, lpi in probs if mu > 0)


def policy_loss_from_logits_literal(logits, input_ids, old_log_prob, advantages, response_mask=None, *,
                                    cu_seqlens=None, rollout_topk_ids=None, rollout_topk_log_probs=None,
                                    temperature: float = 1.0, config=None, rollout_is_weights=None, dp_size=1,
                                    batch_num_tokens=None, global_batch_size=None,
                                    tie_rtol: float = 1e-9) -> LiteralLogitsResult:
    """The from-logits loss of docs/math.md, token by token; the inputs of `policy_loss_from_logits`."""
    config = config or PolicyLossConfig()
    vocab = logits.shape[-1]
    rows = logits.detach().reshape(-1, vocab).to(torch.float64).tolist()
    ids = input_ids.reshape(-1).tolist()
    olp = old_log_prob.detach().reshape(-1).to(torch.float64).tolist()
    valid = mask_as_bool(response_mask, input_ids).reshape(-1).tolist()
    topk = config.divergence in LOGIT_DIVERGENCES
    if topk:
        k_ids = rollout_topk_ids.reshape(len(ids), -1).tolist()
        k_lps = rollout_topk_log_probs.detach().reshape(len(ids), -1).to(torch.float64).tolist()
    log_pis, log_prob, divergence, entropy = {}, [0.0] * len(ids), [0.0] * len(ids), []
    for k, ok in enumerate(valid):
        if not ok:
            continue
        log_pi = log_pis[k] = log_softmax_literal(rows[k], temperature)
        log_prob[k] = log_pi[ids[k]]
        entropy.append(-sum(math.exp(v) * v for v in log_pi if v > -math.inf))
        if topk:
            divergence[k] = topk_divergence_literal(log_pi, ids[k], olp[k], k_ids[k], k_lps[k], config.divergence)
    shape = tuple(input_ids.shape)
    log_prob_t = torch.tensor(log_prob, dtype=torch.float64).reshape(shape)
    divergence_t = torch.tensor(divergence, dtype=torch.float64).reshape(shape)
    lit = policy_loss_literal(log_prob_t, old_log_prob.detach().to(torch.float64), advantages.detach(), response_mask,
                              cu_seqlens=cu_seqlens, config=config, rollout_is_weights=rollout_is_weights,
                              dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                              global_batch_size=global_batch_size, tie_rtol=tie_rtol,
                              divergence_values=divergence_t if topk else None)
    grad = [[0.0] * vocab for _ in ids]
    grad_log_prob = lit.grad.reshape(-1).tolist()
    for k, log_pi in log_pis.items():
        g = grad_log_prob[k] / temperature
        grad[k] = [g * ((v == ids[k]) - math.exp(lp)) for v, lp in enumerate(log_pi)]
    metrics = dict(lit.metrics, entropy=sum(entropy) / len(entropy) if entropy else 0.0)
    return LiteralLogitsResult(loss=lit.loss, loss_magnitude=lit.loss_magnitude,
                               grad=torch.tensor(grad, dtype=torch.float64).reshape(logits.shape),
                               metrics=metrics, log_prob=log_prob_t, divergence=divergence_t, near_tie=lit.near_tie)
