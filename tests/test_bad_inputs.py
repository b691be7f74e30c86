"""Unusual and bad inputs found by a sweep over both backends: each is a ValueError naming the argument, or the
same result on both backends (the Triton kernel on CUDA tensors when a GPU is present, else in the interpreter on
CPU; the fixtures `backends` and `on_backend_device` come from conftest.py)."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels: triton exists for Linux only")

from ptr_kernels import PolicyLoss, PolicyLossConfig, policy_loss, policy_loss_from_logits  # noqa: E402
from ptr_kernels.distributed import global_counts  # noqa: E402

def _padded():
    g = torch.Generator().manual_seed(0)
    olp = -torch.rand(3, 5, generator=g)
    lp = (olp + 0.2 * torch.randn(3, 5, generator=g)).clamp(max=0)
    return lp, olp, torch.randn(3, generator=g), torch.arange(5) < torch.tensor([[5], [3], [1]])


@pytest.mark.parametrize("args, kwargs, match", [
    ((torch.ones(4), torch.tensor([0, 3, 5])), {}, "cu_seqlens"),
    ((torch.ones(2, 3), torch.tensor([0, 3, 6])), {}, "response_mask"),
    (([[1, 0]],), {}, "response_mask"),
    ((np.ones((2, 2)),), {}, "response_mask"),
    ((), dict(cu_seqlens=[0, 3, 5]), "cu_seqlens"),
    ((), dict(cu_seqlens=torch.tensor([0, 5, 3])), "cu_seqlens"),
    ((torch.ones(5),), dict(cu_seqlens=torch.tensor([1, 3, 5])), "cu_seqlens"),
    ((), dict(cu_seqlens=torch.zeros(2, 2, dtype=torch.int64)), "cu_seqlens"),
    ((), dict(cu_seqlens=torch.tensor([0.0, 3.0])), "cu_seqlens"),
    ((torch.ones(2, 2, dtype=torch.complex64),), {}, "response_mask"),
])
def test_global_counts_validates_its_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        global_counts(*args, **kwargs)


def test_global_counts_without_a_process_group():
    assert [int(c) for c in global_counts(torch.tensor([1, 0, 1, 1, 0]), torch.tensor([0, 2, 5]))] == [3, 2, 1]
    assert [int(c) for c in global_counts(cu_seqlens=torch.tensor([0, 2, 2, 5]))] == [5, 2, 1]
    assert [int(c) for c in global_counts(torch.tensor([[1, 0], [0, 0]]))] == [1, 1, 1]


def test_a_padded_mask_with_cu_seqlens_asks_for_one_layout():
    lp, olp, adv, mask = _padded()
    cu_seqlens = torch.tensor([0, 5, 8, 9])
    packed = lp[mask]
    with pytest.raises(ValueError, match=r"response_mask has shape \(3, 5\), but cu_seqlens makes the input packed, "
                                         r"log_prob \(9,\): give one layout"):
        policy_loss(packed, olp[mask], adv, mask, cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match=r"with cu_seqlens the input is packed \[N\]; padded \[B, T\] input takes "
                                         "response_mask instead of cu_seqlens"):
        policy_loss(lp, olp, adv, mask, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["log_prob", "old_log_prob"])
@pytest.mark.parametrize("method", ["cppo", "dppo", "ppo"])
def test_a_non_finite_log_prob_gives_the_same_gradient_on_both_backends(value, where, method, backends,
                                                                         on_backend_device):
    """NaN loss on both; the diverged token's gradient is NaN on both (not 0 on one and NaN on the other)."""
    grads = []
    for backend in backends:
        lp, olp, adv, mask = _padded()
        (lp if where == "log_prob" else olp)[0, 1] = value
        lp.requires_grad_()
        loss, _ = policy_loss(*on_backend_device(backend, (lp, olp, adv, mask)), backend=backend, method=method)
        loss.backward()
        assert math.isnan(loss.item())
        grads.append(lp.grad)
    assert torch.isnan(grads[0][0, 1]) and torch.isnan(grads[1][0, 1])
    assert torch.equal(grads[0].isnan(), grads[1].isnan())
    torch.testing.assert_close(grads[1].nan_to_num(), grads[0].nan_to_num(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", ["state_nan", "state_inf", "delta_b_nan", "delta_b_inf"])
@pytest.mark.parametrize("gate", ["hard", "soft"])
def test_a_non_finite_carried_state_shows_in_the_loss(bad, gate, backends, on_backend_device):
    state = torch.zeros(3, 3)
    delta_b = torch.tensor([0.02, 0.03, 0.01])
    value = math.nan if bad.endswith("nan") else math.inf
    if bad.startswith("state"):
        state[0] = value
    else:
        delta_b[0] = value
    results = []
    for backend in backends:
        inputs = on_backend_device(backend, _padded())
        loss, metrics = policy_loss(*inputs, **on_backend_device(backend, dict(initial_state=state,
                                                                                sequence_delta_b=delta_b)),
                                    gate=gate, backend=backend)
        assert math.isnan(loss.item())
        results.append(metrics["mask_frac"].cpu())
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("name", ["dp_size", "global_batch_size", "batch_num_tokens"])
def test_tensor_normalizers_get_no_gradient(name, backends, on_backend_device):
    for backend in backends:
        lp = (-torch.rand(3, 5)).requires_grad_()
        count = torch.tensor(4.0, requires_grad=True)
        loss, _ = policy_loss(*on_backend_device(backend, (lp, lp.detach() - 0.1, torch.ones(3))), backend=backend,
                              loss_agg_mode="seq-mean-token-sum" if name != "batch_num_tokens" else "token-mean",
                              **{name: on_backend_device(backend, count)})
        loss.backward()
        assert count.grad is None and lp.grad is not None


def test_numbers_of_any_real_type_in_the_config(backends, on_backend_device):
    """A large Python int or a numpy scalar is a number like any other: the same loss on both backends."""
    lp = -torch.rand(3, 5)
    assert PolicyLossConfig(delta=1).delta == 1.0 and type(PolicyLossConfig(delta=1).delta) is float
    for overrides in (dict(delta=2 ** 64), dict(delta=np.float32(0.2), dp_size=np.int64(2)),
                      dict(method="dppo", delta_high=2 ** 70, log_ratio_clamp=10 ** 30)):
        losses = [policy_loss(*on_backend_device(b, (lp, lp - 0.1, torch.ones(3))), backend=b, **overrides)[0].cpu()
                  for b in backends]
        torch.testing.assert_close(losses[1], losses[0])


def test_policy_loss_module_keeps_its_config_and_backend(device):
    lp = -torch.rand(3, 5, device=device)
    for kwargs in (dict(config=PolicyLossConfig()), dict(backend="triton")):
        with pytest.raises(ValueError, match="PolicyLoss fixes"):
            PolicyLoss()(lp, lp - 0.1, torch.ones(3, device=device), **kwargs)


def test_meta_tensors_with_the_kernel_are_a_value_error():
    lp = torch.empty(3, 5, device="meta")
    with pytest.raises(ValueError, match="backend='triton'"):
        policy_loss(lp, lp, torch.empty(3, device="meta"), backend="triton")


@pytest.mark.parametrize("temperature", [1e-45, 1e-39])
def test_subnormal_temperature_is_rejected(temperature):
    with pytest.raises(ValueError, match="temperature"):
        policy_loss_from_logits(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), -torch.rand(2, 3),
                                torch.ones(2), temperature=temperature)


@pytest.mark.parametrize("gate", ["hard", "soft"])
def test_a_zero_advantage_contributes_zero_even_with_a_nan_budget(gate, backends, on_backend_device):
    """The zero-advantage rule holds where only the budget is NaN (the token's own inputs are finite), on both
    backends; a nonzero advantage in the same row shows the NaN."""
    lp, olp, _, mask = _padded()
    state = torch.zeros(3, 3)
    state[1] = math.nan
    for advantages, expect_nan in ((torch.zeros(3), False), (torch.tensor([0.0, 1.0, 0.0]), True)):
        for backend in backends:
            log_prob = lp.clone().requires_grad_()
            inputs = on_backend_device(backend, (log_prob, olp, advantages, mask))
            shard = on_backend_device(backend, dict(initial_state=state, sequence_delta_b=torch.full((3,), 0.02)))
            loss, _ = policy_loss(*inputs, **shard, gate=gate, backend=backend)
            assert math.isnan(loss.item()) == expect_nan, (backend, advantages)
            if not expect_nan:
                loss.backward()
                assert loss.item() == 0.0 and torch.equal(log_prob.grad, torch.zeros_like(lp))


@pytest.mark.parametrize("method", ["cppo", "dppo", "ppo"])
def test_gradients_agree_around_nan_log_ratios_and_weights(method, backends, on_backend_device):
    """A zero-advantage token with a NaN log-prob, and a token with a NaN rollout weight whatever its path (kept,
    clipped or rejected, A = 0), have a NaN gradient on both backends; the loss is NaN in every case."""
    cases = [dict(lp=[[-1.0, math.nan, -1.0]], adv=[[1.0, 0.0, 1.0]], rw=None),
             dict(lp=[[-1.0, -0.2, -1.0]], adv=[[1.0, 1.0, 0.0]], rw=[[1.0, math.nan, math.nan]])]
    for case in cases:
        grads = []
        for backend in backends:
            lp = torch.tensor(case["lp"]).requires_grad_()
            rw = None if case["rw"] is None else torch.tensor(case["rw"])
            inputs = on_backend_device(backend, (lp, torch.tensor([[-1.1, -1.0, -0.9]]), torch.tensor(case["adv"])))
            loss, _ = policy_loss(*inputs, backend=backend, method=method,
                                  rollout_is_weights=on_backend_device(backend, rw))
            loss.backward()
            assert math.isnan(loss.item())
            grads.append(lp.grad)
        assert torch.equal(grads[0].isnan(), grads[1].isnan()), (case, grads)
        torch.testing.assert_close(grads[1].nan_to_num(), grads[0].nan_to_num(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["cppo", "dppo", "ppo"])
def test_an_infinite_initial_state_reads_as_nan_on_both_backends(method, backends, on_backend_device):
    lp = -torch.rand(1, 3)
    shard = dict(initial_state=torch.tensor([[math.inf, 0.0, 1.0]]), sequence_delta_b=torch.tensor([0.02]))
    finals = [policy_loss(*on_backend_device(b, (lp, lp, torch.ones(1))), backend=b, method=method,
                          output_final_state=True, **on_backend_device(b, shard))[2].cpu() for b in backends]
    assert torch.equal(finals[0].isnan(), finals[1].isnan()) and finals[0][0, 0].isnan()
