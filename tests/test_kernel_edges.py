"""Edges of the fused path that the fuzz does not reach: packed offsets checked inside the kernel, the reduction
run by a one-program grid itself, a carried state that did not come from `cp_shard_state`, a NaN divergence
given from logits, double backward.

The kernels get CUDA tensors when a GPU is present, else they run on the CPU in the Triton interpreter (the
fixtures `device`, `backends` and `on_backend_device` come from tests/conftest.py); each check compares both
backends or states the exact expected values.
"""

import math

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels: triton exists for Linux only")

from ptr_kernels import PolicyLossConfig, policy_loss, policy_loss_from_logits  # noqa: E402
from ptr_kernels.benchmark.host import stubbed_triton_launches  # noqa: E402
from ptr_kernels.config import LOSS_AGG_MODES  # noqa: E402
from ptr_kernels.ops import reduce  # noqa: E402
from ptr_kernels.ops.plan import kernel_plan  # noqa: E402
from ptr_kernels.ops.runtime import forced_block_size, fused_forward, launch_state, scale_grad  # noqa: E402

def _packed(device, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, generator=g)
    return lp.to(device), (lp - 0.1).to(device), torch.randn(n, generator=g).to(device)


@pytest.mark.parametrize("offsets", [[2, 5, 12], [0, 5, 3, 12], [0, 5, 13], [0, 13, 12], [-1, 5, 12]])
@pytest.mark.parametrize("method", ["cppo", "dppo", "ppo"])
@pytest.mark.parametrize("block", [16, 1024])  # one program reducing its own sums; a program per sequence
def test_bad_offsets_checked_in_the_kernel_give_nan_everywhere(offsets, method, block, device):
    """The path an accelerator takes (no host-side check): loss, every metric and the whole gradient are NaN,
    and no position outside the tensors is read (the interpreter would raise)."""
    lp, olp, adv = _packed(device)
    plan = kernel_plan(PolicyLossConfig(method=method))
    cu = torch.tensor(offsets, device=device)
    with forced_block_size(block):
        loss, aux, grad = fused_forward(lp, olp, adv, None, cu, None, None, plan=plan, adv_per_seq=False,
                                        loss_scale_factor=0.0, normalizers=(1, None, None))
    assert math.isnan(loss.item())
    for name, index in reduce.METRIC_POSITIONS[method]:
        assert math.isnan(aux[index].item()), name
    out = scale_grad(grad, torch.ones((), device=device), aux, torch.float32)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("offsets,expected_nan", [([0, 3], True), ([1, 0], True), ([0, 0, 0], False), ([0], False)])
