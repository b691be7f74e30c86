"""`ptr-kernels bench --host`: the host time of one fused fwd+bwd call against the eager reference's.

On CPU (the Triton interpreter) every Triton launch is stubbed out for the duration, so what remains of a
fused call is its host work: Python, validation, torch's dispatch and autograd, the launchers' argument
handling. The outputs are `torch.empty`, so skipping the kernels is safe (the values are garbage, never read).
That host time is compared with the eager reference's fwd+bwd on the same inputs (about 200 small ops, all
host work at this size): the two alternate call by call in one run, so the machine's drift hits both, and the
ratio of the medians is the figure of merit (issue 7: at most 0.15 at a tiny shape, padded and packed).

On CUDA nothing is stubbed: the figure is the wall-clock per call of back-to-back fwd+bwd calls, synchronized
after each batch, fused and eager batches alternating (issue 13: at most 100 us at 8x512, below eager).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from pathlib import Path

import torch

from .providers import make_call, step
from .results import CsvSink, environment
from .timing import Timer, quantiles
from .workloads import Shape, make_inputs, packed, padded

# about 150 tokens in 4 sequences, as a micro-batch of short responses: the host's share is largest here
CPU_SHAPES = (padded(4, 41), packed(4, 164))
CUDA_SHAPES = (padded(8, 512), packed(8, 4096))
TARGET_RATIO = 0.15
WARMUP_CALLS = 5
CUDA_CALLS_PER_BATCH = 20
RATIO_METRICS = ("host_ratio", "wall_ratio")


@contextlib.contextmanager
def stubbed_triton_launches():
    """Every Triton kernel launch (`kernel[grid](...)`, the interpreter's or the JIT's) becomes a no-op for the
    duration; yields a dict whose "launches" counts the launches skipped."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    counter = {"launches": 0}

    def no_launch(self, *args, grid, warmup, **kwargs):
        counter["launches"] += not warmup

    originals = {cls: cls.__dict__["run"] for cls in (InterpretedFunction, JITFunction)}
    try:
        for cls in originals:
            cls.run = no_launch
        yield counter
    finally:
        for cls, run in originals.items():
            cls.run = run


def measure(device: torch.device, methods, layouts, dtype: torch.dtype, reps: int, out: Path) -> list:
    """The host measurement for each (method, layout) into `out/host.csv`; returns the rows.

    Rows (mode fwd_bwd), CPU: `host_us` of fused (launches stubbed) and eager, `host_ratio` (fused p50 /
    eager p50) and `stubbed_launches` (per fused call); CUDA: `wall_us` of both and `wall_ratio`.
    """
    cuda = device.type == "cuda"
    sink = CsvSink(out / "host.csv", environment(device), str(dtype).removeprefix("torch."))
    shapes = [s for s in (CUDA_SHAPES if cuda else CPU_SHAPES) if s.layout in layouts]
    timer = Timer(device)
    for shape in shapes:
        inp = make_inputs(shape, device, dtype, seed=0, structure_seed=shape.tokens)
        key = (shape.layout, shape.name, shape.batch, shape.tokens, "fwd_bwd")
        for method in methods:
            calls = {p: make_call(p, method) for p in ("fused", "eager")}
            if cuda:
                times = _interleaved_wall(calls, inp, timer, reps)
                metric, ratio_metric = "wall_us", "wall_ratio"
                note = f"{reps} alternating batches of {CUDA_CALLS_PER_BATCH} back-to-back calls"
            else:
                with stubbed_triton_launches() as stub:
                    times = _interleaved_host(calls, inp, reps)
                per_call = stub["launches"] / (WARMUP_CALLS + reps)
                sink.add("fused", method, *key, "stubbed_launches", (per_call,) * 3,
                         note="Triton launches skipped per fused call")
                metric, ratio_metric = "host_us", "host_ratio"
                note = f"{reps} alternating calls; fused with every Triton launch stubbed"
            for provider, values in times.items():
                sink.add(provider, method, *key, metric, quantiles(values), note=note)
            ratio = statistics.median(times["fused"]) / statistics.median(times["eager"])
            sink.add("fused", method, *key, ratio_metric, (ratio,) * 3, note="fused p50 / eager p50")
    sink.close()
    return sink.rows


