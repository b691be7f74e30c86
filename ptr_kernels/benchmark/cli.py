"""The command line of `ptr-kernels bench` (also `python -m ptr_kernels.benchmark`)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import host
from .providers import PROVIDERS
from .report import report
from .results import load_rows
from .sweep import END_RESERVE_S, sweep
from .workloads import LAYOUTS, METHODS, SWEEPS

DEFAULT_OUT = "bench/results"
DESCRIPTION = ("Benchmark harness: the fused kernel against eager PyTorch, torch.compile, the per-sequence loop "
               "and verl.")


def _list(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated subset of {', '.join(choices)}")
        return items
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ptr-kernels bench`."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto (default): cuda when available")
    parser.add_argument("--sweep", choices=tuple(SWEEPS), default=None,
                        help="shape set (default: full on cuda, tiny on cpu)")
    parser.add_argument("--full", action="store_const", const="full", dest="sweep", help="same as --sweep full")
    parser.add_argument("--providers", type=_list(PROVIDERS), default=None,
                        help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all on cuda; "
                             "eager,loop,verl on cpu, where a named fused runs in the Triton interpreter)")
    parser.add_argument("--methods", type=_list(METHODS), default=list(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--layouts", type=_list(LAYOUTS), default=list(LAYOUTS),
                        help=f"comma-separated subset of {','.join(LAYOUTS)} (default: both)")
    parser.add_argument("--shapes", type=_list(sorted({s.name for shapes in SWEEPS.values() for s in shapes})),
                        default=None, help="comma-separated shape names of the sweep to run (default: all of it), "
                                           "e.g. 256x4096,8seq/1048576tok")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of log_prob, old_log_prob and advantages (default: float32)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {DEFAULT_OUT}; with --report: the CSV's)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole run (default: no limit): configs that would start too late "
                             "are recorded as skipped (the last 45 s are kept for launch counts and the report)")
    parser.add_argument("--max-reps", type=int, default=None,
                        help="most timed calls per config and mode (default on cuda / cpu: 100 / 10; --host: "
                             "30 / 300 rounds; --from-logits: 20 / 2)")
    parser.add_argument("--report", type=Path, default=None, metavar="CSV",
                        help="only write plots, results.md and targets from an existing results CSV")
    parser.add_argument("--host", action="store_true",
                        help="only measure the host time of one fwd+bwd call, fused vs eager, interleaved (CPU: "
                             "Triton launches stubbed, ratio target 0.15; CUDA: wall-clock at 8x512 and packed "
                             "8 / 4096); writes host.csv and host.md")
    parser.add_argument("--from-logits", action="store_true",
                        help="only compare the loss from logits: fused vs eager log_softmax (and TRL / Liger-Kernel "
                             "when installed); bf16 logits, V 32k and 152k on cuda, a tiny shape on cpu; writes "
                             "from_logits.csv and from_logits.md")
    parser.add_argument("--from-hidden", action="store_true",
                        help="only compare the loss from hidden states (the LM head included): ours against the "
                             "materialized head, Liger-Kernel, TRL and verl when installed, and the head's GEMMs; "
                             "bf16 at N 8K and 32K, H 3584, V 152064 on cuda, a tiny shape on cpu; writes "
                             "from_hidden.csv and from_hidden.md")
    parser.add_argument("--step", action="store_true",
                        help="with --from-hidden: time a small decoder's forward + loss + backward per loss path "
                             "instead; writes step.csv and step.md")


def run(args: argparse.Namespace) -> int:
    """`ptr-kernels bench`: run the sweep (or `--report` an earlier one). Returns 0, or 1 if a config failed
    (its `error` row says why; the other results are written all the same)."""
    deadline = math.inf if args.time_budget is None else time.monotonic() + args.time_budget - END_RESERVE_S
    if args.report is not None:
        report(load_rows(args.report), args.out or args.report.parent, args.report)
        return 0
    out = args.out or Path(DEFAULT_OUT)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if args.from_logits:
        from .logits_bench import run as run_from_logits
        return run_from_logits(args, device, out)
    if args.step and not args.from_hidden:
        print("--step is the step benchmark of --from-hidden: give both", file=sys.stderr)
        return 2
    if args.from_hidden:
        from .hidden_bench import run as run_from_hidden
        return run_from_hidden(args, device, out)
    if args.host:
        if device.type == "cpu" and not interpreter_ready():
            print("--host on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 before triton is imported",
                  file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        return host.run(args, device, out)
    args.sweep = args.sweep or ("full" if device.type == "cuda" else "tiny")
    if args.providers is None:
        args.providers = list(PROVIDERS)
        if device.type == "cpu":
            print("CPU: providers eager, loop, verl; 'compile' (tens of seconds of compile per shape here) and "
                  "'fused' (in the Triton interpreter) run when named in --providers")
            args.providers = ["eager", "loop", "verl"]
    elif device.type == "cpu" and "fused" in args.providers:
        interpreter_ready()  # as fuzz does: on before triton is imported (else the sweep says why it skips fused)
    out.mkdir(parents=True, exist_ok=True)
    rows = sweep(args, device, out, deadline)
    report(rows, out, out / "results.csv")
    failed = [r for r in rows if r["metric"] == "error"]
    for r in failed:
        print(f"failed: {r['provider']} {r['method']} {r['layout']} {r['shape']}: {r['note']}", file=sys.stderr)
    return 1 if failed else 0


def interpreter_ready() -> bool:
    """Whether the Triton kernels will run in the interpreter: TRITON_INTERPRET=1 is set, or triton is not
    imported yet and setting it now takes effect."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if "triton" in sys.modules:
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptr_kernels.benchmark", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
