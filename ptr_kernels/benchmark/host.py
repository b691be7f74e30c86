"""`ptr-kernels bench --host`: the host time of one fused fwd+bwd call against the eager reference's.

On CPU (the Triton interpreter) every Triton launch is stubbed out for the duration, so what remains of a
fused call is its host work: Python, validation, torch's dispatch and autograd, the launchers' argument
handling. The outputs are `torch.empty`, so skipping the kernels is safe (the values are garbage, never read).
That host time is compared with the eager reference's fwd+bwd on the same inputs (about 200 small ops, all
host work at this size): the two alternate call by call in one run, so the machine's drift and bursts of
load hit both alike, and the ratio of the medians is the figure of merit (issue 7: at most 0.15 at a tiny
shape, padded and packed).

On CUDA nothing is stubbed: the figure is the wall-clock per call of back-to-back fwd+bwd calls, synchronized
after each batch, fused and eager batches alternating (issue 13: at most 100 us at 8x512, below eager).
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
RATIO_METRICS = ("host_ratio", "wall_ratio")  # CPU, CUDA
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

    Each case in turn: `reps` rounds of one sample of fused and one of eager (which goes first alternates), so
    the machine's drift and bursts of load fall on both providers alike. A sample is one call timed with
    `perf_counter` (CPU: launches stubbed, torch on one thread, garbage collector paused), or the wall-clock
    per call of a batch of back-to-back calls synchronized before and after (CUDA).

    Rows (mode fwd_bwd), CPU: `host_us` of fused and eager, `host_ratio` (p20, p50 and p80 of fused over
    the same quantile of eager) and `stubbed_launches` (per fused call); CUDA: `wall_us` and `wall_ratio`.
    """
    cuda = device.type == "cuda"
    sink = CsvSink(out / "host.csv", environment(device), dtype)
    timer = Timer(device)
    cases = []
    for shape in (CUDA_SHAPES if cuda else CPU_SHAPES):
        if shape.layout in layouts:
            inputs = make_inputs(shape, device, getattr(torch, dtype), seed=0, structure_seed=shape.tokens)
            cases += [_Case(shape, m, inputs, {p: make_call(p, m) for p in PROVIDERS}) for m in methods]
    if not cuda:
        for case in cases:
            case.calls[FLOOR] = _floor_call
            case.times[FLOOR] = []
    if cuda:
        for case in cases:
            _alternating(case, reps, lambda call, inp: timer.wall_batch(lambda _: _run(call, inp),
                                                                        CUDA_CALLS_PER_BATCH))
        metric, note = "wall_us", f"{reps} rounds of a batch of {CUDA_CALLS_PER_BATCH} back-to-back calls"
    else:
        with stubbed_triton_launches() as stub, _one_thread():
            for case in cases:
                before = stub["launches"]  # one untimed call counts the launches skipped
                _run(case.calls["fused"], case.inputs)
                case.launches = stub["launches"] - before
                _alternating(case, reps, _timed_call)
        metric, note = "host_us", f"{reps} rounds of one call; fused with every Triton launch stubbed"
    for case in cases:
        key = (case.method, case.shape.layout, case.shape.name, case.shape.batch, case.shape.tokens, "fwd_bwd")
        if not cuda:
            sink.add("fused", *key, "stubbed_launches", (case.launches,) * 3,
                     note="Triton launches skipped per fused call")
        fused, eager = (quantiles(case.times[p]) for p in PROVIDERS)
        for provider, values in zip(PROVIDERS, (fused, eager)):
            sink.add(provider, *key, metric, values, note=note)
        sink.add("fused", *key, RATIO_METRICS[cuda], tuple(f / e for f, e in zip(fused, eager)),
                 note="fused / eager, each quantile")
        if FLOOR in case.times:
            floor = quantiles(case.times[FLOOR])
            sink.add(FLOOR, *key, metric, floor, note="a no-op autograd.Function: apply + backward, no work")
            sink.add(FLOOR, *key, "host_ratio", tuple(f / e for f, e in zip(floor, eager)),
                     note="autograd floor / eager, each quantile")
    sink.close()
    return sink.rows


def _run(call, inp) -> None:
    inp.log_prob.grad = None
    step(call, inp, "fwd_bwd")


def _timed_call(call, inp) -> float:
    inp.log_prob.grad = None
    t0 = time.perf_counter()
    step(call, inp, "fwd_bwd")
    return (time.perf_counter() - t0) * 1e6


def _alternating(case: _Case, rounds: int, sample) -> None:
    """`sample(call, inputs)` -> us of fused and eager alternately, `rounds` each (which goes first alternating),
    after WARMUP_CALLS untimed calls each, into `case.times`; the garbage collector paused so that no call pays
    for another's garbage. One case at a time, as a training loop repeats one shape: interleaving the cases
    made the eager reference's packed cppo call about 4x slower on a CPU than alone (cause not pinned down),
    which flattered the ratio."""
    for call in case.calls.values():
        for _ in range(WARMUP_CALLS):
            _run(call, case.inputs)
    gc.collect()
    gc.disable()
    try:
        for i in range(rounds):
            for provider in case.calls if i % 2 == 0 else reversed(case.calls):
                case.times[provider].append(sample(case.calls[provider], case.inputs))
    finally:
        gc.enable()


def table(rows) -> list:
    """Markdown lines: per (method, layout) of the ratio rows in `rows`, each provider's p50 and the ratio,
    PASS/MISS against the target."""
    by_key = {(r["provider"], r["method"], r["layout"], r["shape"], r["metric"]): r for r in rows if r["p50"]}
    ratios = [r for r in rows if r["metric"] in RATIO_METRICS and r["provider"] == "fused"]
    cpu = any(r["metric"] == "host_ratio" for r in ratios)
    metric = "host_us" if cpu else "wall_us"
    header = ("method", "layout", "shape", f"fused {metric} p50", f"eager {metric} p50", "fused / eager", "target",
              "status") + (("stubbed launches per call", f"autograd floor {metric} p50") if cpu else ())
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
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run(args, device: torch.device, out: Path) -> int:
    """`ptr-kernels bench --host`: measure, print the table, write host.csv and host.md under `out`."""
    cuda = device.type == "cuda"
    reps = args.max_reps or (30 if cuda else 500)
    rows = measure(device, args.methods, args.layouts, args.dtype, reps, out)
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
