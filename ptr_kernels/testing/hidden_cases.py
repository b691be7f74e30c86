"""Seeded random inputs of `policy_loss_from_hidden` and its literal oracle (tests, `fuzz --from-hidden`).

A case is a rollout as `logits_cases.random_logits_case` draws it, with the logits made by an LM head:
hidden ~ N(0, 1) `[..., H]`, weight ~ N(0, 4 / H) `[V, H]` (logits of standard deviation about 2, as the
from-logits cases), bias ~ N(0, 0.5^2) `[V]` ("peaked": 12 more on token 0). Masked positions hold NaN hidden
states besides the from-logits garbage: they must never show, not even in the weight's gradient.

The oracle is the chain rule written out in float64: logits = h W^T + b, the from-logits oracle
(`oracle_logits.policy_loss_from_logits_literal`, docs/math.md sections 2-7 token by token) gives
G = d loss / d logits, and then d loss / d h = G W, d loss / d W = G^T h, d loss / d b = sum over tokens of G.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..validation import mask_as_bool
from .logits_cases import random_logits_case
from .oracle_logits import policy_loss_from_logits_literal

PEAK = 12.0


def random_hidden_case(seed: int, *, hidden_size: int = 16, vocab: int = 64, bias: bool = True,
                       rows: str = "random", **kwargs) -> dict:
    """Keyword arguments of `policy_loss_from_hidden` (float64 CPU tensors: hidden `[B, T, H]` or `[N, H]`);
    `kwargs` go to `random_logits_case` (layout, k, temperature, config, num_seqs, max_len, ...). `bias`:
    whether the head has one ("peaked" rows always have one: it carries the peak)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(hidden_size))
    head_bias = 0.5 * torch.randn(vocab, generator=g, dtype=torch.float64) if bias or rows == "peaked" else None
    if rows == "peaked":
        head_bias[0] += PEAK
    drawn = {}

    def head(token_shape, generator):
        drawn["hidden"] = torch.randn(token_shape + (hidden_size,), generator=generator, dtype=torch.float64)
        logits = drawn["hidden"] @ weight.t()
        return logits if head_bias is None else logits + head_bias

    case = random_logits_case(seed, vocab=vocab, logits_fn=head, **kwargs)
    case.pop("logits")
    hidden = drawn["hidden"].masked_fill(~case["response_mask"][..., None], float("nan"))
    return dict(hidden=hidden, weight=weight, bias=head_bias, **case)


@dataclass
class LiteralHiddenResult:
    """loss, loss_magnitude, metrics and near_tie as in `oracle_logits.LiteralLogitsResult`; the float64
    gradients into hidden, weight and bias (None without a bias), and G = d loss / d logits `[N, V]`."""

    loss: float
    loss_magnitude: float
    metrics: dict
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor
    grad_logits: torch.Tensor
    near_tie: torch.Tensor


def policy_loss_from_hidden_literal(hidden, weight, input_ids, old_log_prob, advantages, response_mask=None, *,
                                    bias=None, **kwargs) -> LiteralHiddenResult:
    """The from-hidden loss and its gradients by the chain rule, in float64; the inputs of
    `policy_loss_from_hidden` (`kwargs`: those of the from-logits oracle)."""
    valid = mask_as_bool(response_mask, input_ids)
    rows = torch.where(valid[..., None], hidden.detach(), 0).to(torch.float64).reshape(-1, hidden.shape[-1])
    w = weight.detach().to(torch.float64)
    logits = rows @ w.t()
    if bias is not None:
        logits = logits + bias.detach().to(torch.float64)
    lit = policy_loss_from_logits_literal(logits.reshape(*input_ids.shape, -1), input_ids, old_log_prob, advantages,
                                          response_mask, **kwargs)
    grad = lit.grad.reshape(rows.shape[0], -1)
    return LiteralHiddenResult(loss=lit.loss, loss_magnitude=lit.loss_magnitude, metrics=lit.metrics,
                               grad_hidden=(grad @ w).reshape(hidden.shape), grad_weight=grad.t() @ rows,
                               grad_bias=None if bias is None else grad.sum(0), grad_logits=grad,
                               near_tie=lit.near_tie)


def rounding_bound(lit: LiteralHiddenResult, case: dict, dtype: torch.dtype) -> dict:
    """{name: elementwise bound} on how far a backend's gradients in `dtype` may be from the oracle's on inputs
    already rounded to `dtype`, beyond float32 arithmetic: each GEMM sums products of the logits' gradient
    rounded to `dtype` (eps per term: the interpreter's float32 -> bf16 cast truncates, a GPU's rounds to
    nearest, eps / 2) and the result is rounded once more (eps / 2). Zero for float32 and float64."""
    eps = 0.0 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
    g_abs = lit.grad_logits.abs()
    valid = mask_as_bool(case["response_mask"], case["input_ids"])
    rows = torch.where(valid[..., None], case["hidden"], 0).reshape(g_abs.shape[0], -1).abs()
    term_sums = dict(hidden=(g_abs @ case["weight"].abs()).reshape(case["hidden"].shape), weight=g_abs.t() @ rows,
                     bias=g_abs.sum(0))
    expected = dict(hidden=lit.grad_hidden, weight=lit.grad_weight, bias=lit.grad_bias)
    return {name: eps * term_sums[name] + eps / 2 * expected[name].abs()
            for name in term_sums if expected[name] is not None}
