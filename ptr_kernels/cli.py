"""The `ptr-kernels` command line (also `python -m ptr_kernels`).

Subcommands:
  fuzz    compare a backend with the token-by-token oracle (docs/math.md) on seeded random cases
  bench   benchmark sweep of the fused kernel against eager, torch.compile, the per-sequence loop and verl
  demo    RL with verifiable rewards on a CPU: a tiny transformer trained with cppo, dppo and ppo in turn
  doctor  what this installation can run: torch, triton, CUDA or the interpreter, verl and TRL
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptr-kernels", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    from .testing import fuzz  # imports torch, not triton: fuzz sets TRITON_INTERPRET before triton is imported
    check = commands.add_parser("fuzz", help="compare a backend with the token-by-token oracle on random cases",
                                description=fuzz.__doc__.split("\n")[0])
    fuzz.add_arguments(check)
    check.set_defaults(func=fuzz.run)

    from . import benchmark
    bench = commands.add_parser("bench", help="benchmark sweep (CSV, plots, markdown tables, targets)",
                                description=benchmark.__doc__.split("\n")[0])
    benchmark.add_arguments(bench)
    bench.set_defaults(func=benchmark.run)

    from .demo import cli as demo_cli
    demo = commands.add_parser("demo", help="RL on a CPU with cppo, dppo and ppo: reward and rejection plots",
                               description=demo_cli.__doc__.split("\n")[0])
    demo_cli.add_arguments(demo)
    demo.set_defaults(func=demo_cli.run)

    from . import doctor
    check_install = commands.add_parser("doctor", help="what this installation can run (torch, triton, CUDA or "
                                                       "the interpreter, verl, TRL)",
                                        description=doctor.__doc__.split("\n")[0])
    check_install.set_defaults(func=doctor.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
