"""`ptr-kernels fuzz`: a backend against the literal SPEC loop on seeded random cases.

Each case (`cases.random_case(seed)`: both layouts, lengths 0..max_len, holes, garbage at masked positions,
random in-range configs and normalizers) is rounded to `--dtype`; the literal loop (`literal.py`, float64)
runs on the rounded inputs and the backend on the same values in that dtype. Compared, with a tolerance for
the dtype: the loss (error relative to the size of the terms it sums), d loss / d log_prob (relative to its
largest entry), every metric, and the gate decisions, read from the gradient: a token kept by one side and
dropped by the other has a zero gradient on one side only. A decision the literal loop finds within the
tolerance of flipping is a near tie; a disagreement there is accepted only if the literal loop, given the
backend's decisions at those tokens, then matches everything.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from .cases import random_case
from .oracle import policy_loss_literal

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("auto", "reference", "triton")
FLOAT64_RTOL = 1e-9
FLOAT32_RTOL = 1e-5  # arithmetic in float32 (SPEC section 1) for every dtype but float64
FLOAT32_TIE_RTOL = 1e-4  # float32 prefix sums over a few hundred tokens


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol of loss, gradient and metrics; relative distance of a decision that counts as a near tie).

    Outputs come back in the input dtype, so its rounding (2 ulp) adds to the float32 arithmetic error.
    """
    if dtype == torch.float64:
        return FLOAT64_RTOL, FLOAT64_RTOL
    return FLOAT32_RTOL + 2 * torch.finfo(dtype).eps, FLOAT32_TIE_RTOL


@dataclass
class Summary:
    """Running maxima over the cases."""

    cases: int = 0
    tokens: int = 0
    loss_err: float = 0.0
    grad_err: float = 0.0
    metric_err: float = 0.0
    mask_disagreements: int = 0  # decisions that differ and are not near ties
    near_ties: int = 0  # tokens whose decision lies within the tie tolerance
    ties_flipped: int = 0  # near ties decided the other way by the backend (accepted)
    failures: list = field(default_factory=list)


def _errors(lit, loss, metrics, grad, rtol, dtype):
    """Normalized errors (loss, grad, metric) and the metric keys that disagree (or are missing).

    The gradient comes back in `dtype`: below its smallest normal number it is rounded to a fixed step
    (the subnormal spacing), which is allowed on top of the relative error.
    """
    loss_err = abs(loss - lit.loss) / max(lit.loss_magnitude, 1e-30)
    grad_err = 0.0
    if grad.numel():
        subnormal_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
        excess = ((grad - lit.grad).abs() - subnormal_step).clamp(min=0)
        grad_err = excess.max().item() / max(lit.grad.abs().max().item(), 1e-30)
    metric_err, bad = 0.0, sorted(set(metrics) ^ set(lit.metrics))
    for key in set(metrics) & set(lit.metrics):
        err = abs(metrics[key] - lit.metrics[key]) / max(1.0, abs(lit.metrics[key]))
        metric_err = max(metric_err, err)
        if not err <= rtol:
            bad.append(key)
    return loss_err, grad_err, metric_err, bad


def check_case(case, backend: str, dtype: torch.dtype, device) -> tuple[dict, list]:
    """Run one case on the backend and the literal loop. Returns (numbers for the summary, problems)."""
    from ..api import policy_loss

    rtol, tie_rtol = tolerances(dtype)
    rounded = case.rounded(dtype)
    lit = policy_loss_literal(**rounded.inputs(torch.float64), tie_rtol=tie_rtol)
    inputs = case.inputs(dtype, device)
    log_prob = inputs["log_prob"].requires_grad_(True)
    loss, metrics = policy_loss(**inputs, backend=backend)
    (grad,) = torch.autograd.grad(loss, log_prob)
    loss = loss.item()
    metrics = {k: v.item() for k, v in metrics.items()}
    grad = grad.detach().to("cpu", torch.float64)

    mask = torch.ones_like(grad, dtype=torch.bool)
    if inputs["response_mask"] is not None:
        mask = inputs["response_mask"].cpu() != 0
    # a kept token whose gradient underflows in the output dtype is not a dropped one
    tiny = torch.finfo(dtype).tiny
    flipped = mask & (((grad == 0) & (lit.grad.abs() >= tiny)) | ((grad != 0) & (lit.grad == 0)))
    ties = lit.near_tie & mask
    untied = flipped & ~ties
    problems = []
    n_flipped_ties = int((flipped & ties).sum())
    if n_flipped_ties and not untied.any():
        # the backend decided near ties the other way: the literal loop with those decisions must match
        lit = policy_loss_literal(**rounded.inputs(torch.float64), tie_rtol=tie_rtol,
                                  gate_override=(flipped, 1.0 - lit.gate))
    loss_err, grad_err, metric_err, bad_metrics = _errors(lit, loss, metrics, grad, rtol, dtype)
    n_tok = int(mask.sum())
    if n_flipped_ties and bad_metrics:
        # each flipped decision moves a fraction metric by exactly 1 / n_tok
        allowance = n_flipped_ties / max(n_tok, 1)
        bad_metrics = [k for k in bad_metrics if not (k.startswith(("mask_frac", "clip_frac")) and k in metrics
                                                      and k in lit.metrics
                                                      and abs(metrics[k] - lit.metrics[k]) <= allowance + rtol)]
    if untied.any():
        where = untied.nonzero().tolist()[:8]
        problems.append(f"{int(untied.sum())} mask disagreement(s), first at index {where}")
    if not loss_err <= rtol:
        problems.append(f"loss {loss!r} vs literal {lit.loss!r} (error {loss_err:.3g})")
    if not grad_err <= rtol:
        problems.append(f"gradient error {grad_err:.3g}")
    if bad_metrics:
        problems.append("metrics " + ", ".join(f"{k}: {metrics.get(k)!r} vs {lit.metrics.get(k)!r}"
                                               for k in sorted(bad_metrics)))
    numbers = dict(tokens=n_tok, loss_err=loss_err, grad_err=grad_err, metric_err=metric_err,
                   mask_disagreements=int(untied.sum()), near_ties=int(ties.sum()), ties_flipped=n_flipped_ties)
    return numbers, problems