def test_offsets_of_a_packed_batch_without_tokens_are_checked_too(offsets, expected_nan, device):
    """N = 0: the kernel still runs over the sequences, so bad offsets give a NaN loss and metrics (good ones 0)."""
    empty = torch.empty(0, device=device)
    cu = torch.tensor(offsets, device=device)
    loss, aux, _ = fused_forward(empty, empty, empty, None, cu, None, None, plan=kernel_plan(PolicyLossConfig()),
                                 adv_per_seq=False, loss_scale_factor=0.0, normalizers=(1, None, None))
    assert math.isnan(loss.item()) == expected_nan and math.isnan(aux[1].item()) == expected_nan
    if not expected_nan:
        assert loss.item() == 0.0


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("normalizers", ["absent", "numbers", "tensors"])
def test_the_last_program_reduces_every_sum(agg, normalizers, device):
    """Block 16 puts all 5 sequences in one program, block 1024 gives a program per sequence, whose last to
    finish runs the reduction: one launch forward either way, one backward. Both give the reference's loss,
    metrics and gradient, for every aggregation mode and every kind of global normalizer."""
    g = torch.Generator().manual_seed(1)
    lp = (-torch.rand(5, 40, generator=g)).to(device)
    olp = lp + 0.2 * torch.randn(5, 40, generator=g).to(device)
    adv = torch.randn(5, generator=g).to(device)
    mask = (torch.rand(5, 40, generator=g) < 0.8).to(device)
    mask[3] = False  # an empty sequence
    counts = dict(dp_size=2, batch_num_tokens=300, global_batch_size=9)
    if normalizers == "absent":
        counts = {}
    elif normalizers == "tensors":
        counts = {k: torch.tensor(float(v), device=device) for k, v in counts.items()}
    config = PolicyLossConfig(loss_agg_mode=agg, delta=0.1, delta_b_quantile=0.5)
    results = []
    for block in (None, 16, 1024):
        x = lp.clone().requires_grad_(True)
        if block is None:
            loss, metrics = policy_loss(x, olp, adv, mask, config=config, backend="reference", **counts)
        else:
            with forced_block_size(block):
                loss, metrics = policy_loss(x, olp, adv, mask, config=config, backend="triton", **counts)
        loss.backward()
        results.append((loss.detach(), metrics, x.grad))
    expected_loss, expected_metrics, expected_grad = results[0]
    for loss, metrics, grad in results[1:]:
        torch.testing.assert_close(loss, expected_loss.float(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, expected_grad.float(), rtol=1e-5, atol=1e-7)
        assert metrics.keys() == expected_metrics.keys()
        for name, value in metrics.items():
            torch.testing.assert_close(value, expected_metrics[name].float(), rtol=1e-5, atol=1e-7)
    with stubbed_triton_launches() as launches:
        for block, expected in ((16, 2), (1024, 2)):  # forward and backward
            before = launches["launches"]
            x = lp.clone().requires_grad_(True)
            with forced_block_size(block):
                policy_loss(x, olp, adv, mask, config=config, backend="triton", **counts)[0].backward()
            assert launches["launches"] - before == expected


def test_good_offsets_in_the_kernel_match_the_reference(device):
    lp, olp, adv = _packed(device)
    cu = torch.tensor([0, 5, 5, 12], device=device)
    plan = kernel_plan(PolicyLossConfig())
    loss, aux, _ = fused_forward(lp, olp, adv, None, cu, None, None, plan=plan, adv_per_seq=False,
                                 loss_scale_factor=0.0, normalizers=(1, None, None))
    expected, _ = policy_loss(lp, olp, adv, cu_seqlens=cu, backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gate", ["hard", "soft"])
def test_any_carried_state_reads_the_same_on_both_backends(gate, backends, on_backend_device):
    """A state whose slack is not delta_b W - S (built with another delta_b, or by hand): the hard gate reads
    the carried slack, the soft gate S and W, on both backends."""
    g = torch.Generator().manual_seed(0)
    B, T = 3, 40
    olp = -torch.rand(B, T, generator=g) * 2
    lp = (olp + 0.3 * torch.randn(B, T, generator=g)).clamp(max=0).requires_grad_()
    adv, mask = torch.randn(B, generator=g), torch.rand(B, T, generator=g) > 0.1
    state = torch.tensor([[0.5, 1.0, 3.0], [-0.2, 0.4, 2.0], [0.0, 0.0, 0.0]])
    results = []
    for backend in backends:
        loss, metrics, final = policy_loss(*on_backend_device(backend, (lp, olp, adv, mask)),
                                           initial_state=on_backend_device(backend, state), output_final_state=True,
                                           backend=backend, delta_b_quantile=None, gate=gate)
        (grad,) = torch.autograd.grad(loss, lp)
        results.append((loss.cpu(), metrics["mask_frac"].cpu(), grad, final.cpu()))
    (loss_r, frac_r, grad_r, final_r), (loss_t, frac_t, grad_t, final_t) = results
    assert frac_r.item() > 0.1  # the states bind
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(frac_t, frac_r)
    torch.testing.assert_close(grad_t, grad_r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(final_t, final_r, rtol=1e-5, atol=1e-6)


def test_carried_state_with_calibrated_delta_b_needs_the_sequence_delta_b(backend, on_backend_device):
    lp = -torch.rand(2, 8)
    inputs = on_backend_device(backend, (lp, lp - 0.1, torch.ones(2)))
    initial_state = on_backend_device(backend, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sequence_delta_b"):
        policy_loss(*inputs, initial_state=initial_state, backend=backend)
    loss, _ = policy_loss(*inputs, initial_state=initial_state, backend=backend,
                          sequence_delta_b=on_backend_device(backend, torch.full((2,), 0.02)))
    assert math.isfinite(loss.item())


def _topk_case(nan_at=None):
    g = torch.Generator().manual_seed(0)
    B, T, V, K = 2, 6, 50, 4
    logits = torch.randn(B, T, V, generator=g)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    rollout = torch.randn(B, T, V, generator=g).log_softmax(-1)
    old_log_prob = rollout.gather(-1, input_ids[..., None])[..., 0]
    topk_log_probs, topk_ids = rollout.topk(K, dim=-1)
    if nan_at is not None:
        topk_log_probs[nan_at] = float("nan")
    return logits, input_ids, old_log_prob, torch.randn(B, generator=g), topk_ids, topk_log_probs


@pytest.mark.parametrize("method", ["cppo", "dppo", "ppo"])
def test_nan_in_the_rollout_topk_shows_in_the_loss(method, backends, on_backend_device):
    """A NaN Top-K divergence at a valid position is a NaN loss for the masked methods (ppo does not read D),
    on both backends, with the same metrics."""
    logits, ids, olp, adv, topk_ids, topk_lp = _topk_case(nan_at=(0, 2, 1))
    results = [policy_loss_from_logits(*on_backend_device(backend, (logits, ids, olp, adv)),
                                       rollout_topk_ids=on_backend_device(backend, topk_ids),
                                       rollout_topk_log_probs=on_backend_device(backend, topk_lp),
                                       divergence="topk_tv", method=method, backend=backend)
               for backend in backends]
    for loss, _ in results:
        assert math.isnan(loss.item()) == (method != "ppo")
    torch.testing.assert_close(results[1][1]["mask_frac"].cpu(), results[0][1]["mask_frac"])


def test_double_backward_raises_instead_of_returning_zero(device):
    lp = (-torch.rand(3, 5, device=device)).requires_grad_()
    loss, _ = policy_loss(lp, lp.detach() - 0.1, torch.randn(3, device=device), backend="triton")
    (grad,) = torch.autograd.grad(loss, lp, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.sum(), lp)


def test_second_backward_needs_retain_graph(device):
    """As with torch's own ops: without retain_graph a second backward raises (the saved gradient is freed);
    with it, the second backward adds the same gradient again."""
    lp = (-torch.rand(3, 5, device=device)).requires_grad_()
    loss, _ = policy_loss(lp, lp.detach() - 0.1, torch.randn(3, device=device), backend="triton")
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    lp.grad = None
    loss, _ = policy_loss(lp, lp.detach() - 0.1, torch.ones(3, device=device), backend="triton")
    loss.backward(retain_graph=True)
    first = lp.grad.clone()
    loss.backward()
    torch.testing.assert_close(lp.grad, 2 * first)


@pytest.mark.parametrize("divergence", ["binary_tv", "topk_kl"])
def test_from_logits_takes_the_carried_state(divergence, backends, on_backend_device):
    """A shard through `policy_loss_from_logits`: both backends agree on loss, gradient and final state, and
    with a binary divergence they equal `policy_loss` on the gathered log-probs with the same state."""
    logits, ids, olp, adv, topk_ids, topk_lp = _topk_case()
    B, T = ids.shape
    shard = dict(initial_state=torch.tensor([[0.05, 0.3, 2.0], [-0.01, 0.2, 1.5]]),
                 position_offset=torch.tensor([3, 7]), sequence_length=torch.tensor([12, 20]),
                 sequence_delta_b=torch.tensor([0.02, 0.03]), output_final_state=True)
    results = []
    for backend in backends:
        lg = logits.clone().requires_grad_()
        loss, metrics, final = policy_loss_from_logits(
            *on_backend_device(backend, (lg, ids, olp, adv)), rollout_topk_ids=on_backend_device(backend, topk_ids),
            rollout_topk_log_probs=on_backend_device(backend, topk_lp), divergence=divergence, delta=0.05,
            backend=backend, **on_backend_device(backend, shard))
        (grad,) = torch.autograd.grad(loss, lg)
        results.append((loss.cpu(), metrics["mask_frac"].cpu(), grad, final.cpu()))
    (loss_r, frac_r, grad_r, final_r), (loss_t, frac_t, grad_t, final_t) = results
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(frac_t, frac_r)
    torch.testing.assert_close(grad_t, grad_r.to(grad_t.dtype), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(final_t, final_r, rtol=1e-5, atol=1e-6)
    if divergence.startswith("binary"):
        log_prob = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
        loss_token, _, final_token = policy_loss(log_prob, olp, adv, divergence=divergence, delta=0.05,
                                                 backend="reference", **shard)
        torch.testing.assert_close(loss_r, loss_token.to(loss_r.dtype), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(final_r, final_token.to(final_r.dtype), rtol=1e-5, atol=1e-6)


def test_the_loss_is_a_tensor_of_its_own(device):
    """The loss may be changed in place before backward (`loss /= accumulation_steps`), as a torch op's result."""
    g = torch.Generator().manual_seed(3)
    lp = (-torch.rand(3, 9, generator=g)).to(device).requires_grad_(True)
    olp = lp.detach() + 0.1
    loss, _ = policy_loss(lp, olp, torch.ones(3, device=device), config=PolicyLossConfig(), backend="triton")
    expected = torch.autograd.grad(loss, lp, retain_graph=True)[0] / 4
    loss /= 4
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter's launches (CPU tensors)")
def test_a_launch_stopped_part_way_does_not_poison_the_next():
    """In the interpreter a launch can stop part-way (an exception, Ctrl-C) and leave the program counter
    non-zero (the launch state: counts, ticket, flags); the next call starts from zero again."""
    state = launch_state(torch.device("cpu"), 1)
    state.fill_(7)
    lp = -torch.rand(2, 5)
    loss, _ = policy_loss(lp, lp - 0.1, torch.ones(2), config=PolicyLossConfig(), backend="triton")
    ref, _ = policy_loss(lp, lp - 0.1, torch.ones(2), backend="reference")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    assert not state.any()
