"""`policy_loss_from_hidden`: both backends against the float64 chain-rule oracle (logits = h W^T + b, then the
from-logits oracle, then G W, G^T h and the column sums of G), reduced precision, chunking, masked and empty
input, frozen parts of the head, and errors."""

import math

import pytest
import torch

from ptr_kernels import PolicyLossConfig, policy_loss_from_hidden, policy_loss_from_logits
from ptr_kernels.testing.hidden_cases import policy_loss_from_hidden_literal, random_hidden_case, rounding_bound
from ptr_kernels.testing.logits_cases import cast

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf * 0 in discarded lanes
HEAD = ("hidden", "weight", "bias")


def run(case: dict, backend: str, **kwargs):
    """(loss, metrics as floats, {name: gradient}) of one call; hidden, weight and bias (when given) are
    leaves that require a gradient."""
    case = dict(case)
    head = {name: case.pop(name).detach().clone().requires_grad_(True) for name in HEAD if case[name] is not None}
    case.pop("bias", None)
    loss, metrics = policy_loss_from_hidden(head["hidden"], head["weight"], **case, bias=head.get("bias"),
                                            backend=backend, **kwargs)
    loss.backward()
    return loss.detach(), {k: v.item() for k, v in metrics.items()}, {k: v.grad for k, v in head.items()}


