"""Benchmark harness: the fused kernel against eager PyTorch, torch.compile, the per-sequence loop and verl.

`ptr-kernels bench` (or `python -m ptr_kernels.benchmark`) sweeps shapes, methods and layouts for these
providers, all computing the loss of SPEC sections 2-6 on the same inputs:

- fused:   `policy_loss(..., backend="triton")` (CUDA; on CPU only through TRITON_INTERPRET=1 and on request)
- eager:   `policy_loss_reference` on the same device
- compile: `torch.compile(policy_loss_reference, dynamic=False)`, one compile per shape, compile time excluded
- loop:    `baselines.cppo_per_sequence_loop` (one Python iteration per sequence, as the authors' code; cppo, padded)
- verl:    `baselines.verl_policy_loss_dppo_tv` / `verl_policy_loss_vanilla` (dppo / ppo, padded)

What is measured, per (provider, method, layout, shape, mode), mode "fwd" (the forward with log_prob requiring
grad, as in training) or "fwd_bwd" (forward + `loss.backward()`):

- time_us: on CUDA, per-call GPU time from CUDA events; the L2 cache is flushed (a 256 MiB memset) before every
  call and the calls rotate over several input sets; warm-up calls excluded; p20/p50/p80 over the calls. The
  flush queued before each call lets the host run ahead only by the flush's duration, so where the host needs
  longer to launch a call than the device to run it, this is the host's time (see graph_us). On CPU: wall-clock `time.perf_counter` per call, which says nothing about kernels.
- graph_us (CUDA; the fused kernel, and eager / compile / verl on padded input, which have no host sync): one
  call captured in a CUDA graph and replayed, the L2 flushed before each replay: the device time of the kernels
  alone, without the host's Python and launch overhead. time_us includes that overhead whenever the host is
  slower than the device (a small loss on a slow host), so the targets use graph_us where both sides have it.
  graph_bandwidth_gbs / graph_copy_fraction: the bandwidth figures over graph_us.
- wall_us (CUDA, calls under 20 ms): host wall-clock per call of back-to-back calls without flush, synchronized
  at the end: what a training loop pays when the host (Python, launches, syncs) is the bottleneck.
- peak_mem_mib (CUDA): `max_memory_allocated` during one call minus the memory held before it (inputs included).
- launches, host_syncs (CUDA): GPU activities (kernels, memcpy, memset) and `cudaStreamSynchronize` calls in one
  call, from `torch.profiler`, in one session after all timings, at the smallest shape of each (provider,
  method, layout) (the counts do not depend on the shape, except the loop's, which grow with the sequences).
- bandwidth_gbs and copy_fraction: the minimal bytes of the call (each input read once: log_prob, old_log_prob,
  advantages, mask and cu_seqlens; for fwd_bwd also the gradient written once) over time_us, and that over the
  device-to-device copy bandwidth measured at the start of the run (read + write bytes of a 1 GiB copy).
- compile_s (compile provider): the first call, including compilation; grad_err / loss_err: relative error of
  the gradient / loss against the eager reference on the same inputs (verl's dppo loss is the "logp" surrogate,
  whose value differs by design, so only its gradient is compared).

Results go to `<out>/results.csv` row by row (a timeout leaves the rows so far), then PNG plots, `results.md`
(tables for docs/benchmarks.md) and the issue's targets as PASS/MISS. `--report CSV` redoes the plots and tables
from an existing CSV.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .testing.baselines import cppo_per_sequence_loop, verl_policy_loss_dppo_tv, verl_policy_loss_vanilla
from .config import PolicyLossConfig
from .reference import policy_loss_reference

PROVIDERS = ("fused", "eager", "compile", "loop", "verl")
COLORS = dict(zip(PROVIDERS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))  # plots
METHODS = ("cppo", "dppo", "ppo")
LAYOUTS = ("padded", "packed")
MODES = ("fwd", "fwd_bwd")
CSV_FIELDS = ("provider", "method", "layout", "shape", "batch", "tokens", "mode", "metric", "p20", "p50", "p80",
              "note", "dtype", "device", "torch", "triton", "commit")
FLUSH_BYTES = 256 * 2**20  # larger than any L2 (H100 50 MB, H200 60 MB)
COPY_BYTES = 2**30
WALL_MAX_S = 0.02  # wall_us only for calls below this: above it the host is not the bottleneck
PROFILE_MAX_S = 0.2  # profiling a call with more launches than this allows costs more than it tells
MEMORY_MAX_S = 1.0  # peak memory only for calls below this (it costs one more call per mode)
# The time budget: the last 15 s are kept for reading the profile and writing the report, 30 s before that
# for the launch counts; a compile starts only with 60 s more left.
END_RESERVE_S = 15.0
COUNT_RESERVE_S = 30.0
COMPILE_RESERVE_S = 60.0
CPU_NOTE = "CPU run: wall-clock times of PyTorch on this CPU; kernel timings need a GPU."


@dataclass(frozen=True)
class Shape:
    """One batch geometry. padded: `batch` rows of `tokens // batch` positions; packed: `batch` sequences,
    `tokens` in all.

    `compile_priority` (lower first, None: not compiled) and `loop` mark the shapes where the expensive
    providers run, so the full sweep fits its time budget.
    """

    layout: str
    batch: int
    tokens: int
    compile_priority: Optional[int] = None
    loop: bool = False

    @property
    def name(self) -> str:
        if self.layout == "padded":
            return f"{self.batch}x{self.tokens // self.batch}"
        return f"{self.batch}seq/{self.tokens}tok"


def _padded(b, t, **kw):
    return Shape("padded", b, b * t, **kw)


def _packed(s, n, **kw):
    return Shape("packed", s, n, **kw)


SWEEPS = {
    "tiny": (_padded(4, 64, compile_priority=0, loop=True), _padded(8, 256, loop=True),
             _packed(4, 256, compile_priority=1), _packed(16, 2048)),
    "full": (
        _padded(8, 512, loop=True), _padded(32, 1024, loop=True), _padded(64, 2048, loop=True),
        _padded(256, 4096, compile_priority=1, loop=True),  # 1M tokens: target 1
        _padded(512, 8192, compile_priority=0, loop=True),  # target 2
        _padded(4096, 1024, loop=True),  # 4,096 sequences: target 3
        _padded(1024, 8192), _padded(2048, 8192), _padded(4096, 8192),  # >= 16M tokens: target 4
        _packed(8, 4096), _packed(64, 65536), _packed(1024, 2**20, compile_priority=2),
        _packed(4096, 2**22), _packed(2048, 2**24),
    ),
}


@dataclass
class Inputs:
    """One input set on the device; `mask_float` is the float 0/1 mask verl's losses take."""

    log_prob: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    mask_float: torch.Tensor
    cu_seqlens: Optional[torch.Tensor]

    def min_bytes(self, mode: str) -> int:
        """Each input read once, plus for fwd_bwd the gradient written once."""
        tensors = (self.log_prob, self.old_log_prob, self.advantages, self.mask, self.cu_seqlens)
        n = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        if mode == "fwd_bwd":
            n += self.log_prob.numel() * self.log_prob.element_size()
        return n


