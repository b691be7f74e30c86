"""`ptr-kernels doctor`, run as a user runs it (a fresh process, no TRITON_INTERPRET in the environment)."""

import os
import subprocess
import sys

import pytest
import torch

DOCTOR = "import sys\nfrom ptr_kernels.cli import main\nsys.exit(main(['doctor']))\n"


def doctor(prelude: str = "") -> tuple:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", prelude + DOCTOR], env=env, capture_output=True, text=True,
                         timeout=300)
    lines = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip() and " " in line)
    return out.returncode, lines, out.stdout + out.stderr


def test_reports_every_part_of_this_installation():
    triton, verl, trl = (pytest.importorskip(name) for name in ("triton", "verl", "trl"))
    code, lines, output = doctor()
    assert code == 0, output
    assert lines["torch"] == torch.__version__ and lines["triton"] == triton.__version__
    assert lines["reference"] == "computes the loss"
    where = "CUDA device" if torch.cuda.is_available() else "Triton interpreter on CPU"
    assert lines["kernels"].startswith(where) and "matches the reference" in lines["kernels"], output
    assert lines["verl"] == f"{verl.__version__}: ptr_cppo, ptr_dppo_tv, ptr_dppo_kl, ptr_vanilla registered"
    assert lines["trl"] == f"{trl.__version__}: ptr_kernels.integrations.trl imports"
    assert output.rstrip().endswith("core: OK")


def test_without_triton_the_core_still_works():
    code, lines, output = doctor('import sys\nsys.modules["triton"] = None\n')
    assert code == 0, output
    assert lines["triton"].startswith("not installed") and "kernels" not in lines


def test_a_failing_verl_registration_is_shown():
    """verl itself logs a plugin that fails only at debug level: doctor names the missing losses and the error."""
    broken = ("import ptr_kernels.integrations.verl as ptr_verl\n"
              "def register():\n"
              "    raise ImportError('a broken install')\n"
              "ptr_verl.register = register\n")
    code, lines, output = doctor(broken)
    assert code == 0, output  # verl is optional: the core works
    assert "ptr_cppo, ptr_dppo_tv, ptr_dppo_kl, ptr_vanilla not in POLICY_LOSS_REGISTRY" in lines["verl"], output
    assert "register() fails: ImportError: a broken install" in lines["verl"]
