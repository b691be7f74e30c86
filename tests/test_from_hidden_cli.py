"""`ptr-kernels fuzz --from-hidden` and `ptr-kernels bench --from-hidden [--step]` run on a CPU (the Triton
path in the interpreter, tiny shapes) and report what they measured."""

import csv

import pytest

from ptr_kernels.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf * 0 in discarded lanes


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fuzz_from_hidden(capsys):
    assert main(["fuzz", "--from-hidden", "--backend", "triton", "--cases", "2", "--max-len", "8"]) == 0
    assert "PASS: triton agrees with the oracle on all 2 from-hidden cases" in capsys.readouterr().out


def test_bench_from_hidden(tmp_path):
    """The head benchmark: the floor first, then ours and the materialized head (and the peers installed
    here), each with a time and its ratio to the floor."""
    assert main(["bench", "--from-hidden", "--sweep", "tiny", "--methods", "ppo", "--max-reps", "1",
                 "--out", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "from_hidden.csv")
    assert rows[0]["provider"] == "floor" and float(rows[0]["time_ms"]) > 0
    assert {"fused", "materialized"} <= {r["provider"] for r in rows}
    assert all(float(r["time_ms"]) > 0 and float(r["vs_floor"]) > 0 for r in rows[1:])
    assert (tmp_path / "from_hidden.md").read_text().startswith("| provider |")


def test_bench_step(tmp_path):
    """The step benchmark: a tiny decoder's forward + loss + backward per loss path, each with a time."""
    assert main(["bench", "--from-hidden", "--step", "--sweep", "tiny", "--methods", "cppo", "--max-reps", "1",
                 "--out", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "step.csv")
    assert {"fused", "materialized"} <= {r["provider"] for r in rows}
    assert all(float(r["time_ms"]) > 0 for r in rows)
    fused = next(r for r in rows if r["provider"] == "fused")
    assert fused["divergence"] == "topk_tv" and int(fused["tokens"]) == 32


def test_bench_real_shapes_need_cuda(capsys):
    assert main(["bench", "--from-hidden", "--sweep", "full", "--device", "cpu"]) == 2
    assert "need CUDA" in capsys.readouterr().out
