"""Timing: per-call times (CUDA events with an L2 flush, or `perf_counter` on CPU), CUDA-graph replays,
back-to-back wall-clock, the device's copy bandwidth and the peak memory of one call."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

FLUSH_BYTES = 256 * 2**20  # larger than any L2 (H100 50 MB, H200 60 MB)
COPY_BYTES = 2**30


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
        return [self.wall_batch(lambda i, b=b: fn(b * calls + i), calls) for b in range(batches)]

    def wall_batch(self, fn: Callable[[int], object], calls: int) -> float:
        """Host time per call (us) of one batch of `calls` back-to-back calls `fn(0..calls-1)`, synchronized
        before and after."""
        self.sync()
        t0 = time.perf_counter()
        for i in range(calls):
            fn(i)
        self.sync()
        return (time.perf_counter() - t0) / calls * 1e6


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


def quantiles(values: list) -> tuple:
    """(p20, p50, p80) with linear interpolation; a single value is all three."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return q[1], statistics.median(values), q[7]