def _progress(iterable, total):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional extra
        return iterable
    return tqdm(iterable, total=total, desc="fuzz", unit="case", file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ptr-kernels fuzz`."""
    parser.add_argument("--cases", type=int, default=300, help="number of random cases (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; case i uses seed + i (default 0)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="implementation under test (auto: triton on CUDA, reference on CPU)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="input dtype (default: float64 for reference, float32 for triton)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available")
    parser.add_argument("--max-len", type=int, default=300, help="longest sequence (default 300)")
    parser.add_argument("--show", type=int, default=5, help="failing cases printed in full (default 5)")


def run(args: argparse.Namespace) -> int:
    """`ptr-kernels fuzz`: 0 when the backend agrees with the literal loop on every case, 1 otherwise,
    2 when the backend cannot run here."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    backend = args.backend if args.backend != "auto" else ("triton" if device == "cuda" else "reference")
    dtype = DTYPES[args.dtype or ("float64" if backend == "reference" else "float32")]
    if backend == "triton" and device == "cpu":
        # Triton runs on the CPU only in its interpreter, which must be chosen before triton is imported
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("triton was imported without TRITON_INTERPRET=1; set it in the environment", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    rtol, tie_rtol = tolerances(dtype)
    print(f"ptr-kernels fuzz: backend={backend} device={device} dtype={str(dtype).removeprefix('torch.')} "
          f"cases={args.cases} seeds={args.seed}..{args.seed + args.cases - 1}")
    s = Summary()
    for seed in _progress(range(args.seed, args.seed + args.cases), args.cases):
        case = random_case(seed, max_len=args.max_len)
        try:
            numbers, problems = check_case(case, backend, dtype, device)
        except NotImplementedError as exc:
            print(f"backend {backend!r} is not available yet: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # a crash on one case is a finding, not the end of the run
            numbers, problems = {}, [f"{type(exc).__name__}: {exc}"]
        s.cases += 1
        s.tokens += numbers.get("tokens", 0)
        s.mask_disagreements += numbers.get("mask_disagreements", 0)
        s.near_ties += numbers.get("near_ties", 0)
        s.ties_flipped += numbers.get("ties_flipped", 0)
        for key in ("loss_err", "grad_err", "metric_err"):
            value = numbers.get(key, 0.0)
            setattr(s, key, value if math.isnan(value) else max(getattr(s, key), value))
        if problems:
            s.failures.append((case, problems))

    rows = [("cases", f"{s.cases} ({len(s.failures)} failed)", ""), ("valid tokens", str(s.tokens), ""),
            ("max loss error", f"{s.loss_err:.3g}", f"{rtol:.3g}"),
            ("max grad error", f"{s.grad_err:.3g}", f"{rtol:.3g}"),
            ("max metric error", f"{s.metric_err:.3g}", f"{rtol:.3g}"),
            ("mask disagreements", str(s.mask_disagreements), "0"),
            ("near ties (flipped)", f"{s.near_ties} ({s.ties_flipped})", f"within {tie_rtol:.3g}")]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'quantity':<{width}}  {'value':>16}  tolerance")
    for name, value, tol in rows:
        print(f"{name:<{width}}  {value:>16}  {tol}")
    for case, problems in s.failures[:args.show]:
        print(f"\nFAIL {case.describe()}\n  " + "\n  ".join(problems))
    if s.failures:
        print(f"\nFAIL: {len(s.failures)} of {s.cases} cases disagree with the literal loop "
              f"(first seeds: {[c.seed for c, _ in s.failures[:10]]})")
        return 1
    print(f"\nPASS: {backend} agrees with the literal loop on all {s.cases} cases")
    return 0
