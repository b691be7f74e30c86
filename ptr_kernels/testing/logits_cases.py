"""Seeded random inputs of `policy_loss_from_logits`, shaped like a rollout (tests, `fuzz --from-logits`, bench).

The rollout policy mu is the trained policy's logits plus a drift; y_t is sampled from mu, the top-K ids and
log-probs are mu's, and a fraction of the y_t is moved outside the top-K (a sampled tail token). Masked
positions hold garbage (ids -100, NaN logits, repeated top-K ids, +inf old_log_prob): it must never show.
"""

from __future__ import annotations

import torch

from ..config import PolicyLossConfig

GARBAGE_ID = -100


def random_logits_case(seed: int, *, layout: str = "padded", vocab: int = 64, k: int = 4, temperature: float = 1.0,
                       config: PolicyLossConfig = PolicyLossConfig(), num_seqs: int = 3, max_len: int = 12,
                       drift: float = 0.5, y_outside_topk: float = 0.3, holes: float = 0.15,
                       rows: str = "random", logits_fn=None) -> dict:
    """Keyword arguments of `policy_loss_from_logits` (float64 CPU tensors, logits `[B, T, V]` or `[N, V]`).

    rows: "random" logits ~ N(0, 2^2), or "peaked" (one token far ahead: probabilities near 0 and 1).
    logits_fn: `(token_shape, generator) -> float64 logits` drawn instead of N(0, 2^2) (a model's head).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (num_seqs,), generator=g)
    lengths[int(torch.randint(0, num_seqs, (1,), generator=g))] = max_len  # one full-length sequence
    if layout == "padded":
        width = int(lengths.max())
        token_shape = (num_seqs, width)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        cu_seqlens = None
    else:
        token_shape = (int(lengths.sum()),)
        mask = torch.ones(token_shape, dtype=torch.bool)
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    mask &= torch.rand(token_shape, generator=g) >= holes
    if logits_fn is None:
        logits = 2.0 * torch.randn(token_shape + (vocab,), generator=g, dtype=torch.float64)
    else:
        logits = logits_fn(token_shape, g)
    if rows == "peaked":
        logits[..., 0] += 12.0
    log_mu = torch.log_softmax((logits + drift * torch.randn(logits.shape, generator=g, dtype=torch.float64))
                               / temperature, dim=-1)
    input_ids = torch.multinomial(log_mu.exp().reshape(-1, vocab), 1, generator=g).reshape(token_shape)
    topk_log_probs, topk_ids = log_mu.topk(min(k, vocab), dim=-1)
    if vocab > k:  # move some y_t outside the top-K: a uniformly drawn id among the others
        outside = torch.rand(token_shape, generator=g) < y_outside_topk
        scores = torch.rand(token_shape + (vocab,), generator=g).scatter(-1, topk_ids, -1.0)
        input_ids = torch.where(outside, scores.argmax(-1), input_ids)
    old_log_prob = log_mu.gather(-1, input_ids[..., None])[..., 0]
    advantages = torch.randn(num_seqs, generator=g, dtype=torch.float64)

    masked = ~mask
    input_ids = input_ids.masked_fill(masked, GARBAGE_ID)
    logits = logits.masked_fill(masked[..., None], float("nan"))
    topk_ids = topk_ids.masked_fill(masked[..., None], 0)
    old_log_prob = old_log_prob.masked_fill(masked, float("inf"))
    return dict(logits=logits, input_ids=input_ids, old_log_prob=old_log_prob, advantages=advantages,
                response_mask=mask, cu_seqlens=cu_seqlens, rollout_topk_ids=topk_ids,
                rollout_topk_log_probs=topk_log_probs, temperature=temperature, config=config)


def cast(case: dict, dtype: torch.dtype, device="cpu", logits_dtype=None) -> dict:
    """The case with float tensors in `dtype` (logits in `logits_dtype`, default `dtype`) on `device`; the
    logits rounded first, so every backend sees the same values."""
    out = {}
    for name, value in case.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                value = value.to(logits_dtype or dtype if name == "logits" else dtype)
            value = value.to(device)
        out[name] = value
    return out
