"""`ptr-kernels bench` end to end on the CPU tiny sweep, and the targets table on synthetic rows."""

import csv
import math

import pytest

from ptr_kernels.benchmark import profiling, providers, sweep, workloads
from ptr_kernels.benchmark.results import CSV_FIELDS, load_rows
from ptr_kernels.benchmark.targets import targets
from ptr_kernels.cli import main

TIMING_METRICS = ("time_us", "bandwidth_gbs", "copy_fraction")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--device", "cpu", "--sweep", "tiny", "--out", str(out), "--max-reps", "3"]) == 0
    return out


def test_cpu_sweep_writes_csv_plots_and_report(sweep_dir):
    with open(sweep_dir / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_FIELDS
        rows = list(reader)
    assert rows[0]["provider"] == "copy" and float(rows[0]["p50"]) > 0
    measured = {(r["provider"], r["method"], r["layout"]) for r in rows if r["metric"] == "time_us"}
    assert ("eager", "cppo", "packed") in measured and ("loop", "cppo", "padded") in measured
    assert ("verl", "dppo", "padded") in measured and ("verl", "ppo", "padded") in measured
    for r in rows:
        assert r["device"].startswith("cpu") and r["torch"] and r["triton"] and r["commit"]
        assert r["metric"] not in ("error", "skipped"), r
        if r["provider"] == "copy":
            continue
        assert r["provider"] in providers.PROVIDERS and r["method"] in workloads.METHODS
        assert r["layout"] in workloads.LAYOUTS and r["mode"] in workloads.MODES
        assert int(r["tokens"]) > 0 and int(r["batch"]) > 0
        p20, p50, p80 = (float(r[k]) for k in ("p20", "p50", "p80"))
        assert all(math.isfinite(v) and v >= 0 for v in (p20, p50, p80))
        if r["metric"] in TIMING_METRICS:
            assert 0 < p20 <= p50 <= p80
        if r["metric"] == "grad_err" or r["metric"] == "loss_err":
            assert p50 < 1e-4, r  # every provider computes the reference's loss
    for name in ("time_cppo_fwd.png", "time_cppo_fwd_bwd.png", "speedup_ppo_fwd_bwd.png", "results.md"):
        assert (sweep_dir / name).stat().st_size > 0, name
    assert "kernel timings need a GPU" in (sweep_dir / "results.md").read_text()


def test_report_from_csv(sweep_dir, tmp_path):
    assert main(["bench", "--report", str(sweep_dir / "results.csv"), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "### Targets" in md and "eager p50" in md
    assert (tmp_path / "time_dppo_fwd_bwd.png").exists()


def _row(provider, method, layout, shape, tokens, mode, metric, value, device="NVIDIA H200"):
    return dict(provider=provider, method=method, layout=layout, shape=shape, batch="1", tokens=str(tokens),
                mode=mode, metric=metric, p20=str(value), p50=str(value), p80=str(value), note="", dtype="float32",
                device=device, torch="2.11", triton="3.6", commit="abc")


def test_targets_pass_and_miss():
    rows = [
        _row("fused", "cppo", "padded", "256x4096", 2**20, "fwd_bwd", "time_us", 40.0),
        _row("fused", "cppo", "padded", "512x8192", 2**22, "fwd_bwd", "time_us", 100.0),
        _row("eager", "cppo", "padded", "512x8192", 2**22, "fwd_bwd", "time_us", 1500.0),  # 15x: MISS
        _row("compile", "cppo", "padded", "512x8192", 2**22, "fwd_bwd", "time_us", 400.0),  # 4x: PASS
        _row("fused", "cppo", "padded", "2048x8192", 2**24, "fwd_bwd", "copy_fraction", 0.75),
    ]
    status = {(t[0], t[1]): t[4] for t in targets(rows)}
    assert status[("cppo fwd+bwd at 1M tokens", "fused, padded 256x4096 (time_us)")] == "PASS"
    assert status[("speedup vs eager at 512x8192", "cppo fwd+bwd, padded (time_us)")] == "MISS"
    assert status[("speedup vs compile at 512x8192", "cppo fwd+bwd, padded (time_us)")] == "PASS"
    assert status[("speedup vs loop at 4,096 sequences", "cppo fwd+bwd, padded 4096x1024 (time_us)")] == "not measured"
    assert status[("copy bandwidth fraction at >= 16M tokens", "cppo fwd+bwd, padded 2048x8192 (time_us)")] == "PASS"
    cpu = [dict(r, device="cpu x86_64 (2 cores)") for r in rows]
    assert {t[4] for t in targets(cpu)} <= {"n/a (CPU)", "not measured"}

    # device-only CUDA-graph times win where both sides have them; a side without one falls back to time_us
    rows += [
        _row("fused", "cppo", "padded", "256x4096", 2**20, "fwd_bwd", "graph_us", 60.0),  # over 50 us: MISS
        _row("fused", "cppo", "padded", "512x8192", 2**22, "fwd_bwd", "graph_us", 50.0),
        _row("eager", "cppo", "padded", "512x8192", 2**22, "fwd_bwd", "graph_us", 1500.0),  # 30x: PASS
        _row("fused", "cppo", "padded", "2048x8192", 2**24, "fwd_bwd", "graph_copy_fraction", 0.5),  # MISS
    ]
    status = {(t[0], t[1]): (t[2], t[4]) for t in targets(rows)}
    assert status[("cppo fwd+bwd at 1M tokens", "fused, padded 256x4096 (graph_us)")] == ("60.0 us", "MISS")
    assert status[("speedup vs eager at 512x8192", "cppo fwd+bwd, padded (graph_us)")] == ("30.0x", "PASS")
    assert status[("speedup vs compile at 512x8192", "cppo fwd+bwd, padded (time_us)")] == ("4.0x", "PASS")
    assert status[("copy bandwidth fraction at >= 16M tokens", "cppo fwd+bwd, padded 2048x8192 (graph_us)")] \
        == ("50%", "MISS")


def test_plan_orders_and_filters_jobs():
    jobs = sweep.plan(providers.PROVIDERS, workloads.METHODS, workloads.LAYOUTS, workloads.SWEEPS["full"])
    order = [p for p, _, _ in jobs]
    assert all(providers.supports(p, m, s.layout) for p, m, s in jobs)
    assert {(m, s.layout) for p, m, s in jobs if p == "loop"} == {("cppo", "padded")}
    # the compile provider first (issue 13), its first-priority shape first, then the eager baseline
    compile_512 = workloads.Shape("padded", 512, 512 * 8192, compile_priority=0, loop=True)
    assert jobs[:3] == [("compile", m, compile_512) for m in workloads.METHODS]
    assert order.index("eager") == order.count("compile")
    loop_4096 = order.index("loop")
    assert jobs[loop_4096][2].batch == 4096 and order.index("eager") < loop_4096 < order.index("fused")
    # the fused kernel: the new long-sequence shape first, then by size
    fused = [s for p, m, s in jobs if p == "fused" and m == "cppo"]
    assert fused[0] == workloads.LONG_SEQUENCES and fused[0].name == "8seq/1048576tok"
    assert [s.tokens for s in fused[1:]] == sorted(s.tokens for s in fused[1:])


def test_inputs_and_min_bytes():
    import torch

    shape = workloads.Shape("packed", 16, 2048)
    a = workloads.make_inputs(shape, torch.device("cpu"), torch.float32, seed=0, structure_seed=1)
    b = workloads.make_inputs(shape, torch.device("cpu"), torch.float32, seed=1, structure_seed=1)
    assert torch.equal(a.cu_seqlens, b.cu_seqlens) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.log_prob, b.log_prob)
    assert int(a.cu_seqlens[-1]) == 2048 and bool((a.cu_seqlens[1:] > a.cu_seqlens[:-1]).all())
    # fp32 log_prob, old_log_prob, advantages + bool mask read, fp32 gradient written: 17 bytes per token
    assert a.min_bytes("fwd_bwd") == 17 * 2048 + 4 * 17 and a.min_bytes("fwd") == 13 * 2048 + 4 * 17


def test_count_marked_attributes_events_to_ranges():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def ev(name, start, end=None, device=DeviceType.CPU, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                               time_range=SimpleNamespace(start=start, end=start if end is None else end))

    mark = profiling.MARK
    events = [
        ev("kernel_before_any_mark", 1, device=DeviceType.CUDA),
        ev(mark + "0", 10, 20), ev(mark + "0", 11, 19, device=DeviceType.CUDA, annotation=True),
        ev("cudaLaunchKernel", 11), ev("k", 12, device=DeviceType.CUDA), ev("k", 13, device=DeviceType.CUDA),
        ev("## Call CompiledFxGraph", 12, device=DeviceType.CUDA, annotation=True),
        ev("cudaStreamSynchronize", 14), ev("cudaDeviceSynchronize", 19),
        ev("kernel_between_marks", 25, device=DeviceType.CUDA),
        ev(mark + "1", 30, 40), ev("cuLaunchKernel", 31), ev("cudaMemsetAsync", 32),  # no device events: API
    ]
    assert profiling.count_marked(events) == {mark + "0": (2, 1), mark + "1": (2, 0)}


def test_errors_and_time_budget_are_recorded(tmp_path, monkeypatch):
    original = sweep.make_call

    def make_call(provider, method):
        if provider == "verl":
            raise RuntimeError("provider broke")
        return original(provider, method)

    monkeypatch.setattr(sweep, "make_call", make_call)
    args = ["bench", "--device", "cpu", "--providers", "eager,verl", "--methods", "ppo", "--layouts", "padded",
            "--max-reps", "3", "--out", str(tmp_path)]
    assert main(args) == 1  # a failed config fails the command, after writing everything else
    rows = load_rows(tmp_path / "results.csv")
    errors = [r for r in rows if r["metric"] == "error"]
    assert {r["provider"] for r in errors} == {"verl"} and "provider broke" in errors[0]["note"]
    assert any(r["provider"] == "eager" and r["metric"] == "time_us" for r in rows)
    assert "provider broke" in (tmp_path / "results.md").read_text()

    assert main(args + ["--time-budget", "0"]) == 0  # nothing starts, every config is recorded as skipped
    rows = load_rows(tmp_path / "results.csv")
    skipped = [r for r in rows if r["metric"] == "skipped"]
    assert len(skipped) == 4 and all("time budget" in r["note"] for r in skipped)
