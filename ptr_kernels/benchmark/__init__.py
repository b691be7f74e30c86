"""Benchmark harness: the fused kernel against eager PyTorch, torch.compile, the per-sequence loop and verl.

`ptr-kernels bench` (or `python -m ptr_kernels.benchmark`) sweeps shapes, methods and layouts for these
providers, all computing the loss of docs/math.md sections 2-6 on the same inputs, and writes `results.csv`
row by row, the plots, `results.md` and the performance targets as PASS / MISS; `--report CSV` redoes the
report from an earlier CSV; `--host` measures the host time of one call instead (docs/benchmarks.md says what
each figure means). One module per job:

- workloads: methods, layouts, the shapes of each sweep, RL-like input sets
- providers: each provider's loss on one input set, one fwd or fwd+bwd step
- timing:    CUDA-event / CPU timer, CUDA-graph replay, wall-clock, copy bandwidth, peak memory
- profiling: launch and host-sync counts from a profiler session
- traffic:   the bytes per token the design must move (the bandwidth targets' model)
- sweep:     the run plan, the per-config measurements, the time budget
- host:      `--host`: fused vs eager host time per call, Triton launches stubbed on CPU
- results:   the CSV columns, writer, reader and environment stamp
- targets:   the performance targets from the rows
- report:    results.md tables; plots: the PNGs
- from_hidden: `--from-hidden`: the loss from hidden states, the LM head included, against its peers
- step:      `--from-hidden --step`: a small decoder's training step per loss path
- cli:       the options, `run` and `main`
"""

from .cli import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
