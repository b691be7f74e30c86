"""Fixtures shared by the tests: where the Triton kernel runs, the backends, and one `policy_loss` call with its
gradient.

The kernel gets CUDA tensors when a GPU is present and CPU tensors otherwise (the Triton interpreter, set up by
the root conftest.py). The reference runs on the CPU on every machine, so its results, and the comparisons made
against it, are the same everywhere; results of the kernel come back to the CPU for those comparisons.
"""

import pytest
import torch

from ptr_kernels import policy_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("reference", "triton")


def device_of(backend: str) -> str:
    """Where `backend` runs in the tests: the kernel on DEVICE, the reference on the CPU."""
    return DEVICE if backend == "triton" else "cpu"


def on_device_of(backend: str, value):
    """`value` (a tensor, or a dict, list or tuple holding tensors) with its tensors moved to where `backend` runs;
    anything else as it is. Moving a tensor that requires grad keeps it in the graph: gradients reach the
    original tensor, on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.to(device_of(backend))
    if isinstance(value, dict):
        return {k: on_device_of(backend, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_device_of(backend, v) for v in value)
    return value


def loss_metrics_grad(kwargs: dict, backend: str, **overrides):
    """(loss, metrics, d loss / d log_prob) of `policy_loss(**kwargs, backend=backend, **overrides)` for a fresh
    leaf copy of `kwargs["log_prob"]`, the tensors on `backend`'s device; everything returned is on the CPU."""
    kwargs = dict(kwargs)
    log_prob = kwargs.pop("log_prob").clone().requires_grad_(True)
    loss, metrics = policy_loss(on_device_of(backend, log_prob), **on_device_of(backend, kwargs), backend=backend,
                                **on_device_of(backend, overrides))
    (grad,) = torch.autograd.grad(loss, log_prob)
    return loss.cpu(), {k: v.cpu() for k, v in metrics.items()}, grad


@pytest.fixture(scope="session")
def device() -> str:
    """Where the Triton kernel runs: "cuda" when a GPU is present, else "cpu" (the Triton interpreter)."""
    return DEVICE


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each backend in turn: the test runs once per backend."""
    return request.param


@pytest.fixture(scope="session")
def backends() -> tuple:
    """Every backend, for a test that compares them with each other."""
    return BACKENDS


@pytest.fixture(scope="session")
def on_backend_device():
    """`on_backend_device(backend, value)`: `value`'s tensors moved to where `backend` runs (`on_device_of`)."""
    return on_device_of


@pytest.fixture(scope="session")
def run_policy_loss():
    """`run_policy_loss(kwargs, backend, **overrides)`: (loss, metrics, d loss / d log_prob) on the CPU
    (`loss_metrics_grad`)."""
    return loss_metrics_grad