def packed_lengths(shape: Shape, seed: int) -> torch.Tensor:
    """`batch` random lengths (0.25x to 1.75x the mean) summing to `tokens` exactly."""
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(shape.batch, dtype=torch.float64).uniform_(0.25, 1.75, generator=g)
    ends = (w.cumsum(0) / w.sum() * shape.tokens).round().long()
    ends[-1] = shape.tokens
    lengths = torch.diff(ends, prepend=ends.new_zeros(1))
    if bool((lengths < 1).any()):
        raise ValueError(f"cannot split {shape.tokens} tokens into {shape.batch} sequences of at least 1")
    return lengths


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int, structure_seed: int) -> Inputs:
    """Inputs like an RL batch: token log-probs near 0, log_prob = old_log_prob + small drift, one advantage
    per sequence broadcast to its tokens (`[B, T]` / `[N]`, as verl stores it), response masks with padding
    (padded) or tool-token holes (packed). The structure (lengths, mask) depends on `structure_seed` only,
    so every input set of a shape has the same `cu_seqlens` (the compile provider specializes on it)."""
    gs = torch.Generator().manual_seed(structure_seed)
    if shape.layout == "padded":
        B, T = shape.batch, shape.tokens // shape.batch
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gs)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        size, cu_seqlens = (B, T), None
    else:
        seq_len = packed_lengths(shape, structure_seed)
        mask = torch.rand(shape.tokens, generator=gs) > 0.03
        size = (shape.tokens,)
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), seq_len.cumsum(0)]).to(torch.int32)
    g = torch.Generator(device=device).manual_seed(seed)
    # mean token probability about 0.5 and a drift that the masks act on (cppo masks about 3.5% of the tokens,
    # dppo and ppo about 1%), as a few updates into a rollout batch
    old = -torch.empty(size, device=device).exponential_(1.0, generator=g).clamp(max=15.0)
    lp = (old + 0.1 * torch.randn(size, device=device, generator=g)).clamp(max=0.0)
    adv_seq = torch.randn(shape.batch, device=device, generator=g)
    if shape.layout == "padded":
        adv = adv_seq[:, None].expand(size).contiguous()
    else:
        adv = adv_seq.repeat_interleave(seq_len.to(device))
    mask = mask.to(device)
    return Inputs(log_prob=lp.to(dtype).requires_grad_(), old_log_prob=old.to(dtype), advantages=adv.to(dtype),
                  mask=mask, mask_float=mask.to(torch.float32),
                  cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device))


