"""`ptr-kernels bench --host`: the host time of one fused fwd+bwd call against the eager reference's.

On CPU (the Triton interpreter) every Triton launch is stubbed out for the duration, so what remains of a
fused call is its host work: Python, validation, torch's dispatch and autograd, the launchers' argument
handling. The outputs are `torch.empty`, so skipping the kernels is safe (the values are garbage, never read).
That host time is compared with the eager reference's fwd+bwd on the same inputs (about 200 small ops, all
host work at this size), in two conditions, each the same for both providers and both in one run:
- warm (the figure of merit, target at most 0.15 at a tiny shape, padded and packed): each timed call right
  after a call of its own provider, in batches of back-to-back calls that alternate between the providers;
- cold: each timed call right after a stand-in for the model's forward and backward between two loss calls
  (a small MLP step), which leaves the caches to neither provider.
The ratio of the medians is reported for both.

On CUDA nothing is stubbed: the figure is the wall-clock per call of back-to-back fwd+bwd calls, synchronized
after each batch, fused and eager batches alternating (target: at most 100 us at 8x512, below eager).
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
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
CPU_CALLS_PER_BATCH = 8  # warm: the first call of a batch follows the other provider and is not timed
RATIO_METRICS = ("host_ratio", "wall_ratio")  # CPU, CUDA
COLD = "_cold"  # suffix of the cold condition's metrics (CPU): host_us_cold, host_ratio_cold
PROVIDERS = ("fused", "eager")
# the floor of any loss written as a Python autograd.Function: apply + the engine's backward, nothing else
FLOOR = "autograd_floor"


class _AutogradFloor(torch.autograd.Function):
    """What every Python autograd op costs on the host: `apply` with the fused path's arguments, its
    allocations (loss, aux, the saved gradient; the backward's output) and the engine's backward call."""

    @staticmethod
    def forward(ctx, log_prob, inputs, options, side):
        grad = log_prob.new_empty(log_prob.shape)
        ctx.save_for_backward(grad)
        side.append(grad.new_empty(11))
        return grad.new_empty(())

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad.new_empty(grad.shape), None, None, None


def _floor_call(inp):
    return _AutogradFloor.apply(inp.log_prob, (inp.old_log_prob, inp.advantages, inp.mask), {}, [])


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


@dataclass
class _Case:
    """One (shape, method): its input set, both providers' calls and their samples (us)."""

    shape: Shape
    method: str
    inputs: object
    calls: dict
    times: dict = field(default_factory=lambda: {p: [] for p in PROVIDERS})
    cold: dict = field(default_factory=lambda: {p: [] for p in PROVIDERS})  # CPU: after a stand-in model step
    launches: int = 0  # Triton launches stubbed in one fused call (CPU)


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op thread pool limited to one thread for the duration. No op at ~150 tokens gains from
    threads, and a GPU host's eager ops do not use them; on a loaded machine the pool's synchronization turns
    other processes' load into stalls of milliseconds that inflate the eager reference (hundreds of ops) far
    more than the fused call, which would flatter the ratio."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure(device: torch.device, methods, layouts, dtype: str, reps: int, out: Path) -> list:
    """The host measurement of each (method, layout) into `out/host.csv`; returns the rows.

    Each case in turn, `reps` rounds, the providers' order alternating per round so that the machine's drift
    and bursts of load fall on all alike. CPU (launches stubbed, torch on one thread, garbage collector
    paused), per round and provider: a batch of CPU_CALLS_PER_BATCH back-to-back calls, all but the first
    timed one by one with `perf_counter` (warm), then a stand-in model step and one timed call (cold). CUDA:
    per round and provider, the wall-clock per call of a batch of back-to-back calls, synchronized before and
    after.

    Rows (mode fwd_bwd), CPU: `host_us` of fused, eager and the autograd floor, `host_ratio` (p20, p50 and p80
    of fused, or the floor, over the same quantile of eager), the same of the cold condition as `host_us_cold`
    and `host_ratio_cold`, and `stubbed_launches` (per fused call); CUDA: `wall_us` and `wall_ratio`.
    """
    cuda = device.type == "cuda"
    sink = CsvSink(out / "host.csv", environment(device), dtype)
    timer = Timer(device)
    cases = []
    for shape in (CUDA_SHAPES if cuda else CPU_SHAPES):
        if shape.layout in layouts:
            inputs = make_inputs(shape, device, getattr(torch, dtype), seed=0, structure_seed=shape.tokens)
            cases += [_Case(shape, m, inputs, {p: make_call(p, m) for p in PROVIDERS}) for m in methods]
    if cuda:
        for case in cases:
            _alternating(case, reps, lambda call, inp: timer.wall_batch(lambda _: _run(call, inp),
                                                                        CUDA_CALLS_PER_BATCH))
        notes = {"": f"{reps} rounds of a batch of {CUDA_CALLS_PER_BATCH} back-to-back calls"}
        if cases:
            profile_fused(cases[0], out / "host_profile.txt")
    else:
        with stubbed_triton_launches() as stub, _one_thread():
            for case in cases:
                case.calls[FLOOR] = _floor_call
                case.times[FLOOR], case.cold[FLOOR] = [], []
                before = stub["launches"]  # one untimed call counts the launches skipped
                _run(case.calls["fused"], case.inputs)
                case.launches = stub["launches"] - before
                _warm_and_cold(case, reps)
        stubbed = "; fused with every Triton launch stubbed"
        notes = {"": f"{reps} rounds of {CPU_CALLS_PER_BATCH - 1} warm calls (after a call of their own)" + stubbed,
                 COLD: f"{reps} rounds of one cold call (after a stand-in model step)" + stubbed}
    metric, ratio = ("wall_us", "wall_ratio") if cuda else ("host_us", "host_ratio")
    for case in cases:
        key = (case.method, case.shape.layout, case.shape.name, case.shape.batch, case.shape.tokens, "fwd_bwd")
        if not cuda:
            sink.add("fused", *key, "stubbed_launches", (case.launches,) * 3,
                     note="Triton launches skipped per fused call")
        for suffix, note in notes.items():
            times = case.cold if suffix else case.times
            eager = quantiles(times["eager"])
            for provider in times:
                values = quantiles(times[provider])
                sink.add(provider, *key, metric + suffix, values, note=note)
                if provider != "eager":
                    sink.add(provider, *key, ratio + suffix, tuple(f / e for f, e in zip(values, eager)),
                             note=f"{provider} / eager, each quantile")
    sink.close()
    return sink.rows


def profile_fused(case: _Case, path: Path, calls: int = 200) -> None:
    """cProfile of `calls` back-to-back fused fwd+bwd calls of `case` (the Python path on this host: where the
    wall-clock per call goes), the top functions by own time and by cumulative time, into `path`."""
    import cProfile
    import io
    import pstats

    call = case.calls["fused"]
    for _ in range(WARMUP_CALLS):
        _run(call, case.inputs)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        _run(call, case.inputs)
    profiler.disable()
    text = io.StringIO()
    text.write(f"{calls} fused fwd+bwd calls, {case.method} {case.shape.layout} {case.shape.name}\n")
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(30)
    path.write_text(text.getvalue())


class _StandInModel:
    """What runs between two loss calls in training, in small: a 4-layer MLP's forward and backward (about
    40 ops), which leaves the caches to neither provider."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.layers = [torch.nn.Linear(128, 128) for _ in range(4)]
        self.x = torch.randn(32, 128, generator=g)

    def step(self) -> None:
        h = self.x
        for layer in self.layers:
            layer.zero_grad(set_to_none=True)
            h = torch.nn.functional.gelu(layer(h))
        h.square().mean().backward()


def _warm_and_cold(case: _Case, rounds: int) -> None:
    """CPU samples (us) into `case.times` (warm) and `case.cold`: per round and provider, CPU_CALLS_PER_BATCH
    back-to-back calls, all but the first timed, then a stand-in model step and one timed call."""
    model = _StandInModel()
    for provider, call in _interleaved(case, rounds):
        _run(call, case.inputs)  # follows the other provider: not kept
        case.times[provider] += [_timed_call(call, case.inputs) for _ in range(CPU_CALLS_PER_BATCH - 1)]
        model.step()
        case.cold[provider].append(_timed_call(call, case.inputs))


def _alternating(case: _Case, rounds: int, sample) -> None:
    """CUDA: `sample(call, inputs)` -> us of each provider in every round, into `case.times`."""
    for provider, call in _interleaved(case, rounds):
        case.times[provider].append(sample(call, case.inputs))


def _interleaved(case: _Case, rounds: int):
    """`(provider, call)` of every provider in each of `rounds` rounds, which goes first alternating, after
    WARMUP_CALLS untimed calls each; the garbage collector paused meanwhile, so that no call pays for another's
    garbage. One case at a time, as a training loop repeats one shape."""
    for call in case.calls.values():
        for _ in range(WARMUP_CALLS):
            _run(call, case.inputs)
    gc.collect()
    gc.disable()
    try:
        for i in range(rounds):
            for provider in case.calls if i % 2 == 0 else reversed(case.calls):
                yield provider, case.calls[provider]
    finally:
        gc.enable()


def _run(call, inp) -> None:
    inp.log_prob.grad = None
    step(call, inp, "fwd_bwd")


def _timed_call(call, inp) -> float:
    inp.log_prob.grad = None
    t0 = time.perf_counter()
    step(call, inp, "fwd_bwd")
    return (time.perf_counter() - t0) * 1e6


def table(rows) -> list:
    """Markdown lines: per (method, layout) of the ratio rows in `rows`, each provider's p50 and the ratio,
    PASS/MISS against the target."""
    by_key = {(r["provider"], r["method"], r["layout"], r["shape"], r["metric"]): r for r in rows if r["p50"]}
    ratios = [r for r in rows if r["metric"] in RATIO_METRICS and r["provider"] == "fused"]
    cpu = any(r["metric"] == "host_ratio" for r in ratios)
    metric = "host_us" if cpu else "wall_us"
    header = ("method", "layout", "shape", f"fused {metric} p50", f"eager {metric} p50", "fused / eager", "target",
              "status") + (("stubbed launches per call", f"autograd floor {metric} p50",
                            "cold: fused / eager host_us p50", "cold: fused / eager") if cpu else ())
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
            floor = by_key.get((FLOOR, *key, metric))
            cells.append(f"{float(floor['p50']):.1f} us" if floor else "")
            cold = [by_key.get((p, *key, m + COLD)) for p, m in (("fused", metric), ("eager", metric),
                                                                  ("fused", "host_ratio"))]
            if all(cold):
                cells += [f"{float(cold[0]['p50']):.1f} / {float(cold[1]['p50']):.1f} us",
                          f"{float(cold[2]['p50']):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run(args, device: torch.device, out: Path) -> int:
    """`ptr-kernels bench --host`: measure, print the table, write host.csv and host.md under `out`."""
    cuda = device.type == "cuda"
    reps = args.max_reps or (30 if cuda else 300)
    rows = measure(device, args.methods, args.layouts, args.dtype, reps, out)
    env = rows[0]
    if cuda:
        what = ("Wall-clock per fwd+bwd call of back-to-back calls (synchronized after each batch of "
                f"{CUDA_CALLS_PER_BATCH}), fused and eager batches alternating; nothing stubbed.")
    else:
        what = ("Host time of one fwd+bwd call: the fused path with every Triton launch stubbed out, against the "
                "eager reference on the same inputs, in one run; ratio of the medians. Warm (the target's): each "
                f"call right after a call of its own provider ({CPU_CALLS_PER_BATCH - 1} timed per batch, batches "
                "alternating). Cold: each call right after a stand-in model step (a 4-layer MLP's forward and "
                "backward).")
    lines = [f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
             f"inputs {env['dtype']}.", "", what, ""] + table(rows)
    (out / "host.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))
    print(f"wrote {out / 'host.csv'} and {out / 'host.md'}")
    return 0
