"""The results CSV: its columns, a row-by-row writer, a reader, and the environment stamped on every row."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from pathlib import Path

import torch

CSV_FIELDS = ("provider", "method", "layout", "shape", "batch", "tokens", "mode", "metric", "p20", "p50", "p80",
              "note", "dtype", "device", "torch", "triton", "commit")
CPU_NOTE = "CPU run: wall-clock times of PyTorch on this CPU; kernel timings need a GPU."


def environment(device: torch.device) -> dict:
    """Device name, library versions and the git commit, stamped on every row."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # macOS, Windows: the eager, compile, loop and verl providers still run
        triton_version = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "commit": git_commit()}


def git_commit() -> str:
    """$PTR_KERNELS_COMMIT when set (a copy of the tree whose git metadata may be another commit's), else the
    short commit of the package's checkout (+"-dirty"), or "unknown"."""
    if os.environ.get("PTR_KERNELS_COMMIT"):
        return os.environ["PTR_KERNELS_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def load_rows(path) -> list:
    """The rows of a results CSV as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def measure_into(row: dict, measure, device: torch.device) -> bool:
    """`row`'s time_ms and peak_mib from `measure()` = (ms, peak MiB), or its note naming what went wrong; True
    for an error other than running out of memory (at the largest shapes that is a result, not a failure)."""
    try:
        time_ms, peak = measure()
    except Exception as exc:  # noqa: BLE001 - a crash of one provider is a row, not the end of the run
        row["note"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return not isinstance(exc, torch.OutOfMemoryError)
    row.update(time_ms=f"{time_ms:.3f}", peak_mib=f"{peak:.0f}")
    return False