def method_config(method: str) -> PolicyLossConfig:
    """SPEC defaults: cppo with calibrated delta_b (P90, cap 2x), dppo Binary-TV, ppo clip-higher."""
    return PolicyLossConfig(method=method)


def supports(provider: str, method: str, layout: str) -> bool:
    if provider == "loop":
        return method == "cppo" and layout == "padded"
    if provider == "verl":
        return method in ("dppo", "ppo") and layout == "padded"
    return True


def make_call(provider: str, method: str) -> Callable[[Inputs], torch.Tensor]:
    """The provider's loss as a function of one input set (returns the 0-dim loss)."""
    cfg = method_config(method)
    if provider in ("eager", "compile", "fused"):
        def reference(inp: Inputs, fn=policy_loss_reference):
            return fn(inp.log_prob, inp.old_log_prob, inp.advantages, inp.mask, cu_seqlens=inp.cu_seqlens,
                      config=cfg)[0]
        if provider == "eager":
            return reference
        if provider == "compile":
            # one compile per (shape, method), all kept for the launch counts: more graphs of one function
            # than dynamo's default recompile limit (8), past which it would silently run eager
            config = torch._dynamo.config
            limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, limit, max(getattr(config, limit), 64))
            compiled = torch.compile(policy_loss_reference, dynamic=False)
            return lambda inp: reference(inp, compiled)
        from .api import policy_loss
        return lambda inp: policy_loss(inp.log_prob, inp.old_log_prob, inp.advantages, inp.mask,
                                       cu_seqlens=inp.cu_seqlens, config=cfg, backend="triton")[0]
    if provider == "loop":
        return lambda inp: cppo_per_sequence_loop(inp.log_prob, inp.old_log_prob, inp.advantages, inp.mask,
                                                  config=cfg)[0]
    if provider == "verl" and method == "dppo":
        return lambda inp: verl_policy_loss_dppo_tv(inp.old_log_prob, inp.log_prob, inp.advantages,
                                                    inp.mask_float, cfg.loss_agg_mode, clip_ratio=cfg.delta)[0]
    if provider == "verl" and method == "ppo":
        return lambda inp: verl_policy_loss_vanilla(inp.old_log_prob, inp.log_prob, inp.advantages,
                                                    inp.mask_float, cfg.loss_agg_mode,
                                                    clip_ratio_low=cfg.clip_ratio_low,
                                                    clip_ratio_high=cfg.clip_ratio_high)[0]
    raise ValueError(f"provider {provider!r} does not run method {method!r}")


def step(call: Callable[[Inputs], torch.Tensor], inp: Inputs, mode: str) -> torch.Tensor:
    """One call in `mode`: the forward ("fwd") or the forward and `loss.backward()` ("fwd_bwd")."""
    loss = call(inp)
    if mode == "fwd_bwd":
        loss.backward()
    return loss


# ---------------------------------------------------------------------------------------------------------------
# Timing and counting


