"""The fused from-logits path allocates O(N K) beyond its inputs and outputs: no `[N, V]` intermediate.

Measured on the CPU with `torch.profiler`'s memory events: every byte a torch operator (the launchers'
`torch.empty`, the validation's sort, ...) allocates during forward + backward, counted without subtracting
frees, so the sum bounds the peak of the extra memory from above. The Triton interpreter's own per-block
arrays are numpy, outside torch: they are O(BLOCK) per program on a GPU, not part of this count.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

pytest.importorskip("triton", reason="the Triton kernels: triton exists for Linux only")

from ptr_kernels import PolicyLossConfig, policy_loss_from_logits  # noqa: E402
from ptr_kernels.testing.logits_cases import cast, random_logits_case  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="CPU allocations (on a GPU: the bench's peak)")]
VOCAB, K = 4096, 20


def allocated_bytes(fn) -> int:
    """Bytes allocated by torch on the CPU while `fn()` runs (frees not subtracted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


@pytest.mark.parametrize("divergence", ["topk_tv", "binary_kl"])
def test_fused_path_allocates_o_nk(divergence):
    config = PolicyLossConfig(method="cppo", divergence=divergence)
    case = cast(random_logits_case(1, vocab=VOCAB, k=K, num_seqs=4, max_len=32, config=config), torch.float32)
    source = case.pop("logits")
    num_tokens = case["input_ids"].numel()
    dense = num_tokens * VOCAB * 4  # one [N, V] float32 tensor
    small = 8 * num_tokens * (K + 1) * 8 + 16 * 1024  # O(N K): a few int64 [N, K] tensors, plus small change

    def step(backend, inplace_grad=False):
        logits = source.clone().requires_grad_(True)

        def call():  # autograd.grad: no AccumulateGrad, which clones a gradient that aliases its leaf
            loss, _ = policy_loss_from_logits(logits, **case, backend=backend, inplace_grad=inplace_grad)
            torch.autograd.grad(loss, logits)
        return allocated_bytes(call)

    inplace = step("triton", inplace_grad=True)
    fresh = step("triton")
    reference = step("reference")
    assert inplace < small < dense / 4, (inplace, small, dense)
    assert fresh - dense < small, (fresh, dense)  # the gradient itself, [N, V] in the logits' dtype, and O(N K)
    assert reference > 2 * dense  # the measurement sees materialized distributions (float64 log_softmax)
