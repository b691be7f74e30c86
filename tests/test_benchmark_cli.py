"""`ptr-kernels bench` end to end on the CPU tiny sweep, and the targets table on synthetic rows."""

import csv
import math
import os
import subprocess
import sys

import pytest

from ptr_kernels.benchmark import profiling, providers, sweep, workloads
from ptr_kernels.benchmark.report import target_table
from ptr_kernels.benchmark.results import CSV_FIELDS, load_rows
from ptr_kernels.benchmark.targets import targets
from ptr_kernels.cli import main

TIMING_METRICS = ("time_us", "bandwidth_gbs", "copy_fraction")


def _read_rows(path) -> list:
    """The rows of a CSV the benchmark wrote, after checking its columns."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_FIELDS
        return list(reader)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--device", "cpu", "--sweep", "tiny", "--out", str(out), "--max-reps", "3"]) == 0
    return out


def test_cpu_sweep_writes_csv_plots_and_report(sweep_dir):
    rows = _read_rows(sweep_dir / "results.csv")
    assert all(r["provider"] != "copy" for r in rows)  # a device copy's bandwidth is a GPU yardstick
    measured = {(r["provider"], r["method"], r["layout"]) for r in rows if r["metric"] == "time_us"}
    assert ("eager", "cppo", "packed") in measured and ("loop", "cppo", "padded") in measured
    assert ("verl", "dppo", "padded") in measured and ("verl", "ppo", "padded") in measured
    for r in rows:
        assert r["device"].startswith("cpu") and r["torch"] and r["triton"] and r["commit"]
        assert r["metric"] not in ("error", "skipped"), r
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
    md = (sweep_dir / "results.md").read_text()
    assert "kernel timings need a GPU" in md and "copy bandwidth" not in md.lower()
    # only targets this run judged: a CPU sweep without the fused kernel judges none
    assert "No target judged by this run: 38 not measured by this run" in md and "| not measured |" not in md


def test_named_fused_runs_on_cpu_without_exporting_the_interpreter(tmp_path):
    """As fuzz does, bench turns the Triton interpreter on itself when fused is named on a CPU."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ptr_kernels", "bench", "--device", "cpu", "--providers",
                           "eager,fused", "--methods", "ppo", "--layouts", "padded", "--max-reps", "3",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipping provider 'fused'" not in proc.stdout and "copy bandwidth" not in proc.stdout
    timed = {r["provider"] for r in _read_rows(tmp_path / "results.csv") if r["metric"] == "time_us"}
    assert timed == {"eager", "fused"}


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
    # the compile provider first (its comparison is a target), its first-priority shape first, then the eager baseline
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


def test_traffic_model():
    import torch

    from ptr_kernels.benchmark.traffic import traffic

    f32, bf16 = torch.float32, torch.bfloat16
    # float32: forward reads 4 + 4 + 4 + 1, the saved float32 gradient out and back 8, the gradient out 4
    assert traffic("cppo", "padded", f32).per_token == 25
    assert traffic("cppo", "padded", f32, minimum=True).per_token == 17
    assert traffic("dppo", "padded", bf16).per_token == 2 + 2 + 2 + 1 + 8 + 2
    assert traffic("dppo", "padded", bf16, minimum=True).per_token == 9
    assert traffic("ppo", "padded", f32, "fwd").per_token == 13 + 4  # the saved gradient written only
    assert traffic("ppo", "padded", f32, "fwd", minimum=True).per_token == 13
    assert {traffic(m, "packed", f32) for m in workloads.METHODS} == {traffic("cppo", "packed", f32)}
    # packed input adds the int32 cu_seqlens, S + 1 boundaries
    assert traffic("cppo", "packed", f32).bytes(tokens=1000, sequences=7) == 25 * 1000 + 4 * 8
    assert traffic("cppo", "padded", f32).bytes(tokens=1000, sequences=7) == 25 * 1000
    # the minimum is what the sweep's bandwidth_gbs counts
    for shape in (workloads.Shape("packed", 16, 2048), workloads.Shape("padded", 8, 8 * 64)):
        for dtype in (f32, bf16):
            inp = workloads.make_inputs(shape, torch.device("cpu"), dtype, seed=0, structure_seed=1)
            for mode in workloads.MODES:
                least = traffic("cppo", shape.layout, dtype, mode, minimum=True)
                assert least.bytes(shape.tokens, shape.batch) == inp.min_bytes(mode)
    for kwargs, field in ((dict(method="grpo"), "method"), (dict(layout="ragged"), "layout"),
                          (dict(mode="bwd"), "mode"), (dict(dtype=torch.int32), "dtype")):
        args = dict(method="cppo", layout="padded", dtype=f32, mode="fwd_bwd") | kwargs
        with pytest.raises(ValueError, match=field):
            traffic(**args)


