"""The from-hidden Triton path never builds the `[N, V]` logits: with chunk_size=256, N = 2048 tokens and V = 4096,
no tensor created during forward and backward holds more than 2 x 256 x V elements; the materialized path does.

Every operator's outputs are recorded by a `TorchDispatchMode` (the backward runs on this thread, inside the
mode), each by the bytes of its storage in float32 elements (bytes / 4: the inputs are float32): a view (a
slice of the chunk buffer, `weight.t()`, the validation's expanded one-element stand-in for the logits' shape,
the interpreter's byte views of a launch's arguments) is counted by the memory behind it, not by its shape.
H is small (64) so that the head's own tensors ([V, H], [N, H]) stay below the bound and the chunks show.
The divergence is binary: the interpreter spends about twice as long per token on the Top-K gathers, whose
only tensors are O(N K) and `[N]` (tests/test_from_logits_memory.py measures those).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ptr_kernels import PolicyLossConfig, policy_loss_from_hidden

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf * 0 in discarded lanes
BATCH, WIDTH, SIZE, VOCAB, K, CHUNK = 8, 256, 64, 4096, 20, 256


class LargestOutput(TorchDispatchMode):
    """Records the largest storage (in float32 elements: bytes / 4) among the outputs of every operator run
    under it."""

    def __init__(self):
        super().__init__()
        self.elements, self.operator, self.operators = 0, None, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.operators.add(func.overloadpacket.__name__)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() // 4 > self.elements:
                self.elements, self.operator = t.untyped_storage().nbytes() // 4, str(func)
        return out


def make_inputs() -> dict:
    """A padded batch of 8 x 256 = 2048 tokens, most of them valid, with top-K inputs as a rollout gives them."""
    g = torch.Generator().manual_seed(0)
    shape = (BATCH, WIDTH)
    start = torch.randint(0, VOCAB, shape + (1,), generator=g)
    return dict(hidden=torch.randn(shape + (SIZE,), generator=g), weight=0.25 * torch.randn(VOCAB, SIZE, generator=g),
                bias=0.1 * torch.randn(VOCAB, generator=g), input_ids=torch.randint(0, VOCAB, shape, generator=g),
                old_log_prob=-3 * torch.rand(shape, generator=g), advantages=torch.randn(BATCH, generator=g),
                response_mask=torch.rand(shape, generator=g) < 0.9,
                rollout_topk_ids=(start + 37 * torch.arange(K)) % VOCAB,
                rollout_topk_log_probs=torch.full(shape + (K,), -4.0))


def largest_output(backend: str, device: str, **kwargs) -> LargestOutput:
    """Forward + backward into hidden, weight and bias under the recording mode."""
    inputs = {k: v.to(device) for k, v in make_inputs().items()}
    head = [inputs.pop(name).requires_grad_(True) for name in ("hidden", "weight", "bias")]
    config = PolicyLossConfig(method="cppo", divergence="binary_tv")
    with LargestOutput() as record:
        loss, _ = policy_loss_from_hidden(head[0], head[1], **inputs, bias=head[2], config=config, backend=backend,
                                          temperature=0.9, **kwargs)
        torch.autograd.grad(loss, head)
    return record


def test_triton_path_holds_at_most_two_chunks_of_logits(device):
    record = largest_output("triton", device, chunk_size=CHUNK)
    assert "addmm" in record.operators  # the backward's weight-gradient GEMM ran under the mode
    assert CHUNK * VOCAB <= record.elements <= 2 * CHUNK * VOCAB, (record.elements, record.operator)
    materialized = largest_output("reference", device)
    assert materialized.elements >= BATCH * WIDTH * VOCAB, (materialized.elements, materialized.operator)
