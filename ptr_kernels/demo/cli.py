"""RL with verifiable rewards on a CPU: a tiny transformer trained with cppo, dppo and ppo, and where each rejects.

The `ptr-kernels demo` subcommand: its options, the progress bar, the plots and the summary table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEFAULT_OUT = "demo-results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ptr-kernels demo`."""
    from .train import DemoConfig
    parser.add_argument("--steps", type=int, default=DemoConfig.steps,
                        help=f"RL steps per method, at least 1 (default: {DemoConfig.steps})")
    parser.add_argument("--seed", type=int, default=DemoConfig.seed,
                        help=f"seed of the model, the task and the sampling (default: {DemoConfig.seed})")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                        help="cpu (default, deterministic for a seed), cuda (the loss runs the Triton kernel), "
                             "auto: cuda when available")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {DEFAULT_OUT})")


def run(args: argparse.Namespace) -> int:
    """`ptr-kernels demo`: warm start, train each method, write the plots and tables, print the table."""
    from tqdm import tqdm

    from .report import write_report
    from .train import DemoConfig, run_demo

    if args.steps < 1:
        print(f"--steps must be at least 1, got {args.steps}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    out = args.out or Path(DEFAULT_OUT)
    config = DemoConfig(steps=args.steps, seed=args.seed)

    start = time.perf_counter()
    with tqdm(total=config.steps * len(config.methods), desc="RL steps", unit="step") as progress:
        result = run_demo(config, device, progress)
    report = write_report(result, out)
    print(report["table"])
    print(f"{time.perf_counter() - start:.0f} s on {device}; wrote {', '.join(str(p) for p in report['files'])}")
    return 0