def _shape_target_rows():
    """A GPU run's rows at the shapes of the shape targets (cppo / dppo, packed / padded, ...); the values are
    chosen per target."""
    long, base = workloads.LONG_SEQUENCES, workloads.LONG_BASELINE
    rows = [dict(_row("copy", "-", "-", "1GiB", "", "-", "bandwidth_gbs", 4000.0), batch="")]
    graph = {  # (method, layout, shape, batch, tokens): fused graph_us
        ("cppo", "padded", "256x4096", 256, 2**20): 24.0, ("dppo", "padded", "256x4096", 256, 2**20): 20.0,
        ("cppo", "packed", "1024seq/1048576tok", 1024, 2**20): 30.0,  # 1.25x padded: MISS; 30 us > 25: MISS
        ("dppo", "packed", "1024seq/1048576tok", 1024, 2**20): 22.0,
        ("cppo", "packed", long.name, long.batch, long.tokens): 31.0,  # 31 / 24 = 1.29x: PASS
        ("dppo", "padded", "4096x8192", 4096, 2**25): 250.0,
        ("cppo", "padded", "512x8192", 512, 2**22): 60.0, ("dppo", "padded", "512x8192", 512, 2**22): 40.0,
    }
    for (method, layout, shape, batch, tokens), us in graph.items():
        for metric in ("time_us", "graph_us"):
            rows.append(dict(_row("fused", method, layout, shape, tokens, "fwd_bwd", metric, us), batch=str(batch)))
    rows += [
        _row("compile", "cppo", "padded", "512x8192", 2**22, "fwd_bwd", "graph_us", 200.0),  # 3.3x: PASS
        _row("compile", "dppo", "padded", "512x8192", 2**22, "fwd_bwd", "time_us", 400.0),  # no graph replay
        _row("fused", "cppo", "padded", "8x512", 4096, "fwd_bwd", "wall_us", 90.0),
        _row("fused", "cppo", "padded", "8x512", 4096, "fwd_bwd", "time_us", 90.0),
        _row("eager", "cppo", "padded", "8x512", 4096, "fwd_bwd", "wall_us", 80.0),  # fused slower: MISS
        _row("fused", "cppo", "padded", "256x4096", 2**20, "fwd_bwd", "wall_us", 70.0),
        _row("eager", "cppo", "padded", "256x4096", 2**20, "fwd_bwd", "wall_us", 700.0),
    ]
    return rows, base


def test_shape_targets():
    rows, base = _shape_target_rows()
    found = {(t.target, t.case): (t.measured, t.status) for t in targets(rows)}

    def status(target, case_start):
        hits = [v for (t, c), v in found.items() if t.startswith(target) and c.startswith(case_start)]
        assert len(hits) == 1, (target, case_start, hits)
        return hits[0]

    assert status("cppo / dppo", "fused fwd+bwd, padded 512x8192") == ("1.50x", "MISS")  # worst of 1.2x, 1.5x
    assert status("cppo / dppo", "fused fwd+bwd, packed 1024seq") == ("1.36x", "MISS")
    assert status("packed / padded", "cppo fwd+bwd 1024seq/1048576tok vs 256x4096") == ("1.25x", "MISS")
    assert status("packed / padded", "dppo fwd+bwd 1024seq/1048576tok vs 256x4096") == ("1.10x", "PASS")
    assert status("packed / padded", "ppo") == ("-", "not measured")
    # 25 B/token x 2^25 tokens in 250 us = 3355 GB/s of 4000: 84%; on the 17-byte minimum 57%
    assert status("copy bandwidth on the model's bytes", "dppo fwd+bwd, padded 4096x8192") == ("84%", "PASS")
    assert "on the minimum bytes: 57%" in next(c for t, c in found if c.startswith("dppo fwd+bwd, padded 4096x8192"))
    assert status("copy bandwidth on the model's bytes", "cppo fwd+bwd, padded") == ("-", "not measured")
    assert status("fwd+bwd at 1M tokens", "fused cppo, padded 256x4096") == ("24.0 us", "PASS")
    assert status("fwd+bwd at 1M tokens", "fused cppo, packed 1024seq") == ("30.0 us", "MISS")  # 8 x 131072 apart
    assert status("8 x 131,072", "fused cppo fwd+bwd (graph_us)") == ("1.29x", "PASS")
    assert status("8 x 131,072", "fused dppo") == ("-", "not measured")
    assert status("speedup vs torch.compile", "cppo") == ("3.3x", "PASS")
    assert status("speedup vs torch.compile", "dppo") == ("-", "not measured")  # never from event times
    assert status("wall-clock per fwd+bwd call at 8x512", "fused cppo") == ("90.0 us", "PASS")
    assert status("wall-clock fused / eager", "cppo fwd+bwd, padded 8x512") == ("1.12x", "MISS")  # worst shape
    assert status("wall-clock fused / eager", "cppo fwd+bwd, packed") == ("-", "not measured")
    # a CPU run measures none of them
    cpu = [dict(r, device="cpu x86_64 (2 cores)") for r in rows]
    assert {t.status for t in targets(cpu)} == {"n/a (CPU)", "not measured"}


