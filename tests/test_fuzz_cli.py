"""`ptr-kernels fuzz`: output, exit codes, and that it catches a wrong backend."""

import math
import re
import subprocess
import sys

import pytest
import torch

import ptr_kernels.api
from ptr_kernels import PolicyLossConfig
from ptr_kernels.testing.cases import Case
from ptr_kernels.cli import main
from ptr_kernels.testing.fuzz import check_case


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


@pytest.mark.parametrize("option, value", [("--cases", "0"), ("--cases", "-3"), ("--cases", "many"),
                                           ("--max-len", "0")])
def test_nothing_to_check_is_an_error(capsys, option, value):
    """`--cases 0` would print "PASS on all 0 cases" having checked nothing."""
    with pytest.raises(SystemExit) as exit_:
        main(["fuzz", option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: expected an integer >= 1, got {value!r}" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "ptr_kernels", "fuzz", "--cases", "3", "--backend", "reference"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout



def _tie_case():
    """DPPO, 4 tokens moving away from mu: D_0 equals delta exactly (a tie; kept, D <= delta); D_1 is
    1e-7 (relative) below delta: not a near tie in float64, but a threshold lowered by 1e-6 drops it."""
    delta = 0.1
    pi = [0.5 + delta, 0.5 + delta * (1 - 1e-7), 0.7, 0.55]
    lp = torch.tensor([[math.log(p) for p in pi]], dtype=torch.float64)
    olp = torch.full_like(lp, math.log(0.5))
    delta = (lp[0, 0].exp() - olp[0, 0].exp()).item()  # D_0 exactly, as the implementations compute it
    return Case(seed=-1, log_prob=lp, old_log_prob=olp, advantages=torch.ones(1, dtype=torch.float64),
                response_mask=None, cu_seqlens=None, rollout_is_weights=None,
                config=PolicyLossConfig(method="dppo", delta=delta), kwargs={})


@pytest.mark.parametrize("shift", [1e-12, 1e-6])
def test_only_near_ties_may_be_decided_the_other_way(monkeypatch, shift):
    real = ptr_kernels.api.policy_loss

    def lowered(*args, config, **kwargs):  # a backend whose threshold is a little lower
        return real(*args, config=config.replace(delta=config.delta * (1 - shift)), **kwargs)

    monkeypatch.setattr(ptr_kernels.api, "policy_loss", lowered)
    numbers, problems = check_case(_tie_case(), "reference", torch.float64, "cpu")
    assert numbers["near_ties"] == 1 and numbers["ties_flipped"] == 1
    if shift == 1e-12:  # only the tie flips: the literal loop given that decision matches everything
        assert problems == [] and numbers["mask_disagreements"] == 0
    else:  # token 1 flips too, and it is no tie
        assert numbers["mask_disagreements"] == 1
        assert any("mask disagreement" in p for p in problems)


def _positive_terms_case():
    """dppo with A = -1 everywhere: every token's loss r_t is positive, so the loss error is its relative error."""
    g = torch.Generator().manual_seed(0)
    olp = -torch.rand(2, 16, generator=g, dtype=torch.float64) - 0.1
    lp = olp + 0.01 * torch.randn(2, 16, generator=g, dtype=torch.float64)
    return Case(seed=-2, log_prob=lp, old_log_prob=olp, advantages=-torch.ones(2, dtype=torch.float64),
                response_mask=None, cu_seqlens=None, rollout_is_weights=None,
                config=PolicyLossConfig(method="dppo"), kwargs={})


@pytest.mark.parametrize("backend_off,passes", [(3e-4, True), (6e-4, False)])
def test_tolerance_grows_with_the_float32_references_own_error(monkeypatch, backend_off, passes):
    """With the float32 reference 1e-4 off (10x the floor), a backend 3e-4 off passes (floor + 4 x 1e-4) and one
    6e-4 off fails; the reference is the yardstick, the backend under test is held to it."""
    real = ptr_kernels.api.policy_loss

    def off(*args, backend, **kwargs):
        loss, metrics = real(*args, backend="reference", **kwargs)
        return loss * (1 + (1e-4 if backend == "reference" else backend_off)), metrics

    monkeypatch.setattr(ptr_kernels.api, "policy_loss", off)
    numbers, problems = check_case(_positive_terms_case(), "triton", torch.float32, "cpu")
    assert numbers["loss_err"] == pytest.approx(backend_off, rel=0.01)
    assert (problems == []) == passes, problems
    assert numbers["beyond_floor"] == int(passes)
    # the reference itself is held to the floor plus n u (16 positions: 1e-6), not to the yardstick
    numbers, problems = check_case(_positive_terms_case(), "reference", torch.float32, "cpu")
    assert any("loss error" in p for p in problems)


def test_short_cases_keep_the_fixed_floor(monkeypatch):
    """The float32 reference is ~1e-7 off on a short case: a backend 5e-5 off fails though 5e-5 is tiny."""
    real = ptr_kernels.api.policy_loss

    def off(*args, backend, **kwargs):
        loss, metrics = real(*args, backend="reference", **kwargs)
        return (loss if backend == "reference" else loss * (1 + 5e-5)), metrics

    monkeypatch.setattr(ptr_kernels.api, "policy_loss", off)
    numbers, problems = check_case(_positive_terms_case(), "triton", torch.float32, "cpu")
    assert problems and "loss error" in problems[0]


def test_float32_reference_on_a_long_sequence_is_held_to_the_summation_bound():
    """Seed 1023 at --max-len 4096 (packed, cppo, binary_kl, soft gate, logp; longest sequence 2581): the float32
    reference's gradient is 1.75e-5 off the float64 oracle, over the 1.02e-5 floor and within rtol + n u."""
    from ptr_kernels.testing.cases import random_case

    numbers, problems = check_case(random_case(1023, max_len=4096), "reference", torch.float32, "cpu")
    assert problems == []
    assert 1.02e-5 < numbers["grad_err"] < 1.02e-5 + 2581 * 2.0**-24
    assert numbers["beyond_floor"] == 1
