"""`ptr-kernels fuzz --from-logits`: `policy_loss_from_logits` against the literal oracle on seeded random cases.

Each case (`logits_cases.random_logits_case`) draws a layout, a vocabulary of 16..2048, K in 1..20, a
temperature in [0.5, 1.5], a method, a divergence (Top-K or binary) and a budget; the oracle (`oracle_logits`,
float64) runs on the inputs rounded to `--dtype`, the backend on the same values. Compared: the loss (relative
to the size of the terms it sums), d loss / d logits (relative to its largest entry), every metric, and the
trust-region decisions, read from the gradient (a token cut by the mask has an all-zero row). A decision that
differs only where the oracle finds a near tie is counted, and that case's values are not compared.
"""

from __future__ import annotations

import math
import random

import torch

from ..config import PolicyLossConfig
from .fuzz import tolerances
from .logits_cases import cast, random_logits_case
from .oracle_logits import policy_loss_from_logits_literal

METHODS = ("cppo", "dppo", "ppo")
DIVERGENCES = ("topk_tv", "topk_kl", "binary_tv", "binary_kl")


def random_case(seed: int, max_len: int) -> dict:
    rng = random.Random(seed)
    config = PolicyLossConfig(method=rng.choice(METHODS), divergence=rng.choice(DIVERGENCES),
                              delta=rng.choice((0.05, 0.1, 0.15)), delta_b_quantile=rng.choice((None, 0.5, 0.9)),
                              loss_agg_mode=rng.choice(("token-mean", "seq-mean-token-mean", "token-sum")))
    return random_logits_case(seed, layout=rng.choice(("padded", "packed")), vocab=rng.randint(16, 2048),
                              k=rng.randint(1, 20), temperature=rng.uniform(0.5, 1.5), config=config,
                              num_seqs=rng.randint(1, 4), max_len=rng.randint(1, max_len),
                              rows=rng.choice(("random", "peaked")))


def check_case(case: dict, backend: str, dtype: torch.dtype, device) -> tuple[list, dict]:
    """(problems, numbers) of one case: the backend in `dtype` against the oracle on the rounded inputs."""
    from ..from_logits import policy_loss_from_logits

    rtol, tie_rtol = tolerances(dtype)
    rounded = cast(cast(case, dtype), torch.float64)
    lit = policy_loss_from_logits_literal(**rounded, tie_rtol=tie_rtol)
    inputs = cast(rounded, dtype, device)
    logits = inputs.pop("logits").requires_grad_(True)
    loss, metrics = policy_loss_from_logits(logits, **inputs, backend=backend)
    (grad,) = torch.autograd.grad(loss, logits)
    grad = grad.detach().to("cpu", torch.float64)
    valid = rounded["response_mask"]
    numbers, problems = decision_flips((grad == 0).all(-1) & valid, (lit.grad == 0).all(-1) & valid, lit.near_tie)
    if problems is not None:
        return problems, numbers
    errors = {"loss": abs(loss.item() - lit.loss) / max(lit.loss_magnitude, 1e-30),
              "grad": (grad - lit.grad).abs().max().item() / max(lit.grad.abs().max().item(), 1e-30)}
    for key, value in lit.metrics.items():
        errors[key] = abs(metrics[key].item() - value) / max(1.0, abs(value))
    numbers["max_error"] = max(errors.values())
    return [f"{k} error {v:.3g} > {rtol:.3g}" for k, v in errors.items() if not v <= rtol], numbers


def decision_flips(cut: torch.Tensor, literal_cut: torch.Tensor, near_tie: torch.Tensor) -> tuple:
    """(numbers, problems) of the trust-region decisions, read as the tokens whose gradient row is all zero: the
    backend's `cut` against the oracle's. problems is None when no decision flipped (the values are compared
    next), [] when every flip is at a near tie (the values are not), a message otherwise."""
    flipped = cut != literal_cut
    numbers = dict(flipped=int(flipped.sum()), ties=int((flipped & near_tie).sum()))
    if (flipped & ~near_tie).any():
        return numbers, [f"{int((flipped & ~near_tie).sum())} decision(s) differ away from a near tie"]
    return numbers, ([] if flipped.any() else None)


def run_cases(args, path: str, device, backend: str, dtype: torch.dtype, seed_check) -> int:
    """The run of `ptr-kernels fuzz --<path>`: `seed_check(seed)` gives (a description of the case, a callable
    returning (problems, numbers)); 0 when every case agrees with the oracle, 1 otherwise."""
    print(f"ptr-kernels fuzz --{path}: backend={backend} device={device} "
          f"dtype={str(dtype).removeprefix('torch.')} cases={args.cases}")
    failures, max_error, ties = [], 0.0, 0
    for seed in range(args.seed, args.seed + args.cases):
        description, check = seed_check(seed)
        try:
            problems, numbers = check()
        except Exception as exc:  # a crash on one case is a finding, not the end of the run
            problems, numbers = [f"{type(exc).__name__}: {exc}"], {}
        max_error = max(max_error, numbers.get("max_error", 0.0))
        ties += numbers.get("ties", 0)
        if problems:
            failures.append(f"seed={seed} {description}: " + "; ".join(problems))
    print(f"max error {max_error:.3g} (tolerance {tolerances(dtype)[0]:.3g}); near ties decided the other way: {ties}")
    for line in failures[:args.show]:
        print("FAIL " + line)
    if failures:
        print(f"\nFAIL: {len(failures)} of {args.cases} cases disagree with the oracle")
        return 1
    print(f"\nPASS: {backend} agrees with the oracle on all {args.cases} {path} cases")
    return 0 if not math.isnan(max_error) else 1


def run(args, device, backend: str, dtype: torch.dtype) -> int:
    """The `--from-logits` run of `ptr-kernels fuzz`: 0 when every case agrees with the oracle, 1 otherwise."""
    def seed_check(seed):
        case = random_case(seed, min(args.max_len, 64))
        c = case["config"]
        description = (f"{c.method} {c.divergence} V={case['logits'].shape[-1]} "
                       f"K={case['rollout_topk_ids'].shape[-1]}")
        return description, lambda: check_case(case, backend, dtype, device)

    return run_cases(args, "from-logits", device, backend, dtype, seed_check)