def test_target_table_shows_only_what_the_run_judged():
    rows, _ = _shape_target_rows()
    lines = target_table(rows)
    assert lines[0] == "| target | case | measured | required | status |"
    body = [line for line in lines[2:] if line.startswith("|")]
    judged = [t for t in targets(rows) if t.status in ("PASS", "MISS")]
    assert len(body) == len(judged) == 17 and all(line.endswith(("| PASS |", "| MISS |")) for line in body)
    unmeasured = sum(t.status == "not measured" for t in targets(rows))
    assert lines[-1] == f"Not shown: {unmeasured} not measured by this run (docs/benchmarks.md lists every target)."
    cpu = target_table([dict(r, device="cpu x86_64 (2 cores)") for r in rows])
    assert cpu == [f"No target judged by this run: {unmeasured} not measured by this run, 17 GPU targets a CPU run "
                   "cannot judge (docs/benchmarks.md lists every target)."]


@pytest.fixture(scope="module")
def host_dir(tmp_path_factory):
    pytest.importorskip("triton", reason="--host stubs the Triton kernels' launches")
    out = tmp_path_factory.mktemp("host")
    assert main(["bench", "--host", "--device", "cpu", "--methods", "cppo,dppo", "--max-reps", "20",
                 "--out", str(out)]) == 0
    return out


def test_host_measurement_on_cpu(host_dir):
    rows = _read_rows(host_dir / "host.csv")
    by_key = {(r["provider"], r["method"], r["layout"], r["metric"]): r for r in rows}
    assert {r["shape"] for r in rows} == {"4x41", "4seq/164tok"}  # about 150 tokens, padded and packed
    for method in ("cppo", "dppo"):
        for layout in workloads.LAYOUTS:
            fused, eager, ratio, launches = (float(by_key[(p, method, layout, m)]["p50"]) for p, m in (
                ("fused", "host_us"), ("eager", "host_us"), ("fused", "host_ratio"), ("fused", "stubbed_launches")))
            assert fused > 0 and eager > 0 and ratio == pytest.approx(fused / eager, rel=1e-4)
            assert launches >= 2  # the stub really skipped the kernels: forward and backward launch at least one
            assert "20 rounds of 7 warm calls" in by_key[("fused", method, layout, "host_us")]["note"]
            # the cold condition (after a stand-in model step) and the autograd floor, in the same run
            cold_fused, cold_eager, cold_ratio = (float(by_key[(p, method, layout, m)]["p50"]) for p, m in (
                ("fused", "host_us_cold"), ("eager", "host_us_cold"), ("fused", "host_ratio_cold")))
            assert cold_ratio == pytest.approx(cold_fused / cold_eager, rel=1e-4)
            assert "20 rounds of one cold call" in by_key[("fused", method, layout, "host_us_cold")]["note"]
            assert float(by_key[("autograd_floor", method, layout, "host_us")]["p50"]) > 0
    md = (host_dir / "host.md").read_text()
    assert "stubbed launches per call" in md and md.count("<= 0.15") == 4
    host_targets = [t for t in targets(rows) if t.target.startswith("host time")]
    assert len(host_targets) == 4 and all(t.status in ("PASS", "MISS") for t in host_targets)


def test_report_merges_host_rows(sweep_dir, host_dir, tmp_path):
    import shutil

    shutil.copy(sweep_dir / "results.csv", tmp_path / "results.csv")
    shutil.copy(host_dir / "host.csv", tmp_path / "host.csv")
    assert main(["bench", "--report", str(tmp_path / "results.csv")]) == 0
    md = (tmp_path / "results.md").read_text()
    assert "### Host time of one call" in md and "| host time of fwd+bwd" in md


def test_stubbed_launches_count_and_restore():
    pytest.importorskip("triton")
    import torch
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from ptr_kernels import policy_loss
    from ptr_kernels.benchmark.host import stubbed_triton_launches

    originals = (InterpretedFunction.run, JITFunction.run)
    inp = workloads.make_inputs(workloads.Shape("padded", 2, 16), torch.device("cpu"), torch.float32, 0, 1)
    with stubbed_triton_launches() as stub:
        loss, _ = policy_loss(inp.log_prob, inp.old_log_prob, inp.advantages, inp.mask, backend="triton")
        forward = stub["launches"]
        loss.backward()
    assert forward >= 1 and stub["launches"] > forward
    assert (InterpretedFunction.run, JITFunction.run) == originals  # the kernels launch again
