"""Where triton does not exist (macOS, Windows) the package imports, the reference backend computes the same
numbers, and backend="triton" raises the one RuntimeError that it raises wherever the kernels cannot run (CPU
tensors outside the Triton interpreter included), from every entry point."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

# The same seeded inputs here and in the child; the child prints its reference results and the errors it got.
INPUTS = """
import torch
from ptr_kernels import PolicyLoss, policy_loss, policy_loss_from_logits
g = torch.Generator().manual_seed(0)
old = -torch.rand(3, 7, generator=g, dtype=torch.float64)
lp = old + 0.1 * torch.randn(3, 7, generator=g, dtype=torch.float64)
adv = torch.randn(3, generator=g, dtype=torch.float64)
mask = torch.arange(7) < torch.tensor([[7], [4], [1]])
logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
ids = torch.randint(0, 11, (3, 7), generator=g)
old_from_logits = torch.log_softmax(logits + 0.1, -1).gather(-1, ids[..., None])[..., 0]
ENTRY_POINTS = {
    "policy_loss": lambda backend: policy_loss(lp, old, adv, mask, backend=backend),
    "PolicyLoss": lambda backend: PolicyLoss(backend=backend)(lp, old, adv, mask),
    "policy_loss_from_logits": lambda backend: policy_loss_from_logits(logits, ids, old_from_logits, adv, mask,
                                                                       backend=backend),
}
"""

CHILD = INPUTS + """
import json, sys
results = {name: run("reference")[0].item() for name, run in ENTRY_POINTS.items()}
errors = {}
for name, run in ENTRY_POINTS.items():
    try:
        run("triton")
        errors[name] = "no error"
    except Exception as error:
        errors[name] = f"{type(error).__name__}: {error}"
print(json.dumps({"results": results, "errors": errors, "triton_imported": sys.modules.get("triton") is not None}))
"""

BLOCK_TRITON = 'import sys\nsys.modules["triton"] = None  # `import triton` raises ImportError, as when not installed\n'


def run_child(prelude: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", prelude + CHILD], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def expected_results() -> dict:
    scope = {}
    exec(INPUTS, scope)
    return {name: run("reference")[0].item() for name, run in scope["ENTRY_POINTS"].items()}


def test_reference_works_and_triton_backend_raises_without_triton():
    child = run_child(BLOCK_TRITON, dict(os.environ))
    assert not child["triton_imported"]
    assert child["results"] == expected_results()  # bit for bit: the same code on the same inputs
    for name, error in child["errors"].items():
        assert error.startswith("RuntimeError: backend='triton' needs the triton package"), (name, error)


def test_cpu_tensors_without_the_interpreter_raise_the_same_type():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton (the kernels' import)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = run_child("", env)
    for name, error in child["errors"].items():
        assert error.startswith("RuntimeError: backend='triton' got CPU tensors"), (name, error)
        assert "TRITON_INTERPRET=1" in error

