"""`ptr-kernels fuzz`: output, exit codes, and that it catches a wrong backend."""

import re
import subprocess
import sys

import pytest

import ptr_kernels.api
from ptr_kernels.cli import main


def fuzz(capsys, *args):
    code = main(["fuzz", *args])
    return code, capsys.readouterr().out


def row(out, name):
    """The value column of a summary row."""
    match = re.search(rf"^{re.escape(name)}\s+(.+?)\s{{2}}", out, re.MULTILINE)
    assert match, f"no row {name!r} in:\n{out}"
    return match.group(1).strip()


def test_reference_passes_20_cases(capsys):
    code, out = fuzz(capsys, "--cases", "20", "--seed", "7", "--backend", "reference")
    assert code == 0
    assert "backend=reference device=cpu dtype=float64 cases=20 seeds=7..26" in out
    assert row(out, "cases") == "20 (0 failed)"
    assert int(row(out, "valid tokens")) > 0
    for name in ("max loss error", "max grad error", "max metric error"):
        assert float(row(out, name)) <= 1e-9
    assert row(out, "mask disagreements") == "0"
    assert "PASS: reference agrees with the literal loop on all 20 cases" in out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_reduced_precision_inputs_pass(capsys, dtype):
    code, out = fuzz(capsys, "--cases", "6", "--backend", "reference", "--dtype", dtype)
    assert code == 0, out
    assert f"dtype={dtype}" in out


def test_wrong_loss_fails(capsys, monkeypatch):
    real = ptr_kernels.api.policy_loss

    def off_by_one_percent(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * 1.01, metrics

    monkeypatch.setattr(ptr_kernels.api, "policy_loss", off_by_one_percent)
    code, out = fuzz(capsys, "--cases", "5", "--backend", "reference")
    assert code == 1
    assert float(row(out, "max loss error")) > 1e-3
    assert "FAIL seed=" in out and "FAIL: " in out


def test_wrong_threshold_is_a_mask_disagreement(capsys, monkeypatch):
    real = ptr_kernels.api.policy_loss

    def tighter_threshold(*args, config, **kwargs):
        return real(*args, config=config.replace(delta=config.delta / 2), **kwargs)

    monkeypatch.setattr(ptr_kernels.api, "policy_loss", tighter_threshold)
    code, out = fuzz(capsys, "--cases", "10", "--backend", "reference")
    assert code == 1
    assert int(row(out, "mask disagreements")) > 0
    assert "mask disagreement(s)" in out


def test_unavailable_backend_exits_2(capsys, monkeypatch):
    def not_yet(*args, **kwargs):
        raise NotImplementedError("backend='triton' is not implemented yet")

    monkeypatch.setattr(ptr_kernels.api, "policy_loss", not_yet)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what fuzz sets on CPU; restored after the test
    code = main(["fuzz", "--cases", "3", "--backend", "triton"])
    assert code == 2
    assert "backend 'triton' is not available yet" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "ptr_kernels", "fuzz", "--cases", "3", "--backend", "reference"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout
