"""The sweep: every (provider, method, shape) config of a sweep timed in a planned order within a time budget,
written row by row to `<out>/results.csv`, then the launch counts in one profiler session (CUDA).

What is measured, per (provider, method, layout, shape, mode), mode "fwd" (the forward with log_prob requiring
grad, as in training) or "fwd_bwd" (forward + `loss.backward()`): see docs/benchmarks.md, "How it is measured"
(time_us, graph_us, wall_us, peak_mem_mib, launches, host_syncs, bandwidth_gbs, copy_fraction, compile_s,
grad_err, loss_err).
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .profiling import count_marked, mark_calls
from .providers import make_call, relative_error, step, supports
from .results import CPU_NOTE, CsvSink, environment
from .timing import COPY_BYTES, Timer, copy_bandwidth, peak_memory_mib, quantiles
from .workloads import LONG_SEQUENCES, METHODS, MODES, SWEEPS, Shape, make_inputs

WALL_MAX_S = 0.02  # wall_us only for calls below this: above it the host is not the bottleneck
PROFILE_MAX_S = 0.2  # profiling a call with more launches than this allows costs more than it tells
MEMORY_MAX_S = 1.0  # peak memory only for calls below this (it costs one more call per mode)
# The time budget: the last 15 s are kept for reading the profile and writing the report, 30 s before that
# for the launch counts; a compile starts only with 60 s more left.
END_RESERVE_S = 15.0
COUNT_RESERVE_S = 30.0
COMPILE_RESERVE_S = 60.0


def cuda_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return True
    except RuntimeError:
        return False


@dataclass
class SweepSettings:
    device: torch.device
    dtype: torch.dtype
    target_s: float  # timing time per (config, mode)
    max_reps: int
    min_reps: int
    deadline: float  # time.monotonic() after which no new config starts


class Runner:
    """One (provider, method, shape): its input sets on the device and `run(i, mode)` for call i.

    Calls rotate over enough input sets to hold at least twice the L2 cache (2 to 8 sets); every set has the
    same structure (mask, cu_seqlens), so a compiled graph serves them all.
    """

    def __init__(self, settings: SweepSettings, provider: str, method: str, shape: Shape):
        device = settings.device
        self.key = (provider, method, shape.layout, shape.name, shape.batch, shape.tokens)
        first = make_inputs(shape, device, settings.dtype, seed=0, structure_seed=shape.tokens)
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 60 * 2**20) \
            if device.type == "cuda" else 0
        n_sets = min(8, max(2, math.ceil(2 * l2 / first.min_bytes("fwd"))))
        self.sets = [first] + [make_inputs(shape, device, settings.dtype, seed=i, structure_seed=shape.tokens)
                               for i in range(1, n_sets)]
        self.call = make_call(provider, method)

    def run(self, i: int, mode: str) -> torch.Tensor:
        inp = self.sets[i % len(self.sets)]
        inp.log_prob.grad = None
        return step(self.call, inp, mode)

    def warm_up(self, timer: Timer) -> tuple:
        """Two fwd_bwd calls on set 0: (first call s, estimate s per call). The first call compiles (compile
        provider, Triton JIT), so the second gives the estimate; a provider that compiles nothing makes one
        call only if it takes over 2 s (the loop at thousands of sequences). The gradient of set 0 is kept."""
        t0 = time.perf_counter()
        self.loss = self.run(0, "fwd_bwd")
        timer.sync()
        first = est = time.perf_counter() - t0
        if first < 2.0 or self.key[0] in ("compile", "fused"):
            t0 = time.perf_counter()
            self.loss = self.run(0, "fwd_bwd")
            timer.sync()
            est = time.perf_counter() - t0
        return first, est


def bench_config(sink: CsvSink, settings: SweepSettings, provider: str, method: str, shape: Shape,
                 timer: Timer, copy_gbs: Optional[float]) -> tuple:
    """Every timing metric of one (provider, method, shape), both modes, written to `sink`; returns the
    estimated seconds per fwd_bwd call and the Runner."""
    device, cuda = settings.device, settings.device.type == "cuda"
    runner = Runner(settings, provider, method, shape)
    key, sets = runner.key, runner.sets
    first_s, est = runner.warm_up(timer)
    if provider == "compile":
        sink.add(*key, "fwd_bwd", "compile_s", (first_s,) * 3, note="first call, compile included")

    if provider != "eager":  # agreement with the reference on input set 0 (the warm-up's loss and gradient)
        grad = sets[0].log_prob.grad.clone()
        sets[0].log_prob.grad = None
        ref_loss = step(make_call("eager", method), sets[0], "fwd_bwd")
        sink.add(*key, "fwd_bwd", "grad_err", (relative_error(grad, sets[0].log_prob.grad),) * 3)
        if provider != "verl" or method == "ppo":
            sink.add(*key, "fwd_bwd", "loss_err", (relative_error(runner.loss, ref_loss),) * 3)
        del grad, ref_loss
    del runner.loss

    for mode in MODES:
        reps = max(settings.min_reps, min(settings.max_reps, int(settings.target_s / max(est, 1e-6))))
        times = timer.times(lambda i: runner.run(i, mode), reps)
        note = f"{reps} calls, {len(sets)} input sets" + (", L2 flushed" if cuda else "")
        t20, t50, t80 = quantiles(times)
        sink.add(*key, mode, "time_us", (t20, t50, t80), note=note)
        nbytes = sets[0].min_bytes(mode)
        # bandwidth quantiles: the fastest time gives the highest bandwidth
        gbs = tuple(nbytes / (t * 1e-6) / 1e9 for t in (t80, t50, t20))
        sink.add(*key, mode, "bandwidth_gbs", gbs, note=f"{nbytes} minimal bytes")
        if copy_gbs:
            sink.add(*key, mode, "copy_fraction", tuple(g / copy_gbs for g in gbs))
        if not cuda:
            continue
        if graphable(provider, shape):
            try:
                graph = quantiles(timer.graph_times(lambda: runner.run(0, mode), reps))
            except Exception as e:  # noqa: BLE001 - a provider that cannot be captured keeps its event timings
                sink.add(*key, mode, "skipped", note=f"graph_us: capture failed: {type(e).__name__}: "
                                                     f"{str(e).splitlines()[0][:150] if str(e) else ''}")
            else:
                sink.add(*key, mode, "graph_us", graph, note=f"CUDA graph of one call, {reps} replays, L2 flushed")
                gbs = tuple(nbytes / (t * 1e-6) / 1e9 for t in reversed(graph))
                sink.add(*key, mode, "graph_bandwidth_gbs", gbs, note=f"{nbytes} minimal bytes")
                if copy_gbs:
                    sink.add(*key, mode, "graph_copy_fraction", tuple(g / copy_gbs for g in gbs))
        if est < WALL_MAX_S:
            calls = max(3, min(200, int(0.02 / max(est, 1e-6))))
            sink.add(*key, mode, "wall_us", quantiles(timer.wall(lambda i: runner.run(i, mode), calls)),
                     note=f"5 batches of {calls} back-to-back calls")
        if est < MEMORY_MAX_S:
            for inp in sets:  # so that what is allocated before the call is the inputs (and nothing of the loss)
                inp.log_prob.grad = None
            sink.add(*key, mode, "peak_mem_mib", (peak_memory_mib(lambda: runner.run(0, mode), device),) * 3)
    return est, runner


def graphable(provider: str, shape: Shape) -> bool:
    """Providers timed also as a CUDA-graph replay: those without host syncs (the reference scatters packed
    input into rows of the longest sequence's width, a host sync; the loop syncs per sequence)."""
    return provider == "fused" or (provider in ("eager", "compile", "verl") and shape.layout == "padded")


def _warm_runner(settings: SweepSettings, provider: str, method: str, shape: Shape, timer: Timer) -> Runner:
    runner = Runner(settings, provider, method, shape)
    runner.warm_up(timer)
    del runner.loss
    return runner


def _priority(provider: str, method: str, shape: Shape) -> tuple:
    """Run order: the compile provider first (its first-priority shape, then the others: the comparison that
    a target asks for, a few seconds of compile each on a GPU), the cheap eager baseline, the loop at the
    4,096-sequence target, the fused kernel (the long-sequence shape first, then by size), the other baselines.
    So a timeout or a crash of the fused kernel (a lost CUDA context ends the run) loses the least."""
    if provider == "compile":
        return (0, shape.compile_priority, METHODS.index(method))
    if provider == "eager":
        return (1,)
    if provider == "loop" and shape.batch == 4096:
        return (2,)
    if provider == "fused":
        return (3, shape != LONG_SEQUENCES, shape.tokens)  # largest last: the likeliest to fail
    return (4 if provider == "verl" else 5,)


def plan(providers, methods, layouts, shapes) -> list:
    """The (provider, method, shape) jobs of a sweep, in run order."""
    jobs = []
    for provider in providers:
        for shape in shapes:
            if shape.layout not in layouts:
                continue
            if provider == "compile" and shape.compile_priority is None:
                continue
            if provider == "loop" and not shape.loop:
                continue
            jobs += [(provider, m, shape) for m in methods if supports(provider, m, shape.layout)]
    return sorted(jobs, key=lambda job: _priority(*job))  # stable: shapes stay in sweep order


def sweep(args, device: torch.device, out: Path, deadline: float = math.inf) -> list:
    """Run the sweep into `out/results.csv`; returns the rows. No config starts after `deadline`
    (`time.monotonic()`), no timing config in the last COUNT_RESERVE_S before it (kept for launch counts)."""
    from tqdm import tqdm

    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    shapes = [s for s in SWEEPS[args.sweep] if not getattr(args, "shapes", None) or s.name in args.shapes]
    providers = args.providers
    if "fused" in providers and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("skipping provider 'fused': on CPU the Triton kernel runs only in the Triton interpreter, and triton "
              "was imported without TRITON_INTERPRET=1 (set it in the environment)")
        providers = [p for p in providers if p != "fused"]
    if "fused" in providers and cuda and os.environ.get("TRITON_INTERPRET") == "1":
        print("WARNING: TRITON_INTERPRET=1 is set: the fused provider runs in the Triton interpreter, "
              "its timings are not the kernel's (unset it before running the sweep)")
    env = environment(device)
    sink = CsvSink(out / "results.csv", env, args.dtype)
    start = time.monotonic()
    settings = SweepSettings(device=device, dtype=dtype, target_s=0.25 if cuda else 0.05,
                             max_reps=args.max_reps or (100 if cuda else 10), min_reps=3, deadline=deadline)
    print(f"device: {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    if not cuda:
        print(CPU_NOTE)
    timer = Timer(device)
    copy_gbs = None  # the bandwidth targets' yardstick: a GPU's, a CPU run has no kernel timings to hold to it
    if cuda:
        bw = copy_bandwidth(timer, device, nbytes=COPY_BYTES)
        copy_gbs = statistics.median(bw)
        sink.add("copy", "-", "-", "1GiB", "", "", "-", "bandwidth_gbs", quantiles(bw),
                 note="device-to-device copy, read + write bytes")
        print(f"copy bandwidth: {copy_gbs:.0f} GB/s")

    jobs = plan(providers, args.methods, args.layouts, shapes)
    smallest_run = {}  # (provider, method, layout) -> (shape, s per call, runner) of its smallest timed config
    lost = None  # why the CUDA context became unusable

    def attempt(phase, provider, method, shape, work, reserve=0.0):
        """Run `work()` for one config unless less than `reserve` s of the budget is left or CUDA is lost;
        record errors and go on."""
        nonlocal lost
        key = (provider, method, shape.layout, shape.name, shape.batch, shape.tokens, "-")
        left = settings.deadline - time.monotonic()
        if lost is not None:
            sink.add(*key, "skipped", note=f"{phase}: CUDA context lost earlier ({lost})")
            return None
        if left <= reserve or (phase == "timing" and provider == "compile" and left < reserve + COMPILE_RESERVE_S):
            sink.add(*key, "skipped", note=f"{phase}: time budget of {args.time_budget} s spent")
            return None
        try:
            return work()
        except Exception as e:  # noqa: BLE001 - one failing provider must not stop the sweep
            failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            tqdm.write(f"{phase} {provider} {method} {shape.name}: {failed}")
            sink.add(*key, "error", note=f"{phase}: {failed}")
        gc.collect()  # free what the failed config held, now that its traceback is gone
        if cuda:
            torch.cuda.empty_cache()
            if not cuda_alive(device):
                lost = failed
        return None

    for provider, method, shape in tqdm(jobs, desc="timing", unit="config", file=sys.stdout, mininterval=1.0):
        done = attempt("timing", provider, method, shape, reserve=COUNT_RESERVE_S if cuda else 0.0,
                       work=lambda: bench_config(sink, settings, provider, method, shape, timer, copy_gbs))
        if done is None:
            continue
        est, runner = done
        smallest = smallest_run.get((provider, method, shape.layout))
        if smallest is None or shape.tokens < smallest[0].tokens:
            # the compile provider's runner is kept, so that its launches are counted without compiling again
            smallest_run[(provider, method, shape.layout)] = (shape, est, runner if provider == "compile" else None)
        del done, runner

    if cuda:
        # Launch counts come last and in one profiler session: a session can leave CUPTI hooked in and slow
        # later launches (a known torch.profiler behaviour). Counts do not depend on the shape except the loop's (per sequence),
        # so one shape each: the smallest that ran.
        from torch.profiler import ProfilerActivity, profile

        marks = {}
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for (provider, method, _), (shape, est, runner) in tqdm(smallest_run.items(), desc="launches",
                                                                         unit="config", file=sys.stdout):
                    if est < PROFILE_MAX_S:
                        attempt("launches", provider, method, shape, work=lambda: mark_calls(
                            runner or _warm_runner(settings, provider, method, shape, timer), timer, marks))
            counts = count_marked(prof.events()) if marks else {}
        except Exception as e:  # noqa: BLE001 - the profiler itself failed: keep the timings
            print(f"launch counting failed: {type(e).__name__}: {e}")
            sink.add("profiler", "-", "-", "-", "", "", "-", "error", note=f"launches: {type(e).__name__}: {e}")
            counts = {}
        for label, (launches, syncs) in counts.items():
            key, mode = marks[label]
            if not launches:  # every loss launches GPU work: the profiler missed it
                sink.add(*key, mode, "skipped", note="launches: the profiler recorded no GPU activity")
                continue
            note = "grows with the number of sequences" if key[0] == "loop" else ""
            sink.add(*key, mode, "launches", (launches,) * 3, note=note)
            sink.add(*key, mode, "host_syncs", (syncs,) * 3)
    smallest_run.clear()
    sink.close()
    print(f"sweep took {time.monotonic() - start:.0f} s; rows in {sink.path}")
    return sink.rows