def assert_matches_oracle(loss, metrics, grads, lit, *, rtol: float):
    """Loss and metrics to `rtol` (relative to the size of the loss's terms, to 1 for metrics); each gradient
    to `rtol` relative to its largest entry."""
    assert abs(loss.item() - lit.loss) <= rtol * max(lit.loss_magnitude, 1e-30), (loss.item(), lit.loss)
    assert metrics.keys() == lit.metrics.keys()
    for key, value in lit.metrics.items():
        assert abs(metrics[key] - value) <= rtol * max(1.0, abs(value)), (key, metrics[key], value)
    expected = dict(hidden=lit.grad_hidden, weight=lit.grad_weight, bias=lit.grad_bias)
    for name, grad in grads.items():
        want = expected[name]
        assert grad.shape == want.shape
        torch.testing.assert_close(grad.double().cpu(), want, rtol=rtol, atol=rtol * want.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def make_config(method, divergence, layout):
    return PolicyLossConfig(method=method, divergence=divergence, delta=0.1, delta_b_quantile=0.5,
                            loss_agg_mode="seq-mean-token-mean" if layout == "packed" else "token-mean")


# (method, divergence, layout, bias, vocab, K, temperature, chunk_size): every method, Top-K and binary
# divergences, both layouts, with and without bias, temperature != 1, chunks of 1 token, of a few tokens
# (the last one short), the default (one chunk here)
TRITON_CASES = [
    ("cppo", "topk_tv", "padded", True, 64, 4, 0.8, 5),
    ("cppo", "topk_kl", "packed", False, 100, 20, 1.0, None),
    ("cppo", "binary_tv", "packed", True, 48, 4, 1.3, 7),
    ("dppo", "topk_tv", "packed", True, 80, 1, 1.0, 1),
    ("dppo", "binary_kl", "padded", False, 64, 4, 0.7, 6),
    ("ppo", "topk_kl", "padded", True, 50, 4, 1.2, 4),
    ("ppo", "binary_tv", "packed", False, 64, 4, 1.0, None),
]


@pytest.mark.parametrize("method,divergence,layout,bias,vocab,k,temperature,chunk_size", TRITON_CASES)
def test_triton_matches_oracle(method, divergence, layout, bias, vocab, k, temperature, chunk_size, device):
    """The chunked Triton path (float32) equals the float64 oracle: loss, every metric (entropy included) and
    the gradients into hidden, weight and bias, with NaN hidden states and garbage at masked positions."""
    config = make_config(method, divergence, layout)
    case = random_hidden_case(vocab + k, layout=layout, vocab=vocab, k=k, temperature=temperature, config=config,
                              bias=bias)
    lit = policy_loss_from_hidden_literal(**case)
    assert 0 < lit.metrics["mask_frac"] or divergence.startswith("binary")  # the trust region bites
    loss, metrics, grads = run(cast(case, torch.float32, device), "triton", chunk_size=chunk_size)
    assert all(g.dtype == torch.float32 for g in grads.values()) and ("bias" in grads) == bias
    assert_matches_oracle(loss, metrics, grads, lit, rtol=1e-5)


@pytest.mark.parametrize("options", [
    dict(gate="soft", loss_agg_mode="token-mean", dp_size=2, batch_num_tokens=40),
    dict(surrogate="logp", loss_agg_mode="seq-mean-token-sum", global_batch_size=5, length_mode="padded"),
])
def test_triton_options_match_oracle(options, device):
    """The options of the token path go through unchanged: the soft gate, the logp surrogate, rollout
    importance weights, global normalizers, another aggregation and horizon."""
    options = dict(options)
    normalizers = {k: options.pop(k) for k in ("dp_size", "batch_num_tokens", "global_batch_size") if k in options}
    config = PolicyLossConfig(method="cppo", divergence="topk_tv", delta=0.1, delta_b_quantile=0.5, **options)
    case = random_hidden_case(21, layout="packed", vocab=48, k=4, temperature=1.1, config=config)
    weights = torch.rand(case["input_ids"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    case.update(rollout_is_weights=weights + 0.5, **normalizers)
    lit = policy_loss_from_hidden_literal(**case)
    assert 0 < lit.metrics["mask_frac"] < 1
    loss, metrics, grads = run(cast(case, torch.float32, device), "triton", chunk_size=6)
    assert_matches_oracle(loss, metrics, grads, lit, rtol=1e-5)


@pytest.mark.parametrize("method,divergence,layout,rows", [
    ("cppo", "topk_tv", "padded", "random"), ("cppo", "topk_kl", "packed", "peaked"),
    ("dppo", "topk_tv", "padded", "peaked"), ("ppo", "binary_kl", "packed", "random"),
    ("cppo", "binary_tv", "padded", "random"),
])
def test_reference_matches_oracle(method, divergence, layout, rows):
    """The float64 reference (materialized logits + the from-logits reference, by autograd) equals the oracle
    to float64 rounding, with probabilities near 0 and 1 ("peaked": a bias of 12 on one token)."""
    config = make_config(method, divergence, layout)
    case = random_hidden_case(7, layout=layout, vocab=40, k=4, temperature=0.9, config=config, rows=rows)
    lit = policy_loss_from_hidden_literal(**case)
    loss, metrics, grads = run(case, "reference")
    assert loss.dtype == torch.float64
    assert_matches_oracle(loss, metrics, grads, lit, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_reduced_precision(dtype, device):
    """bf16 / fp16 head: float32 logits from the half operands, so the loss and metrics are float32-exact on
    the rounded inputs; the gradients come back in the dtype, off the oracle by at most the rounding of the
    logits' gradient to the dtype and of the result (`hidden_cases.rounding_bound`)."""
    config = PolicyLossConfig(method="cppo", divergence="topk_tv", delta=0.1)
    case = cast(cast(random_hidden_case(11, vocab=96, k=20, temperature=0.9, config=config), dtype), torch.float64)
    lit = policy_loss_from_hidden_literal(**case)
    loss, metrics, grads = run(cast(case, dtype, device), "triton", chunk_size=8)
    assert all(g.dtype == dtype for g in grads.values()) and len(grads) == 3
    assert_matches_oracle(loss, metrics, {}, lit, rtol=1e-5)
    bounds = rounding_bound(lit, case, dtype)
    expected = dict(hidden=lit.grad_hidden, weight=lit.grad_weight, bias=lit.grad_bias)
    for name, grad in grads.items():
        error = (grad.double().cpu() - expected[name]).abs()
        assert (error <= bounds[name] + 1e-7 * expected[name].abs().max()).all(), name


def test_chunk_sizes_agree(device):
    """One chunk per token, chunks that do not divide N and one chunk for all: the same loss and gradients
    up to float32 summation order."""
    config = make_config("cppo", "topk_tv", "packed")
    case = cast(random_hidden_case(5, layout="packed", vocab=32, k=4, config=config), torch.float32, device)
    results = [run(case, "triton", chunk_size=chunk) for chunk in (1, 3, 1000)]
    for loss, metrics, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=0)
        assert metrics == pytest.approx(results[0][1], rel=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][2][name], rtol=1e-5, atol=1e-7)


def test_frozen_parts_of_the_head(device):
    """Only what requires a gradient gets one (a frozen head: only hidden; frozen hidden: only the head),
    with the same values as when everything trains."""
    config = make_config("dppo", "topk_tv", "padded")
    case = cast(random_hidden_case(2, vocab=32, k=4, config=config), torch.float32, device)
    _, _, full = run(case, "triton", chunk_size=4)
    rest = {k: v for k, v in case.items() if k not in HEAD}
    for trained in (("hidden",), ("weight", "bias")):
        head = {name: case[name].clone().requires_grad_(name in trained) for name in HEAD}
        loss, _ = policy_loss_from_hidden(head["hidden"], head["weight"], **rest, bias=head["bias"],
                                          backend="triton", chunk_size=4)
        grads = torch.autograd.grad(loss, [head[name] for name in trained])
        for name, grad in zip(trained, grads):
            torch.testing.assert_close(grad, full[name], rtol=0, atol=0)


def test_gemm_flops(device):
    """The recompute costs one GEMM more than a materialized head: 4 x 2 N V H flops for forward + backward
    (the chunk GEMM, its recompute, grad_hidden, grad_W) against 3 x; 3 x here too when the head is frozen."""
    from torch.utils.flop_counter import FlopCounterMode

    config = make_config("cppo", "topk_tv", "padded")
    case = cast(random_hidden_case(3, vocab=32, k=4, hidden_size=8, config=config), torch.float32, device)
    rest = {k: v for k, v in case.items() if k not in HEAD}
    hidden, weight = case["hidden"].clone().requires_grad_(True), case["weight"].clone().requires_grad_(True)
    one_gemm = 2 * case["input_ids"].numel() * weight.shape[0] * weight.shape[1]

    def gemms(trained, head):
        with FlopCounterMode(display=False) as counter:
            torch.autograd.grad(head(), trained)
        return counter.get_total_flops() / one_gemm

    def chunked(w):
        return policy_loss_from_hidden(hidden, w, **rest, bias=case["bias"], backend="triton", chunk_size=5)[0]

    def materialized():
        logits = hidden @ weight.t() + case["bias"]
        return policy_loss_from_logits(logits, **rest, backend="triton")[0]

    assert gemms([hidden, weight], lambda: chunked(weight)) == 4
    assert gemms([hidden], lambda: chunked(weight.detach())) == 3
    assert gemms([hidden, weight], materialized) == 3


def test_masked_and_empty(device):
    """Nothing valid (everything masked, or no token at all): loss, metrics and gradients 0, never NaN, though
    the masked hidden states are NaN; a NaN hidden state at a valid position shows in the loss and the entropy."""
    config = PolicyLossConfig(divergence="topk_tv")
    case = random_hidden_case(2, vocab=32, k=4, config=config)
    assert case["hidden"].isnan().any()
    empty = dict(case, response_mask=torch.zeros_like(case["response_mask"]))
    poisoned = dict(case, hidden=case["hidden"].clone())
    b, t = case["response_mask"].nonzero()[0].tolist()
    poisoned["hidden"][b, t, 3] = float("nan")
    for backend in ("reference", "triton"):
        loss, metrics, grads = run(cast(empty, torch.float32, device), backend, chunk_size=4)
        assert loss.item() == 0 and all(v == 0 for v in metrics.values())
        assert all((g == 0).all() for g in grads.values())
        loss, metrics, _ = run(cast(poisoned, torch.float32, device), backend, chunk_size=4)
        assert math.isnan(loss.item()) and math.isnan(metrics["entropy"])
        nothing = dict(hidden=torch.zeros(0, 8), weight=torch.randn(16, 8), bias=None,
                       input_ids=torch.zeros(0, dtype=torch.long), old_log_prob=torch.zeros(0),
                       advantages=torch.zeros(0), cu_seqlens=torch.zeros(1, dtype=torch.int32))
        loss, metrics, grads = run(cast(nothing, torch.float32, device), backend)  # zero-length packed input
        assert loss.item() == 0 and all(v == 0 for v in metrics.values()) and (grads["weight"] == 0).all()


def test_torch_compile_runs_the_chunks_eagerly(device):
    """Inside torch.compile the Triton path runs eagerly (a graph break around its chunk loop): the same loss
    and gradient as an eager call."""
    case = cast(random_hidden_case(4, vocab=24, k=4, config=make_config("cppo", "topk_kl", "padded")), torch.float32,
                device)
    loss, _, grads = run(case, "triton", chunk_size=4)
    rest = {k: v for k, v in case.items() if k != "hidden"}
    hidden = case["hidden"].clone().requires_grad_(True)
    compiled = torch.compile(lambda h: policy_loss_from_hidden(h, **rest, backend="triton", chunk_size=4)[0],
                             backend="aot_eager")
    compiled_loss = compiled(hidden)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss.detach(), loss, rtol=0, atol=0)
    torch.testing.assert_close(hidden.grad, grads["hidden"], rtol=0, atol=0)


def _errors_case():
    case = cast(random_hidden_case(9, vocab=16, k=4, config=PolicyLossConfig(divergence="topk_tv")), torch.float32)
    case["response_mask"][0, 0] = True  # the position the changes hit is valid
    case["hidden"][0, 0] = 0.0
    case["input_ids"][0, 0] = 1
    return case


@pytest.mark.parametrize("change,match", [
    (lambda c: c.update(hidden=c["hidden"][0]), r"hidden has shape .* \[B, T, H\]"),
    (lambda c: c.update(hidden=c["hidden"].long()), "hidden must be a float16"),
    (lambda c: c.update(weight=c["weight"][:, 1:]), r"weight has shape \(16, 15\), expected \[V, H = 16\]"),
    (lambda c: c.update(weight=c["weight"][0]), "weight has shape"),
    (lambda c: c.update(weight=c["weight"].double()), "weight is torch.float64 but hidden is torch.float32"),
    (lambda c: c.update(weight=c["weight"].to("meta")), "weight is on meta"),
    (lambda c: c.update(bias=c["bias"][1:]), r"bias has shape \(15,\), expected \[V = 16\]"),
    (lambda c: c.update(bias=c["bias"].half()), "bias is torch.float16"),
    (lambda c: c.update(chunk_size=0), "chunk_size=0"),
    (lambda c: c.update(chunk_size=2.0), "chunk_size=2.0"),
    (lambda c: c.update(chunk_size=True), "chunk_size=True"),
    (lambda c: c.update(input_ids=c["input_ids"][:, 1:]), "input_ids has shape"),
    (lambda c: c["input_ids"].__setitem__((0, 0), 16), "input_ids must lie in"),
    (lambda c: c.update(old_log_prob=c["old_log_prob"][:, 1:]), r"old_log_prob has shape .* = hidden.shape\[:-1\]"),
    (lambda c: c["rollout_topk_ids"].__setitem__((0, 0, 1), 16), "rollout_topk_ids must lie in"),
    (lambda c: c.update(rollout_topk_ids=None, rollout_topk_log_probs=None), "needs rollout_topk_ids"),
    (lambda c: c.update(temperature=0.0), "temperature=0.0"),
    (lambda c: c.update(backend="cuda"), "backend='cuda'"),
])
def test_errors_name_the_argument(change, match):
    case = _errors_case()
    case.setdefault("backend", "reference")
    change(case)
    with pytest.raises(ValueError, match=match):
        policy_loss_from_hidden(**case)
