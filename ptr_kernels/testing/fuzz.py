"""`ptr-kernels fuzz`: a backend against the literal loop (`oracle.py`) on seeded random cases.

Each case (`cases.random_case(seed)`: both layouts, lengths 0..max_len, holes, garbage at masked positions,
random in-range configs and normalizers) is rounded to `--dtype`; the literal loop (float64) runs on the
rounded inputs and the backend on the same values in that dtype. Compared, with a tolerance for the dtype
(a fixed floor, plus, in reduced precision, a multiple of the float32 reference's own error: `check_case`):
the loss (error relative to the size of the terms it sums), d loss / d log_prob (relative to its
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
FLOAT32_RTOL = 1e-5  # arithmetic in float32 (docs/math.md) for every dtype but float64
FLOAT32_TIE_RTOL = 3e-5  # float32 prefix sums over a few thousand tokens
FLOAT32_ERROR_MULTIPLE = 4  # a backend may be this many times as far off as the float32 reference, plus rtol
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol of loss, gradient and metrics; relative distance of a decision that counts as a near tie).

    Outputs come back in the input dtype, so its rounding (2 ulp) adds to the float32 arithmetic error.
    """
    if dtype == torch.float64:
        return FLOAT64_RTOL, FLOAT64_RTOL
    return FLOAT32_RTOL + 2 * torch.finfo(dtype).eps, FLOAT32_TIE_RTOL


def literal_result(case, dtype: torch.dtype, gate_override=None):
    """The literal loop (float64) on `case` rounded to `dtype`, its near ties marked with `dtype`'s tie tolerance
    (`tolerances`): the one near-tie rule, of the fuzz and of the kernel tests. `gate_override` as in
    `policy_loss_literal`."""
    return policy_loss_literal(**case.rounded(dtype).inputs(torch.float64), tie_rtol=tolerances(dtype)[1],
                               gate_override=gate_override)


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
    beyond_floor: int = 0  # cases over the fixed rtol that pass within the float32 reference's own error
    failures: list = field(default_factory=list)


def _errors(lit, loss, metrics, grad, dtype) -> dict:
    """Normalized errors against the literal loop: "loss", "grad" and one "metric:<name>" per metric (inf for a
    metric missing on one side).

    The loss error is relative to the size of the terms it sums; the gradient's to its largest entry. The
    gradient comes back in `dtype`: below its smallest normal number it is rounded to a fixed step (the
    subnormal spacing), which is allowed on top of the relative error.
    """
    errors = {"loss": abs(loss - lit.loss) / max(lit.loss_magnitude, 1e-30), "grad": 0.0}
    if grad.numel():
        subnormal_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
        excess = ((grad - lit.grad).abs() - subnormal_step).clamp(min=0)
        errors["grad"] = excess.max().item() / max(lit.grad.abs().max().item(), 1e-30)
    for key in set(metrics) | set(lit.metrics):
        if key in metrics and key in lit.metrics:
            errors["metric:" + key] = abs(metrics[key] - lit.metrics[key]) / max(1.0, abs(lit.metrics[key]))
        else:
            errors["metric:" + key] = math.inf
    return errors


@dataclass
class Comparison:
    """One backend's run of a case against the literal loop."""

    errors: dict  # from `_errors`, against the literal loop with the backend's near-tie decisions
    lit: object  # that literal result
    n_tok: int
    untied: torch.Tensor  # bool: decisions that differ and are not near ties
    near_ties: int
    ties_flipped: int


def _compare(case, backend: str, dtype: torch.dtype, device, lit) -> Comparison:
    """Run `case` on `backend` in `dtype` and measure it against `lit` (the literal loop on the rounded case)."""
    from ..api import policy_loss

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
    n_flipped_ties = int((flipped & ties).sum())
    if n_flipped_ties and not untied.any():
        # the backend decided near ties the other way: the literal loop with those decisions must match
        lit = literal_result(case, dtype, gate_override=(flipped, 1.0 - lit.gate))
    errors = _errors(lit, loss, metrics, grad, dtype)
    if n_flipped_ties:
        # each flipped decision moves a fraction metric by exactly 1 / n_tok
        allowance = n_flipped_ties / max(int(mask.sum()), 1)
        for key in metrics:
            if key.startswith(("mask_frac", "clip_frac")) and key in lit.metrics:
                errors["metric:" + key] = max(0.0, abs(metrics[key] - lit.metrics[key]) - allowance)
    return Comparison(errors=errors, lit=lit, n_tok=int(mask.sum()), untied=untied, near_ties=int(ties.sum()),
                      ties_flipped=n_flipped_ties)


def longest_sequence(case) -> int:
    """Positions in the longest sequence (row width for padded input)."""
    if case.cu_seqlens is None:
        return case.log_prob.shape[-1]
    return int((case.cu_seqlens[1:] - case.cu_seqlens[:-1]).max()) if case.cu_seqlens.numel() > 1 else 0


def uses_float32_yardstick(backend: str, dtype: torch.dtype) -> bool:
    """Whether the tolerance grows with the float32 reference's own error (see `check_case`)."""
    return dtype != torch.float64 and backend != "reference"


