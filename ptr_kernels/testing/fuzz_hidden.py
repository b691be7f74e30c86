"""`ptr-kernels fuzz --from-hidden`: `policy_loss_from_hidden` against the chain-rule oracle on seeded random cases.

Each case (`hidden_cases.random_hidden_case`) draws a layout, a vocabulary of 16..512, H in {8, 16, 32, 64},
K in 1..20, a temperature in [0.5, 1.5], a method, a divergence (Top-K or binary), a budget, a bias or none and
a chunk size (1 token, a few, or the default); the oracle (float64: logits = h W^T + b, then the from-logits
oracle and the chain rule) runs on the inputs rounded to `--dtype`, the backend on the same values. Compared:
the loss (relative to the size of the terms it sums), every metric, the gradients into hidden, weight and
bias (relative to their largest entry, plus in bf16 / fp16 the rounding of the logits' gradient,
`hidden_cases.rounding_bound`), and the trust-region decisions, read from the hidden gradient (a token cut by
the mask has an all-zero row). A decision that differs only where the oracle finds a near tie is counted, and
that case's values are not compared.
"""

from __future__ import annotations

import random

import torch

from ..config import PolicyLossConfig
from .fuzz import tolerances
from .fuzz_logits import DIVERGENCES, METHODS, decision_flips, run_cases
from .hidden_cases import policy_loss_from_hidden_literal, random_hidden_case, rounding_bound
from .logits_cases import cast

HEAD = ("hidden", "weight", "bias")


def random_case(seed: int, max_len: int) -> tuple[dict, object]:
    """(keyword arguments of `policy_loss_from_hidden`, chunk_size) of one seed."""
    rng = random.Random(seed)
    config = PolicyLossConfig(method=rng.choice(METHODS), divergence=rng.choice(DIVERGENCES),
                              delta=rng.choice((0.05, 0.1, 0.15)), delta_b_quantile=rng.choice((None, 0.5, 0.9)),
                              loss_agg_mode=rng.choice(("token-mean", "seq-mean-token-mean", "token-sum")))
    case = random_hidden_case(seed, hidden_size=rng.choice((8, 16, 32, 64)), vocab=rng.randint(16, 512),
                              bias=rng.random() < 0.5, layout=rng.choice(("padded", "packed")), k=rng.randint(1, 20),
                              temperature=rng.uniform(0.5, 1.5), config=config, num_seqs=rng.randint(1, 4),
                              max_len=rng.randint(1, max_len), rows=rng.choice(("random", "peaked")))
    return case, rng.choice((1, rng.randint(2, 16), None))


def check_case(case: dict, chunk_size, backend: str, dtype: torch.dtype, device) -> tuple[list, dict]:
    """(problems, numbers) of one case: the backend in `dtype` against the oracle on the rounded inputs."""
    from ..from_hidden import policy_loss_from_hidden

    rtol, tie_rtol = tolerances(dtype)
    rounded = cast(cast(case, dtype), torch.float64)
    lit = policy_loss_from_hidden_literal(**rounded, tie_rtol=tie_rtol)
    inputs = cast(rounded, dtype, device)
    head = {name: inputs.pop(name).requires_grad_(True) for name in HEAD if inputs[name] is not None}
    inputs.pop("bias", None)
    loss, metrics = policy_loss_from_hidden(head["hidden"], head["weight"], **inputs, bias=head.get("bias"),
                                            backend=backend, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss, list(head.values()))
    grads = {name: g.detach().to("cpu", torch.float64) for name, g in zip(head, grads)}
    valid = rounded["response_mask"]
    numbers, problems = decision_flips((grads["hidden"] == 0).all(-1) & valid,
                                       (lit.grad_hidden == 0).all(-1) & valid, lit.near_tie)
    if problems is not None:
        return problems, numbers
    errors = {"loss": abs(loss.item() - lit.loss) / max(lit.loss_magnitude, 1e-30)}
    expected = dict(hidden=lit.grad_hidden, weight=lit.grad_weight, bias=lit.grad_bias)
    bounds = rounding_bound(lit, rounded, dtype)
    for name, grad in grads.items():  # in units of rtol: the error beyond the dtype's rounding
        scale = max(expected[name].abs().max().item(), 1e-30)
        beyond = ((grad - expected[name]).abs() - bounds[name]).clamp(min=0)
        errors[f"grad_{name}"] = beyond.max().item() / scale
    for key, value in lit.metrics.items():
        errors[key] = abs(metrics[key].item() - value) / max(1.0, abs(value))
    numbers["max_error"] = max(errors.values())
    return [f"{k} error {v:.3g} > {rtol:.3g}" for k, v in errors.items() if not v <= rtol], numbers


def run(args, device, backend: str, dtype: torch.dtype) -> int:
    """The `--from-hidden` run of `ptr-kernels fuzz`: 0 when every case agrees with the oracle, 1 otherwise."""
    def seed_check(seed):
        case, chunk_size = random_case(seed, min(args.max_len, 64))
        c = case["config"]
        description = (f"{c.method} {c.divergence} H={case['hidden'].shape[-1]} V={case['weight'].shape[0]} "
                       f"K={case['rollout_topk_ids'].shape[-1]} chunk_size={chunk_size}")
        return description, lambda: check_case(case, chunk_size, backend, dtype, device)

    return run_cases(args, "from-hidden", device, backend, dtype, seed_check)
