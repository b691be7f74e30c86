"""The report of a sweep: `results.md` (environment, copy bandwidth, targets, per (layout, mode) tables of every
provider's p50, launches and peak memory), the plots, and the targets printed; from the rows, so that
`--report CSV` works on any earlier run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import host
from .plots import plots, shape_names
from .providers import PROVIDERS
from .results import CPU_NOTE, load_rows
from .targets import index_rows, p50, targets
from .workloads import LAYOUTS, METHODS, MODES

TARGET_HEADER = ("target", "case", "measured", "required", "status")
UNJUDGED = {"not measured": "not measured by this run", "n/a (CPU)": "GPU targets a CPU run cannot judge"}


def target_table(rows) -> list:
    """Markdown lines of the targets this run judged (PASS / MISS), then one line counting the others."""
    judged, unjudged = [], dict.fromkeys(UNJUDGED, 0)
    for t in targets(rows):
        if t.status in UNJUDGED:
            unjudged[t.status] += 1
        else:
            judged.append((t.target, t.case, t.measured, t.required, t.status))
    others = ", ".join(f"{n} {UNJUDGED[status]}" for status, n in unjudged.items() if n)
    if not judged:
        return [f"No target judged by this run: {others} (docs/benchmarks.md lists every target)."]
    lines = _table(TARGET_HEADER, judged)
    return lines + ["", f"Not shown: {others} (docs/benchmarks.md lists every target)."] if others else lines


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
    index = index_rows(rows)
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
    lines += ["### Targets", ""] + target_table(rows)
    if any(r["metric"] in host.RATIO_METRICS for r in rows):
        lines += ["", "### Host time of one call (`ptr-kernels bench --host`)", ""] + host.table(rows)
    providers = [p for p in PROVIDERS if any(r["provider"] == p and r["metric"] == "time_us" for r in rows)]
    others = [p for p in providers if p != "fused"]
    tables = (("graph_us", "graph_copy_fraction", "device time of one call (CUDA graph replay, kernels alone)"),
              ("time_us", "copy_fraction", "time per call (CUDA events; host overhead included when host-bound)"))
    for metric, fraction, title in tables:
        for layout in LAYOUTS:
            for mode in MODES:
                body = []
                for method in METHODS:
                    for shape in shape_names(rows, layout):
                        times = {p: p50(index, p, method, layout, shape, mode, metric) for p in providers}
                        if not any(times.values()):
                            continue
                        cells = [method, shape] + [_fmt_time(times[p]) for p in providers]
                        if "fused" in providers:
                            wall = p50(index, "fused", method, layout, shape, mode, "wall_us")
                            frac = p50(index, "fused", method, layout, shape, mode, fraction)
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
            fwd = p50(index, r["provider"], r["method"], r["layout"], r["shape"], "fwd", "launches")
            syncs = p50(index, r["provider"], r["method"], r["layout"], r["shape"], "fwd_bwd", "host_syncs")
            mem = p50(index, r["provider"], r["method"], r["layout"], r["shape"], "fwd_bwd", "peak_mem_mib")
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


def with_host_rows(rows, folder: Path) -> list:
    """`rows` and, where `folder` holds one, the rows of `bench --host`'s host.csv (for the targets)."""
    path = Path(folder) / "host.csv"
    return rows + load_rows(path) if path.exists() else rows


def report(rows, out: Path, csv_path) -> None:
    """Write results.md and the plots next to the CSV; print the targets (with host.csv's rows if the CSV's
    folder has one)."""
    out.mkdir(parents=True, exist_ok=True)
    all_rows = with_host_rows(rows, Path(csv_path).parent)
    (out / "results.md").write_text(f"Results from `{csv_path}`.\n\n" + markdown(all_rows))
    print("\n".join(target_table(all_rows)))
    if rows and rows[0]["device"].startswith("cpu"):
        print(CPU_NOTE)
    pngs = plots(rows, out)
    print(f"wrote {out / 'results.md'} and {len(pngs)} plots to {out}")
