"""`ptr-kernels` command line: an argparse dispatcher over subcommand modules.

Each subcommand module provides `add_arguments(parser)` and `run(args) -> int` (the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "fuzz": ("ptr_kernels.fuzz", "compare a backend with the literal SPEC loop on seeded random cases"),
    "bench": ("ptr_kernels.benchmark", "time the fused kernel against eager, torch.compile, loop and verl"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ptr-kernels", description="Position-dependent trust-region policy "
                                     "losses (CPPO, DPPO, PPO clip): correctness fuzzing and benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in SUBCOMMANDS.items():
        # the modules import torch but not triton: `fuzz` sets TRITON_INTERPRET before triton is imported
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=summary, description=summary))
    args = parser.parse_args(argv)
    return importlib.import_module(SUBCOMMANDS[args.command][0]).run(args)


if __name__ == "__main__":
    sys.exit(main())