def check_case(case, backend: str, dtype: torch.dtype, device) -> tuple[dict, list]:
    """Run one case on the backend and the literal loop. Returns (numbers for the summary, problems).

    Each error (loss, gradient, every metric) must lie within `rtol` of the literal float64 loop; for a
    backend other than the reference in reduced precision, within `rtol + FLOAT32_ERROR_MULTIPLE * e_ref`,
    where e_ref is the same error of the float32 reference on the same inputs. Float32 evaluation drifts
    with the length of a sequence (prefix sums, long reductions); a backend may drift as much as the reference
    does, up to a small factor, but no more. Short cases keep the fixed floor `rtol`. The float32 reference
    itself (the yardstick; its logic is checked in float64 at 1e-9) is held to `rtol + n u`, the worst-case
    error of a float32 sum along the longest sequence (n positions, unit roundoff u).
    """
    rtol, _ = tolerances(dtype)
    lit = literal_result(case, dtype)
    run = _compare(case, backend, dtype, device, lit)
    allowed = dict.fromkeys(run.errors, rtol)
    if backend == "reference" and dtype != torch.float64:
        allowed = dict.fromkeys(run.errors, rtol + longest_sequence(case) * FLOAT32_UNIT_ROUNDOFF)
    if uses_float32_yardstick(backend, dtype):
        yardstick = _compare(case, "reference", dtype, device, lit).errors
        allowed = {k: rtol + FLOAT32_ERROR_MULTIPLE * yardstick.get(k, 0.0) for k in run.errors}
    problems = []
    if run.untied.any():
        where = run.untied.nonzero().tolist()[:8]
        problems.append(f"{int(run.untied.sum())} mask disagreement(s), first at index {where}")
    over = [k for k, err in run.errors.items() if not err <= allowed[k]]  # NaN fails
    if "loss" in over:
        problems.append(f"loss error {run.errors['loss']:.3g} > {allowed['loss']:.3g} "
                        f"(literal loss {run.lit.loss!r})")
    if "grad" in over:
        problems.append(f"gradient error {run.errors['grad']:.3g} > {allowed['grad']:.3g}")
    bad_metrics = sorted(k.removeprefix("metric:") for k in over if k.startswith("metric:"))
    if bad_metrics:
        problems.append("metrics " + ", ".join(
            f"{k}: error {run.errors['metric:' + k]:.3g} > {allowed['metric:' + k]:.3g} "
            f"(literal {run.lit.metrics.get(k)!r})" for k in bad_metrics))
    metric_errs = [v for k, v in run.errors.items() if k.startswith("metric:")]
    numbers = dict(tokens=run.n_tok, loss_err=run.errors["loss"], grad_err=run.errors["grad"],
                   metric_err=max(metric_errs, default=0.0), mask_disagreements=int(run.untied.sum()),
                   near_ties=run.near_ties, ties_flipped=run.ties_flipped,
                   beyond_floor=int(not over and any(err > rtol for err in run.errors.values())))
    return numbers, problems


def _progress(iterable, total):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional extra
        return iterable
    return tqdm(iterable, total=total, desc="fuzz", unit="case", file=sys.stderr)


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:  # "PASS on all 0 cases" would pass nothing
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ptr-kernels fuzz`."""
    parser.add_argument("--cases", type=_at_least_one, default=300,
                        help="number of random cases, at least 1 (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; case i uses seed + i (default 0)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="implementation under test (auto: triton on CUDA, reference on CPU)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="input dtype (default: float64 for reference, float32 for triton)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available")
    parser.add_argument("--max-len", type=_at_least_one, default=300, help="longest sequence (default 300)")
    parser.add_argument("--show", type=int, default=5, help="failing cases printed in full (default 5)")
    parser.add_argument("--from-logits", action="store_true",
                        help="fuzz policy_loss_from_logits (Top-K divergences, logits gradient) instead")
    parser.add_argument("--from-hidden", action="store_true",
                        help="fuzz policy_loss_from_hidden (the LM head by chunks; hidden, weight, bias gradients) "
                             "instead")


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
    if args.from_logits:
        from .fuzz_logits import run as run_from_logits
        return run_from_logits(args, device, backend, dtype)
    if args.from_hidden:
        from .fuzz_hidden import run as run_from_hidden
        return run_from_hidden(args, device, backend, dtype)
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
        s.beyond_floor += numbers.get("beyond_floor", 0)
        for key in ("loss_err", "grad_err", "metric_err"):
            value = numbers.get(key, 0.0)
            setattr(s, key, value if math.isnan(value) else max(getattr(s, key), value))
        if problems:
            s.failures.append((case, problems))

    tol = f"{rtol:.3g}"
    if uses_float32_yardstick(backend, dtype):
        tol += f" + {FLOAT32_ERROR_MULTIPLE} x the float32 reference's error"
    elif dtype != torch.float64:
        tol += " + n u (n: the longest sequence, u = 2**-24)"
    rows = [("cases", f"{s.cases} ({len(s.failures)} failed)", ""), ("valid tokens", str(s.tokens), ""),
            ("max loss error", f"{s.loss_err:.3g}", tol),
            ("max grad error", f"{s.grad_err:.3g}", tol),
            ("max metric error", f"{s.metric_err:.3g}", tol),
            ("mask disagreements", str(s.mask_disagreements), "0"),
            ("near ties (flipped)", f"{s.near_ties} ({s.ties_flipped})", f"within {tie_rtol:.3g}")]
    if dtype != torch.float64:
        rows.append(("cases over the floor", str(s.beyond_floor), "within the bound above"))
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