def _run(call, inp) -> None:
    inp.log_prob.grad = None
    step(call, inp, "fwd_bwd")


def _interleaved_host(calls: dict, inp, reps: int) -> dict:
    """Per-call `perf_counter` times (us) of each provider's fwd+bwd, alternating which goes first; the garbage
    collector paused so that neither pays for the other's garbage."""
    for _ in range(WARMUP_CALLS):
        for call in calls.values():
            _run(call, inp)
    names = list(calls)
    times = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for i in range(reps):
            for name in names if i % 2 == 0 else reversed(names):
                inp.log_prob.grad = None
                t0 = time.perf_counter()
                step(calls[name], inp, "fwd_bwd")
                times[name].append((time.perf_counter() - t0) * 1e6)
    finally:
        gc.enable()
    return times


def _interleaved_wall(calls: dict, inp, timer: Timer, batches: int) -> dict:
    """Wall-clock per call (us) of batches of back-to-back fwd+bwd calls, synchronized before and after each
    batch, the providers' batches alternating."""
    for _ in range(WARMUP_CALLS):
        for call in calls.values():
            _run(call, inp)
    names = list(calls)
    times = {name: [] for name in names}
    for i in range(batches):
        for name in names if i % 2 == 0 else reversed(names):
            times[name].append(timer.wall_batch(lambda _, call=calls[name]: _run(call, inp), CUDA_CALLS_PER_BATCH))
    return times


def table(rows) -> list:
    """Markdown lines: per (method, layout) of the ratio rows in `rows`, each provider's p50 and the ratio,
    PASS/MISS against the target."""
    by_key = {(r["provider"], r["method"], r["layout"], r["shape"], r["metric"]): r for r in rows if r["p50"]}
    ratios = [r for r in rows if r["metric"] in RATIO_METRICS]
    cpu = any(r["metric"] == "host_ratio" for r in ratios)
    metric = "host_us" if cpu else "wall_us"
    header = ("method", "layout", "shape", f"fused {metric} p50", f"eager {metric} p50", "fused / eager", "target",
              "status") + (("stubbed launches per call",) if cpu else ())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in ratios:
        key = (r["method"], r["layout"], r["shape"])
        fused, eager = (float(by_key[(p, *key, metric)]["p50"]) for p in ("fused", "eager"))
        ratio = float(r["p50"])
        if r["metric"] == "host_ratio":
            required, ok = f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO
        else:
            required, ok = "< 1 (and fused <= 100 us at 8x512)", ratio < 1 and (r["shape"] != "8x512" or fused <= 100)
        cells = [*key, f"{fused:.1f} us", f"{eager:.1f} us", f"{ratio:.3f}", required, "PASS" if ok else "MISS"]
        if cpu:
            cells.append(f"{float(by_key[('fused', *key, 'stubbed_launches')]['p50']):g}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run(args, device: torch.device, out: Path) -> int:
    """`ptr-kernels bench --host`: measure, print the table, write host.csv and host.md under `out`."""
    cuda = device.type == "cuda"
    reps = args.max_reps or (30 if cuda else 300)
    rows = measure(device, args.methods, args.layouts, getattr(torch, args.dtype), reps, out)
    env = rows[0]
    if cuda:
        what = ("Wall-clock per fwd+bwd call of back-to-back calls (synchronized after each batch of "
                f"{CUDA_CALLS_PER_BATCH}), fused and eager batches alternating; nothing stubbed.")
    else:
        what = ("Host time of one fwd+bwd call: the fused path with every Triton launch stubbed out, against the "
                "eager reference on the same inputs, calls alternating in one run; ratio of the medians.")
    lines = [f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
             f"inputs {env['dtype']}.", "", what, ""] + table(rows)
    (out / "host.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))
    print(f"wrote {out / 'host.csv'} and {out / 'host.md'}")
    return 0
