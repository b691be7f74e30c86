"""The performance targets (docs/benchmarks.md) as PASS / MISS from the measured rows, or "not measured" (never
invented).

Times are CUDA-graph replays (the kernels' device time alone) where both sides of a comparison have one, else
per-call event times; the case says which. A GPU target met or missed by a CPU run's numbers says nothing
about the kernel: its status is "n/a (CPU)". The host-time target is measured on the CPU.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .host import TARGET_RATIO
from .traffic import traffic
from .workloads import LAYOUTS, LONG_BASELINE, LONG_SEQUENCES, METHODS

MILLION = 2**20
NOT_MEASURED = "not measured"


class Target(NamedTuple):
    target: str
    case: str
    measured: str
    required: str
    status: str  # PASS, MISS, "not measured" or "n/a (CPU)"


def index_rows(rows) -> dict:
    """{(provider, method, layout, shape, mode, metric): row} for rows with values (later rows win)."""
    return {(r["provider"], r["method"], r["layout"], r["shape"], r["mode"], r["metric"]): r
            for r in rows if r["p50"] != ""}


def p50(index, provider, method, layout, shape, mode, metric="time_us") -> Optional[float]:
    row = index.get((provider, method, layout, shape, mode, metric))
    return float(row["p50"]) if row else None


def shapes_of(rows, layout, provider=None) -> list:
    """(tokens, batch, name) of the shapes of a layout that have timings (of `provider`), by token count."""
    return sorted({(int(r["tokens"]), int(r["batch"]), r["shape"]) for r in rows
                   if r["layout"] == layout and r["metric"] == "time_us" and provider in (None, r["provider"])})


def device_p50(index, provider, method, layout, shape, mode="fwd_bwd") -> tuple:
    """(p50 us, metric): the CUDA-graph replay time where there is one (the kernels alone), else time_us."""
    graph = p50(index, provider, method, layout, shape, mode, "graph_us")
    return (graph, "graph_us") if graph is not None else (p50(index, provider, method, layout, shape, mode), "time_us")


def ratio(index, slow, fast, method, layout, shape, mode="fwd_bwd", slow_layout=None, slow_shape=None) -> tuple:
    """(time of `slow` / time of `fast`, metric): graph_us when both have it, else time_us."""
    keys = ((slow, slow_layout or layout, slow_shape or shape), (fast, layout, shape))
    both = [p50(index, p, method, lay, s, mode, "graph_us") for p, lay, s in keys]
    metric = "graph_us" if None not in both else "time_us"
    a, b = (p50(index, p, method, lay, s, mode, metric) for p, lay, s in keys)
    return (a / b if a and b else None), metric


class _Table:
    """Collects Target rows; `add` turns a measured value into its status."""

    def __init__(self, rows):
        self.on_gpu = any(r["metric"] == "time_us" and not r["device"].startswith("cpu") for r in rows)
        self.out = []

    def add(self, target, case, value, required, ok, fmt, gpu=True):
        status = NOT_MEASURED if value is None else ("PASS" if ok(value) else "MISS")
        if value is not None and gpu and not self.on_gpu:
            status = "n/a (CPU)"
        self.out.append(Target(target, case, "-" if value is None else fmt.format(value), required, status))


def _worst(pairs, lowest: bool = False) -> tuple:
    """(largest value, or with `lowest` smallest, and its label) of (value, label) pairs with a value, or
    (None, "") when none has one."""
    pairs = [p for p in pairs if p[0] is not None]
    return (min(pairs) if lowest else max(pairs)) if pairs else (None, "")


def _speed_targets(table, rows, index):
    million = [(r["layout"], r["shape"]) for r in rows if r["metric"] == "time_us" and r["provider"] == "fused"
               and r["method"] == "cppo" and int(r["tokens"]) == MILLION and r["mode"] == "fwd_bwd"]
    for layout, shape in sorted(set(million)) or [("padded", "256x4096")]:
        wall = p50(index, "fused", "cppo", layout, shape, "fwd_bwd", "wall_us")
        host = "" if wall is None else f"; host wall-clock per call: {wall:.1f} us"
        value, metric = device_p50(index, "fused", "cppo", layout, shape)
        table.add("cppo fwd+bwd at 1M tokens", f"fused, {layout} {shape} ({metric}{host})",
                  value, "<= 50 us", lambda v: v <= 50, "{:.1f} us")
    for other, need in (("eager", 20), ("compile", 3)):
        value, metric = ratio(index, other, "fused", "cppo", "padded", "512x8192")
        table.add(f"speedup vs {other} at 512x8192", f"cppo fwd+bwd, padded ({metric})", value, f">= {need}x",
                  lambda v, need=need: v >= need, "{:.1f}x")
    value, metric = ratio(index, "loop", "fused", "cppo", "padded", "4096x1024")
    table.add("speedup vs loop at 4,096 sequences", f"cppo fwd+bwd, padded 4096x1024 ({metric})",
              value, ">= 1000x", lambda v: v >= 1000, "{:.0f}x")
    big = sorted({(r["method"], r["layout"], r["shape"]) for r in rows if r["provider"] == "fused"
                  and r["metric"] == "copy_fraction" and int(r["tokens"]) >= 16 * 10**6 and r["mode"] == "fwd_bwd"})
    for method, layout, shape in big or [("cppo", "padded", "2048x8192")]:
        graph = p50(index, "fused", method, layout, shape, "fwd_bwd", "graph_copy_fraction")
        metric = "graph_us" if graph is not None else "time_us"
        value = graph if graph is not None else p50(index, "fused", method, layout, shape, "fwd_bwd", "copy_fraction")
        table.add("copy bandwidth fraction at >= 16M tokens", f"{method} fwd+bwd, {layout} {shape} ({metric})",
                  value, ">= 70%", lambda v: v >= 0.7, "{:.0%}")


def _host_targets(table, rows):
    host = [r for r in rows if r["metric"] == "host_ratio" and r["provider"] == "fused"]
    for r in host:
        table.add("host time of fwd+bwd, Triton launches stubbed: fused / eager (warm)",
                  f"{r['method']}, {r['layout']} {r['shape']} (`bench --host`, {r['device']})", float(r["p50"]),
                  f"<= {TARGET_RATIO}", lambda v: v <= TARGET_RATIO, "{:.3f}", gpu=False)
    if not host:
        table.add("host time of fwd+bwd, Triton launches stubbed: fused / eager (warm)",
                  "`ptr-kernels bench --host`", None, f"<= {TARGET_RATIO}", None, "", gpu=False)


def _shape_targets(table, rows, index):
    fused_shapes = {lay: shapes_of(rows, lay, "fused") for lay in LAYOUTS}
    for layout in LAYOUTS:  # cppo as cheap as dppo
        pairs = []
        for tokens, _, shape in fused_shapes[layout]:
            if tokens >= MILLION:
                a, ma = device_p50(index, "fused", "cppo", layout, shape)
                b, mb = device_p50(index, "fused", "dppo", layout, shape)
                pairs.append((a / b if a and b and ma == mb else None, f"{shape}, {ma}"))
        value, label = _worst(pairs)
        table.add("cppo / dppo at >= 1M tokens (worst shape)", f"fused fwd+bwd, {layout} {label}".rstrip(),
                  value, "<= 1.2x", lambda v: v <= 1.2, "{:.2f}x")
    for method in METHODS:  # packed as fast as padded at the same tokens
        pairs = []
        for tokens, batch, shape in fused_shapes["packed"]:
            if shape == LONG_SEQUENCES.name:  # its own target below
                continue
            same = [(abs(b - batch), s) for t, b, s in fused_shapes["padded"] if t == tokens]
            if same:
                other = min(same)[1]
                value, metric = ratio(index, "fused", "fused", method, "padded", other, slow_layout="packed",
                                      slow_shape=shape)
                pairs.append((value, f"{shape} vs {other}, {metric}"))
        value, label = _worst(pairs)
        table.add("packed / padded at the same tokens (worst shape)", f"{method} fwd+bwd {label}".rstrip(),
                  value, "<= 1.15x", lambda v: v <= 1.15, "{:.2f}x")
    copy = [float(r["p50"]) for r in rows if r["provider"] == "copy" and r["p50"]]
    for method in METHODS:  # bandwidth on the model's bytes
        for layout in LAYOUTS:
            pairs = []
            for tokens, batch, shape in fused_shapes[layout]:
                time_us, metric = device_p50(index, "fused", method, layout, shape)
                if tokens < 16 * 10**6 or not copy or time_us is None:
                    continue
                dtype = getattr(torch, index[("fused", method, layout, shape, "fwd_bwd", metric)]["dtype"])
                model = traffic(method, layout, dtype).bytes(tokens, batch) / (time_us * 1e3) / copy[0]
                least = traffic(method, layout, dtype, minimum=True).bytes(tokens, batch) / (time_us * 1e3) / copy[0]
                pairs.append((model, f"{shape}, {metric}; on the minimum bytes: {least:.0%}"))
            value, label = _worst(pairs, lowest=True)
            table.add("copy bandwidth on the model's bytes at >= 16M tokens (worst shape)",
                      f"{method} fwd+bwd, {layout} {label}".rstrip(), value, ">= 80%",
                      lambda v: v >= 0.8, "{:.0%}")
    for method in METHODS:  # 1M tokens in 25 us
        for layout in LAYOUTS:
            pairs = []
            for tokens, _, shape in fused_shapes[layout]:
                if tokens == MILLION and shape != LONG_SEQUENCES.name:
                    value, metric = device_p50(index, "fused", method, layout, shape)
                    pairs.append((value, f"{shape}, {metric}"))
            value, label = _worst(pairs)
            table.add("fwd+bwd at 1M tokens (worst shape)", f"fused {method}, {layout} {label}".rstrip(),
                      value, "<= 25 us", lambda v: v <= 25, "{:.1f} us")
    for method in METHODS:  # long sequences spread over the GPU
        value, metric = ratio(index, "fused", "fused", method, "padded", LONG_BASELINE.name, slow_layout="packed",
                              slow_shape=LONG_SEQUENCES.name)
        table.add("8 x 131,072 packed / 256x4096 padded (1M tokens each)", f"fused {method} fwd+bwd ({metric})",
                  value, "<= 1.3x", lambda v: v <= 1.3, "{:.2f}x")
    for method in METHODS:  # torch.compile, both by graph replay
        slow = p50(index, "compile", method, "padded", "512x8192", "fwd_bwd", "graph_us")
        fast = p50(index, "fused", method, "padded", "512x8192", "fwd_bwd", "graph_us")
        table.add("speedup vs torch.compile at 512x8192 (graph replay, both)", f"{method} fwd+bwd, padded",
                  slow / fast if slow and fast else None, ">= 3x", lambda v: v >= 3, "{:.1f}x")
    for method in METHODS:  # the host
        table.add("wall-clock per fwd+bwd call at 8x512", f"fused {method}, padded (wall_us)",
                  p50(index, "fused", method, "padded", "8x512", "fwd_bwd", "wall_us"), "<= 100 us",
                  lambda v: v <= 100, "{:.1f} us")
        for layout in LAYOUTS:
            pairs = []
            for _, _, shape in fused_shapes[layout]:
                fused = p50(index, "fused", method, layout, shape, "fwd_bwd", "wall_us")
                eager = p50(index, "eager", method, layout, shape, "fwd_bwd", "wall_us")
                pairs.append((fused / eager if fused and eager else None, shape))
            value, label = _worst(pairs)
            table.add("wall-clock fused / eager at every shape (worst shape)",
                      f"{method} fwd+bwd, {layout} {label}".rstrip() + " (wall_us)", value, "< 1x",
                      lambda v: v < 1, "{:.2f}x")


def targets(rows) -> list:
    """Every target as a `Target` row (target, case, measured, required, status)."""
    table = _Table(rows)
    index = index_rows(rows)
    _speed_targets(table, rows, index)
    _host_targets(table, rows)
    _shape_targets(table, rows, index)
    return table.out