class Timer:
    """Per-call times in microseconds: CUDA events with an L2 flush before each call, or `perf_counter` on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def times(self, fn: Callable[[int], object], reps: int) -> list:
        """`fn(i)` runs call i; returns `reps` per-call times (us)."""
        if not self.cuda:
            out = []
            for i in range(reps):
                t0 = time.perf_counter()
                fn(i)
                out.append((time.perf_counter() - t0) * 1e6)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        self.sync()
        for i, (start, end) in enumerate(events):
            self.flush.zero_()
            start.record()
            fn(i)
            end.record()
        self.sync()
        return [start.elapsed_time(end) * 1e3 for start, end in events]

    def graph_times(self, fn: Callable[[], object], reps: int) -> list:
        """Per-call device time (us) of `fn` captured once in a CUDA graph and replayed, the L2 flushed before
        each replay: the kernels' own time, without the host's Python and launch overhead."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # capture wants its warm-up on a side stream
            fn()
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        self.sync()
        for start, end in events:
            self.flush.zero_()
            start.record()
            graph.replay()
            end.record()
        self.sync()
        del graph
        return [start.elapsed_time(end) * 1e3 for start, end in events]

    def wall(self, fn: Callable[[int], object], calls: int, batches: int = 5) -> list:
        """Host time per call (us) of `calls` back-to-back calls, synchronized at the end; one value per batch."""
        out = []
        for b in range(batches):
            self.sync()
            t0 = time.perf_counter()
            for i in range(calls):
                fn(b * calls + i)
            self.sync()
            out.append((time.perf_counter() - t0) / calls * 1e6)
        return out


def copy_bandwidth(timer: Timer, device: torch.device, nbytes: int = COPY_BYTES, reps: int = 20) -> list:
    """Device-to-device copy bandwidth (GB/s, read + write bytes) of an `nbytes` tensor copy, per rep."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    times = timer.times(lambda i: dst.copy_(src), reps)
    return [2 * nbytes / (t * 1e-6) / 1e9 for t in times]


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak allocated memory (MiB) of one call above what was allocated before it (inputs included)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


_SYNC_CALLS = ("cudaStreamSynchronize", "cuStreamSynchronize")
_LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                 "cudaMemcpyAsync", "cudaMemsetAsync")
MARK = "ptr_kernels.benchmark.counted:"


def count_marked(events) -> dict:
    """{label: (GPU activities, host syncs)} for each `record_function(label)` range whose label starts
    with MARK, from a torch.profiler event list.

    GPU activities are the kernel, memcpy and memset events on the device timeline that start inside the range
    (a marked call ends with a device synchronize, so all its GPU work lies inside); if the profiler recorded
    none, the launch API calls on the host. Host syncs are the `cudaStreamSynchronize` calls in the range.
    """
    from torch.autograd import DeviceType

    ranges = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.name.startswith(MARK) and e.device_type == DeviceType.CPU)
    starts = [r[0] for r in ranges]
    device, api, syncs = ({r[2]: 0 for r in ranges} for _ in range(3))
    for e in events:
        if e.name.startswith(MARK):
            continue
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if i < 0 or e.time_range.start > ranges[i][1]:
            continue
        label = ranges[i][2]
        # GPU "user annotation" events mirror record_function ranges (Inductor's, autograd's): not launches
        device[label] += e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        api[label] += e.name in _LAUNCH_CALLS
        syncs[label] += e.name in _SYNC_CALLS
    return {label: (device[label] or api[label], syncs[label]) for label in device}


def quantiles(values: list) -> tuple:
    """(p20, p50, p80) with linear interpolation; a single value is all three."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return q[1], statistics.median(values), q[7]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (absolute when b is all zero), in float64."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    return err / scale if scale > 0 else err


# ---------------------------------------------------------------------------------------------------------------
# The sweep


def environment(device: torch.device) -> dict:
    """Device name, library versions and the git commit, stamped on every row."""
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit()}


