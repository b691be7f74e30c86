"""pytest-benchmark benches of the policy loss, one per (provider, method, layout, mode).

`pytest bench/ --benchmark-only` times them; with `--benchmark-disable` each runs once as a smoke test that
also checks the provider against the eager reference on the same inputs. On CPU the shapes are tiny, the
fused kernel runs only under TRITON_INTERPRET=1 (the root conftest.py sets it without CUDA) and torch.compile compiles each
(method, layout) once for C++ (seconds each); the full sweep with figures and plots is `ptr-kernels bench`.
"""

import os

import pytest
import torch

from ptr_kernels.benchmark.providers import PROVIDERS, make_call, relative_error, step, supports
from ptr_kernels.benchmark.workloads import METHODS, MODES, Shape, make_inputs

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SHAPES = {"padded": Shape("padded", 256, 256 * 4096), "packed": Shape("packed", 256, 2**20)} if CUDA else \
    {"padded": Shape("padded", 8, 8 * 256), "packed": Shape("packed", 8, 2048)}
CASES = [(p, m, lay, mode) for p in PROVIDERS for m in METHODS for lay in SHAPES for mode in MODES
         if supports(p, m, lay)]


def _skip_reason(provider):
    if provider == "fused" and not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        return "the fused kernel needs CUDA or TRITON_INTERPRET=1"
    return None


@pytest.mark.parametrize("provider,method,layout,mode", CASES, ids=["-".join(c) for c in CASES])
def test_policy_loss(benchmark, provider, method, layout, mode):
    reason = _skip_reason(provider)
    if reason:
        pytest.skip(reason)
    inputs = make_inputs(SHAPES[layout], DEVICE, torch.float32, seed=0, structure_seed=1)
    call = make_call(provider, method)

    def run():
        inputs.log_prob.grad = None
        loss = step(call, inputs, mode)
        if CUDA:
            torch.cuda.synchronize()
        return loss

    benchmark.extra_info.update(tokens=inputs.log_prob.numel(), device=str(DEVICE))
    if provider == "fused" and not CUDA:  # the Triton interpreter: one round, a smoke test rather than a timing
        loss = benchmark.pedantic(run, rounds=1, iterations=1)
    else:
        loss = benchmark(run)

    reference = make_inputs(SHAPES[layout], DEVICE, torch.float32, seed=0, structure_seed=1)
    ref_loss = step(make_call("eager", method), reference, "fwd_bwd")
    if provider != "verl" or method == "ppo":  # verl's dppo loss is the "logp" surrogate: only its gradient agrees
        assert relative_error(loss, ref_loss) < 1e-5
    if mode == "fwd_bwd":
        assert relative_error(inputs.log_prob.grad, reference.log_prob.grad) < 1e-5