def git_commit() -> str:
    """Short commit of the package's checkout (+"-dirty"), or $PTR_KERNELS_COMMIT, or "unknown"."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("PTR_KERNELS_COMMIT", "unknown")


class CsvSink:
    """Appends result rows to a CSV, flushed after each row so an interrupted run keeps its data."""

    def __init__(self, path: Path, env: dict, dtype: str):
        self.path = path
        self.common = dict(env, dtype=dtype)
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)
        self.writer.writeheader()
        self.rows = []

    def add(self, provider, method, layout, shape, batch, tokens, mode, metric, values=None, note=""):
        p20, p50, p80 = ("", "", "") if values is None else (f"{v:.6g}" for v in values)
        row = dict(self.common, provider=provider, method=method, layout=layout, shape=shape, batch=batch,
                   tokens=tokens, mode=mode, metric=metric, p20=p20, p50=p50, p80=p80, note=note)
        self.writer.writerow(row)
        self.file.flush()
        self.rows.append(row)

    def close(self):
        self.file.close()


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


def mark_calls(runner: Runner, timer: Timer, marks: dict) -> None:
    """Inside a running profiler session: one marked call per mode of a warmed-up runner, recorded in `marks`
    ({label: (row key, mode)}). An unmarked call precedes each, since a session can drop the first GPU
    events it sees (pytorch#192021)."""
    from torch.profiler import record_function

    for mode in MODES:
        runner.run(0, mode)
        timer.sync()
        label = f"{MARK}{len(marks)}"
        with record_function(label):
            runner.run(0, mode)
            timer.sync()
        marks[label] = (runner.key, mode)


def _warm_runner(settings: SweepSettings, provider: str, method: str, shape: Shape, timer: Timer) -> Runner:
    runner = Runner(settings, provider, method, shape)
    runner.warm_up(timer)
    del runner.loss
    return runner


def _priority(provider: str, method: str, shape: Shape) -> tuple:
    """Run order: the cheap eager baseline, the loop at the 4,096-sequence target, the fused kernel, the other
    baselines, the compile provider at its first-priority shape, then the other compiles. So a timeout (compiles
    are the slow part) or a crash of the fused kernel (a lost CUDA context ends the run) loses the least."""
    if provider == "eager":
        return (0,)
    if provider == "loop" and shape.batch == 4096:
        return (1,)
    if provider == "fused":
        return (2, shape.tokens)  # largest last: the likeliest to fail
    if provider == "compile":
        return (5 if shape.compile_priority == 0 else 6, shape.compile_priority, METHODS.index(method))
    return (3 if provider == "verl" else 4,)


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
    shapes = SWEEPS[args.sweep]
    providers = args.providers
    if "fused" in providers and not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("skipping provider 'fused': on CPU the Triton kernel runs only under TRITON_INTERPRET=1")
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
    bw = copy_bandwidth(timer, device, nbytes=COPY_BYTES if cuda else 64 * 2**20)
    copy_gbs = statistics.median(bw)
    sink.add("copy", "-", "-", "1GiB" if cuda else "64MiB", "", "", "-", "bandwidth_gbs", quantiles(bw),
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
        # later launches (pytorch#144455). Counts do not depend on the shape except the loop's (per sequence),
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


# ---------------------------------------------------------------------------------------------------------------
# Report: targets, markdown tables, plots (from the rows, so `--report CSV` works on any earlier run)


def load_rows(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _index(rows) -> dict:
    """{(provider, method, layout, shape, mode, metric): row} for rows with values."""
    return {(r["provider"], r["method"], r["layout"], r["shape"], r["mode"], r["metric"]): r
            for r in rows if r["p50"] != ""}


def _p50(index, provider, method, layout, shape, mode, metric="time_us") -> Optional[float]:
    row = index.get((provider, method, layout, shape, mode, metric))
    return float(row["p50"]) if row else None


def _shapes(rows, layout) -> list:
    """Shapes of a layout that have timings, by token count."""
    seen = {(int(r["tokens"]), int(r["batch"]), r["shape"]) for r in rows
            if r["layout"] == layout and r["metric"] == "time_us"}
    return [s for _, _, s in sorted(seen)]


def _device_p50(index, provider, method, layout, shape, mode) -> tuple:
    """(p50 us, metric): the CUDA-graph replay time where there is one (the kernels alone), else time_us."""
    graph = _p50(index, provider, method, layout, shape, mode, "graph_us")
    return (graph, "graph_us") if graph is not None else (_p50(index, provider, method, layout, shape, mode), "time_us")


def _ratio(index, slow, fast, method, layout, shape, mode="fwd_bwd") -> tuple:
    """(speedup of `fast` over `slow`, metric): graph_us when both have it, else time_us."""
    both = [_p50(index, p, method, layout, shape, mode, "graph_us") for p in (slow, fast)]
    metric = "graph_us" if None not in both else "time_us"
    a, b = (_p50(index, p, method, layout, shape, mode, metric) for p in (slow, fast))
    return (a / b if a and b else None), metric


def targets(rows) -> list:
    """The issue's four targets as (target, case, measured, required, status) from the measured rows; times are
    CUDA-graph replays (device time of the kernels alone) where measured, else per-call event times."""
    index = _index(rows)
    on_gpu = any(r["metric"] == "time_us" and not r["device"].startswith("cpu") for r in rows)
    out = []

    def add(target, case, value, required, ok, fmt):
        status = "no data" if value is None else ("PASS" if ok(value) else "MISS")
        if value is not None and not on_gpu:
            status = "n/a (CPU)"
        out.append((target, case, "-" if value is None else fmt.format(value), required, status))

    million = [(r["layout"], r["shape"]) for r in rows if r["metric"] == "time_us" and r["provider"] == "fused"
               and r["method"] == "cppo" and int(r["tokens"]) == 2**20 and r["mode"] == "fwd_bwd"]
    for layout, shape in sorted(set(million)) or [("padded", "256x4096")]:
        wall = _p50(index, "fused", "cppo", layout, shape, "fwd_bwd", "wall_us")
        host = "" if wall is None else f"; host wall-clock per call: {wall:.1f} us"
        value, metric = _device_p50(index, "fused", "cppo", layout, shape, "fwd_bwd")
        add("cppo fwd+bwd at 1M tokens", f"fused, {layout} {shape} ({metric}{host})",
            value, "<= 50 us", lambda v: v <= 50, "{:.1f} us")
    for other, need in (("eager", 20), ("compile", 3)):
        value, metric = _ratio(index, other, "fused", "cppo", "padded", "512x8192")
        add(f"speedup vs {other} at 512x8192", f"cppo fwd+bwd, padded ({metric})", value, f">= {need}x",
            lambda v, need=need: v >= need, "{:.1f}x")
    value, metric = _ratio(index, "loop", "fused", "cppo", "padded", "4096x1024")
    add("speedup vs loop at 4,096 sequences", f"cppo fwd+bwd, padded 4096x1024 ({metric})",
        value, ">= 1000x", lambda v: v >= 1000, "{:.0f}x")
    big = sorted({(r["method"], r["layout"], r["shape"]) for r in rows if r["provider"] == "fused"
                  and r["metric"] == "copy_fraction" and int(r["tokens"]) >= 16 * 10**6 and r["mode"] == "fwd_bwd"})
    for method, layout, shape in big or [("cppo", "padded", "2048x8192")]:
        graph = _p50(index, "fused", method, layout, shape, "fwd_bwd", "graph_copy_fraction")
        metric = "graph_us" if graph is not None else "time_us"
        add("copy bandwidth fraction at >= 16M tokens", f"{method} fwd+bwd, {layout} {shape} ({metric})",
            graph if graph is not None else _p50(index, "fused", method, layout, shape, "fwd_bwd", "copy_fraction"),
            ">= 70%", lambda v: v >= 0.7, "{:.0%}")
    return out


def _table(header, body) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in body]


def _fmt_time(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v / 1e3:.2f} ms" if v >= 1e4 else f"{v:.1f} us"


def markdown(rows) -> str:
    """Tables for docs/benchmarks.md: environment, copy bandwidth, targets, then per (layout, mode) the p50
    time of each provider with the fused kernel's host wall-clock, bandwidth and speedups (time ratios of
    p50s), and launches / peak memory."""
    if not rows:
        return "No results.\n"
    index = _index(rows)
    env = rows[0]
    on_cpu = env["device"].startswith("cpu")
    lines = [f"Device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, "
             f"inputs {env['dtype']}.", ""]
    if on_cpu:
        lines += [f"**{CPU_NOTE}**", ""]
    copy = [r for r in rows if r["provider"] == "copy" and r["p50"]]
    if copy:
        lines += [f"Device-to-device copy bandwidth ({copy[0]['shape']} copy, read + write): "
                  f"{float(copy[0]['p50']):.0f} GB/s.", ""]
    lines += ["### Targets", ""] + _table(("target", "case", "measured", "required", "status"), targets(rows))
    providers = [p for p in PROVIDERS if any(r["provider"] == p and r["metric"] == "time_us" for r in rows)]
    others = [p for p in providers if p != "fused"]
    tables = (("graph_us", "graph_copy_fraction", "device time of one call (CUDA graph replay, kernels alone)"),
              ("time_us", "copy_fraction", "time per call (CUDA events; host overhead included when host-bound)"))
    for metric, fraction, title in tables:
        for layout in LAYOUTS:
            for mode in MODES:
                body = []
                for method in METHODS:
                    for shape in _shapes(rows, layout):
                        times = {p: _p50(index, p, method, layout, shape, mode, metric) for p in providers}
                        if not any(times.values()):
                            continue
                        cells = [method, shape] + [_fmt_time(times[p]) for p in providers]
                        if "fused" in providers:
                            wall = _p50(index, "fused", method, layout, shape, mode, "wall_us")
                            frac = _p50(index, "fused", method, layout, shape, mode, fraction)
                            cells += [_fmt_time(wall), "-" if frac is None else f"{frac:.0%}"]
                            cells += ["-" if not (times["fused"] and times[p]) else
                                      f"{times[p] / times['fused']:.3g}x" for p in others]
                        body.append(cells)
                if body:
                    header = ["method", "shape"] + [f"{p} p50" for p in providers]
                    if "fused" in providers:
                        header += ["fused host wall", "fused % of copy"] + [f"fused vs {p}" for p in others]
                    lines += ["", f"### {layout}, {'forward' if mode == 'fwd' else 'forward + backward'}: {title}",
                              ""]
                    lines += _table(header, body)
    counts = []
    for r in rows:
        if r["metric"] == "launches" and r["mode"] == "fwd_bwd":
            fwd = _p50(index, r["provider"], r["method"], r["layout"], r["shape"], "fwd", "launches")
            syncs = _p50(index, r["provider"], r["method"], r["layout"], r["shape"], "fwd_bwd", "host_syncs")
            mem = _p50(index, r["provider"], r["method"], r["layout"], r["shape"], "fwd_bwd", "peak_mem_mib")
            counts.append((r["provider"], r["method"], r["layout"], r["shape"], "-" if fwd is None else int(fwd),
                           int(float(r["p50"])), "-" if syncs is None else int(syncs),
                           "-" if mem is None else f"{mem:.0f}"))
    if counts:
        lines += ["", "### Launches, host syncs and peak memory above the inputs (one call)", ""]
        lines += _table(("provider", "method", "layout", "shape", "launches fwd", "launches fwd+bwd",
                         "host syncs fwd+bwd", "peak MiB fwd+bwd"), counts)
    problems = [r for r in rows if r["metric"] in ("error", "skipped")]
    if problems:
        lines += ["", "### Not measured", ""]
        lines += _table(("provider", "method", "layout", "shape", "why"),
                        [(r["provider"], r["method"], r["layout"], r["shape"], r["note"]) for r in problems])
    return "\n".join(lines) + "\n"


def plots(rows, out: Path) -> list:
    """Per (method, mode): time vs tokens (log-log, one line per provider and timing, p20-p80 band, one panel per
    layout) and speedup bars of the fused kernel (or, without it, the eager reference) over each other provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = _index(rows)
    device = rows[0]["device"] if rows else ""
    written = []
    providers = [p for p in PROVIDERS if any(r["provider"] == p and r["metric"] == "time_us" for r in rows)]
    base = "fused" if "fused" in providers else "eager"
    for method in METHODS:
        for mode in MODES:
            layouts = [lay for lay in LAYOUTS if any(_p50(index, p, method, lay, s, mode) for p in providers
                                                      for s in _shapes(rows, lay))]
            if not layouts:
                continue
            fig, axes = plt.subplots(1, len(layouts), figsize=(6 * len(layouts), 4.5), squeeze=False)
            for ax, layout in zip(axes[0], layouts):
                # solid: per-call event time (host overhead included when host-bound); dashed: CUDA-graph replay
                for p, metric in [(p, m) for p in providers for m in ("time_us", "graph_us")]:
                    pts = []
                    for s in _shapes(rows, layout):
                        r = index.get((p, method, layout, s, mode, metric))
                        if r:
                            pts.append((int(r["tokens"]), float(r["p20"]), float(r["p50"]), float(r["p80"])))
                    if pts:
                        x, lo, mid, hi = zip(*pts)
                        graph = metric == "graph_us"
                        ax.plot(x, mid, marker="o", label=f"{p} (graph replay)" if graph else p, color=COLORS[p],
                                linestyle="--" if graph else "-", markerfacecolor="none" if graph else None)
                        ax.fill_between(x, lo, hi, alpha=0.2, color=COLORS[p])
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("tokens")
                ax.set_ylabel("time per call (us, p50; band p20-p80)")
                ax.set_title(f"{method} {mode} {layout}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend()
            fig.suptitle(device)
            fig.tight_layout()
            written.append(out / f"time_{method}_{mode}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)

            bars = []  # (label, {provider: speedup})
            for layout in layouts:
                for s in _shapes(rows, layout):
                    mine = _p50(index, base, method, layout, s, mode)
                    ups = {p: _p50(index, p, method, layout, s, mode) / mine for p in providers
                           if p != base and mine and _p50(index, p, method, layout, s, mode)}
                    if ups:
                        bars.append((f"{layout}\n{s}", ups))
            if not bars:
                continue
            others = [p for p in providers if any(p in ups for _, ups in bars)]
            fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(bars)), 4.5))
            width = 0.8 / len(others)
            for k, p in enumerate(others):
                xs = [i + k * width for i, (_, ups) in enumerate(bars) if p in ups]
                drawn = ax.bar(xs, [ups[p] for _, ups in bars if p in ups], width=width, label=f"vs {p}",
                               color=COLORS[p])
                ax.bar_label(drawn, fmt="%.3g", fontsize=6)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(bars))])
            ax.set_xticklabels([label for label, _ in bars], fontsize=7)
            ax.set_yscale("log")
            ax.axhline(1, color="black", linewidth=0.8)
            ax.set_ylabel(f"speedup of {base} (time ratio, p50)")
            ax.set_title(f"{base} vs others: {method} {mode} ({device})")
            ax.legend()
            fig.tight_layout()
            written.append(out / f"speedup_{method}_{mode}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written


def report(rows, out: Path, csv_path) -> None:
    """Write results.md and the plots next to the CSV; print the targets."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"Results from `{csv_path}`.\n\n" + markdown(rows))
    print("\n".join(_table(("target", "case", "measured", "required", "status"), targets(rows))))
    if rows and rows[0]["device"].startswith("cpu"):
        print(CPU_NOTE)
    pngs = plots(rows, out)
    print(f"wrote {out / 'results.md'} and {len(pngs)} plots to {out}")


# ---------------------------------------------------------------------------------------------------------------
# Command line


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
                        help="auto: cuda when available")
    parser.add_argument("--sweep", choices=tuple(SWEEPS), default=None,
                        help="shape set (default: full on cuda, tiny on cpu)")
    parser.add_argument("--full", action="store_const", const="full", dest="sweep", help="same as --sweep full")
    parser.add_argument("--providers", type=_list(PROVIDERS), default=None,
                        help="comma-separated (default: all on cuda; eager,loop,verl on cpu, where fused "
                             "needs TRITON_INTERPRET=1)")
    parser.add_argument("--methods", type=_list(METHODS), default=list(METHODS))
    parser.add_argument("--layouts", type=_list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of log_prob, old_log_prob and advantages")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $OUT if set, else bench/results; with --report: the CSV's)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole run: configs that would start too late are recorded as "
                             "skipped (the last 45 s are kept for launch counts and the report)")
    parser.add_argument("--max-reps", type=int, default=None, help="most timed calls per config and mode")
    parser.add_argument("--report", type=Path, default=None, metavar="CSV",
                        help="only write plots, results.md and targets from an existing results CSV")


def run(args: argparse.Namespace) -> int:
    """`ptr-kernels bench`: run the sweep (or `--report` an earlier one). Returns 0, or 1 if a config failed
    (its `error` row says why; the other results are written all the same)."""
    deadline = math.inf if args.time_budget is None else time.monotonic() + args.time_budget - END_RESERVE_S
    if args.report is not None:
        report(load_rows(args.report), args.out or args.report.parent, args.report)
        return 0
    out = args.out or Path(os.environ.get("OUT") or "bench/results")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    args.sweep = args.sweep or ("full" if device.type == "cuda" else "tiny")
    if args.providers is None:
        args.providers = list(PROVIDERS)
        if device.type == "cpu":
            print("CPU: providers eager, loop, verl; 'compile' (tens of seconds of compile per shape here) and "
                  "'fused' (Triton interpreter, TRITON_INTERPRET=1) run when named in --providers")
            args.providers = ["eager", "loop", "verl"]
    out.mkdir(parents=True, exist_ok=True)
    rows = sweep(args, device, out, deadline)
    report(rows, out, out / "results.csv")
    failed = [r for r in rows if r["metric"] == "error"]
    for r in failed:
        print(f"failed: {r['provider']} {r['method']} {r['layout']} {r['shape']}: {r['note']}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptr_kernels.benchmark", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
