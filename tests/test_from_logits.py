"""`policy_loss_from_logits`: the Triton path (interpreter on CPU) against the float64 reference, the reference
against the literal oracle, the from-logits path against the token path, inplace gradients, errors, and the
vocabulary kernels compiled ahead of time for sm_90."""

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels: triton exists for Linux only")

from ptr_kernels import PolicyLossConfig, policy_loss, policy_loss_from_logits  # noqa: E402
from ptr_kernels.reference.logits import topk_divergence  # noqa: E402
from ptr_kernels.testing.logits_cases import cast, random_logits_case  # noqa: E402
from ptr_kernels.testing.oracle_logits import policy_loss_from_logits_literal  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf * 0 in discarded lanes


def run(case: dict, backend: str, **kwargs):
    """(loss, metrics as floats, d loss / d logits) of one call."""
    case = dict(case)
    logits = case.pop("logits").clone().requires_grad_(True)
    loss, metrics = policy_loss_from_logits(logits, **case, backend=backend, **kwargs)
    loss.backward()
    return loss.detach(), {k: v.item() for k, v in metrics.items()}, logits.grad


def assert_metrics_close(actual: dict, expected: dict, atol: float):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert abs(actual[key] - expected[key]) <= atol * max(1.0, abs(expected[key])), (key, actual[key], expected[key])


# (method, divergence, layout, vocab, K, temperature): every method, divergence and layout; V 16..4096;
# K 1, 4, 20; temperature 1 and not 1
TRITON_CASES = [
    ("cppo", "topk_tv", "padded", 64, 4, 1.0),
    ("cppo", "topk_tv", "packed", 1000, 20, 0.7),
    ("cppo", "topk_kl", "padded", 16, 1, 1.3),
    ("cppo", "topk_kl", "packed", 4096, 20, 1.0),
    ("cppo", "binary_tv", "packed", 128, 4, 0.6),
    ("dppo", "topk_tv", "packed", 300, 1, 1.0),
    ("dppo", "topk_kl", "padded", 257, 20, 0.8),
    ("dppo", "binary_kl", "padded", 64, 4, 1.0),
    ("ppo", "topk_tv", "padded", 32, 20, 1.0),
    ("ppo", "binary_tv", "packed", 500, 1, 1.5),
]


@pytest.mark.parametrize("method,divergence,layout,vocab,k,temperature", TRITON_CASES)
def test_triton_matches_reference(method, divergence, layout, vocab, k, temperature, device):
    """Loss, every metric (entropy included) and the logits gradient of the fused path equal the float64
    reference's, with masked positions full of garbage (NaN logits, ids -100, repeated top-K ids)."""
    config = PolicyLossConfig(method=method, divergence=divergence, delta=0.1, delta_b_quantile=0.5,
                              delta_b_quantile_scale=0.75,
                              loss_agg_mode="seq-mean-token-mean" if layout == "packed" else "token-mean")
    case = random_logits_case(vocab + k, layout=layout, vocab=vocab, k=k, temperature=temperature, config=config)
    ref_loss, ref_metrics, ref_grad = run(cast(case, torch.float64), "reference")
    loss, metrics, grad = run(cast(case, torch.float32, device), "triton")
    assert grad.dtype == torch.float32 and grad.shape == case["logits"].shape
    assert 0 < ref_metrics["mask_frac"] or method == "ppo" or divergence.startswith("binary")  # the mask bites
    torch.testing.assert_close(loss.double().cpu(), ref_loss.double(), rtol=1e-5, atol=1e-6)
    assert_metrics_close(metrics, ref_metrics, 1e-5)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-4, atol=1e-6 * ref_grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_reduced_precision_logits(dtype, device):
    """bf16 / fp16 logits: the gradient comes back in that dtype and matches the reference on the same
    (rounded) logits to the dtype's rounding."""
    config = PolicyLossConfig(method="cppo", divergence="topk_tv")
    case = random_logits_case(11, layout="padded", vocab=512, k=20, temperature=0.9, config=config)
    ref_loss, ref_metrics, ref_grad = run(cast(case, torch.float64, logits_dtype=dtype), "reference")
    loss, metrics, grad = run(cast(case, torch.float32, device, logits_dtype=dtype), "triton")
    assert grad.dtype == dtype
    torch.testing.assert_close(loss.double().cpu(), ref_loss.double(), rtol=1e-5, atol=1e-6)
    assert_metrics_close(metrics, ref_metrics, 1e-5)
    eps = torch.finfo(dtype).eps
    assert ref_grad.dtype == dtype
    ref_grad = ref_grad.double()
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=2 * eps, atol=1e-5 * ref_grad.abs().max().item())


@pytest.mark.parametrize("method,divergence,layout,k,temperature", [
    ("cppo", "topk_tv", "padded", 4, 0.7), ("cppo", "topk_kl", "packed", 20, 1.0),
    ("dppo", "topk_kl", "padded", 1, 1.0), ("ppo", "topk_tv", "packed", 4, 1.2),
    ("cppo", "binary_kl", "padded", 4, 1.0), ("dppo", "topk_tv", "packed", 20, 0.5),
])
def test_reference_matches_oracle(method, divergence, layout, k, temperature):
    """The vectorized float64 reference equals the token-by-token oracle: loss, metrics, logits gradient,
    with y_t both inside and outside the top-K and probabilities near 0 and 1 ("peaked" rows)."""
    config = PolicyLossConfig(method=method, divergence=divergence, delta=0.1)
    for rows in ("random", "peaked"):
        case = random_logits_case(k + 5, layout=layout, vocab=48, k=k, temperature=temperature, config=config,
                                  rows=rows)
        ids, topk_ids, valid = case["input_ids"], case["rollout_topk_ids"], case["response_mask"]
        inside = (topk_ids == ids[..., None]).any(-1)
        assert (inside & valid).any() and (~inside & valid).any()  # y_t inside and outside the top-K
        lit = policy_loss_from_logits_literal(**case)
        loss, metrics, grad = run(case, "reference")
        assert math.isclose(loss.item(), lit.loss, rel_tol=1e-9, abs_tol=1e-12)
        assert_metrics_close(metrics, lit.metrics, 1e-9)
        torch.testing.assert_close(grad, lit.grad, rtol=1e-9, atol=1e-12)


def test_topk_divergence_hand_computed():
    """One token, V = 4, K = 2 with y_t outside the top-K: TV and KL from the set {0, 1, y = 2} + other."""
    log_pi = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log()
    mu_top = torch.tensor([0.5, 0.2], dtype=torch.float64)
    args = (log_pi, torch.tensor(2), torch.tensor(0.25, dtype=torch.float64).log(), torch.tensor([0, 1]),
            mu_top.log())
    # mu: 0.5, 0.2, 0.25, other 0.05; pi: 0.4, 0.3, 0.2, other 0.1
    assert math.isclose(topk_divergence(*args, "topk_tv").item(), 0.5 * (0.1 + 0.1 + 0.05 + 0.05))
    kl = 0.5 * math.log(0.5 / 0.4) + 0.2 * math.log(0.2 / 0.3) + 0.25 * math.log(0.25 / 0.2) + 0.05 * math.log(0.5)
    assert math.isclose(topk_divergence(*args, "topk_kl").item(), kl, rel_tol=1e-12)
    # y_t inside the top-K: the set is the top-K alone; mu(y) comes from the top-K log-probs
    inside = (log_pi, torch.tensor(1), torch.tensor(-3.0, dtype=torch.float64), torch.tensor([0, 1]), mu_top.log())
    assert math.isclose(topk_divergence(*inside, "topk_tv").item(), 0.5 * (0.1 + 0.1 + 0.0))


@pytest.mark.parametrize("divergence,layout", [("topk_tv", "padded"), ("topk_kl", "packed"), ("binary_tv", "padded")])
def test_same_as_token_path(divergence, layout, device):
    """Given the same log_prob (gathered from log_softmax by autograd) and the same D, the token path
    (`ops.autograd.FusedPolicyLoss`, D given) and the from-logits path give the same loss and gradient."""
    from ptr_kernels.ops.autograd import apply_policy_loss
    from ptr_kernels.ops.plan import kernel_plan
    from ptr_kernels.validation import check_inputs

    config = PolicyLossConfig(method="cppo", divergence=divergence, delta=0.1, delta_b_quantile=0.5)
    case = cast(random_logits_case(3, layout=layout, vocab=200, k=4, temperature=0.8, config=config),
                torch.float32, device)
    loss, _, grad = run(case, "triton")

    logits = case["logits"].clone().requires_grad_(True)
    mask = case["response_mask"]
    ids = torch.where(mask, case["input_ids"], 0)
    log_pi = torch.log_softmax(torch.where(mask[..., None], logits, 0.0) / case["temperature"], dim=-1)
    log_prob = log_pi.gather(-1, ids[..., None])[..., 0]
    div = None
    if divergence.startswith("topk"):
        topk_ids = torch.where(mask[..., None], case["rollout_topk_ids"], 0)
        div = topk_divergence(log_pi.detach(), ids, case["old_log_prob"], topk_ids, case["rollout_topk_log_probs"],
                              divergence)
    layout_info = check_inputs(log_prob, case["old_log_prob"], case["advantages"], mask, case["cu_seqlens"],
                               config=config)
    options = dict(plan=kernel_plan(config), adv_per_seq=layout_info.adv_per_seq,
                   loss_scale_factor=layout_info.loss_scale_factor, normalizers=(1, None, None))
    token_loss = apply_policy_loss(log_prob, (case["old_log_prob"], case["advantages"], mask, case["cu_seqlens"],
                                              None, div), options, [])
    token_loss.backward()
    torch.testing.assert_close(loss, token_loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-5, atol=1e-7)


def test_compile_fullgraph_matches_eager(device):
    """`policy_loss_from_logits` inside torch.compile(fullgraph=True) (the custom op and its registered
    backward) gives the eager loss, metrics and logits gradient; the config built inside the compiled region
    (overrides). The three cases run in this order in one process: the shapes change between compiles, so
    Dynamo's automatic dynamic shapes trace the input checks with symbolic sizes from the second one on."""
    for divergence, layout, normalizer in (("topk_tv", "padded", "number"), ("topk_kl", "packed", "tensor"),
                                           ("binary_kl", "padded", "tensor")):
        config = PolicyLossConfig(method="cppo", divergence=divergence, delta=0.1, delta_b_quantile=0.5)
        case = cast(random_logits_case(7, layout=layout, vocab=50, k=4, temperature=0.9, config=config),
                    torch.float32, device)
        case.pop("config")
        logits = case.pop("logits")
        count = 40 if normalizer == "number" else torch.tensor(40.0, device=device)

        def step(x):
            return policy_loss_from_logits(x, **case, backend="triton", method="cppo", divergence=divergence,
                                           delta=0.1, delta_b_quantile=0.5, dp_size=2, batch_num_tokens=count)

        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        results = []
        for fn in (step, compiled):
            x = logits.clone().requires_grad_(True)
            loss, metrics = fn(x)
            loss.backward()
            results.append((loss.detach(), metrics, x.grad))
        (loss_e, met_e, grad_e), (loss_c, met_c, grad_c) = results
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=0)
        assert met_c.keys() == met_e.keys()
        for key in met_e:
            torch.testing.assert_close(met_c[key], met_e[key], rtol=1e-6, atol=0)


def test_compile_refuses_inplace_grad(device):
    case = cast(random_logits_case(2, vocab=30), torch.float32, device)
    logits = case.pop("logits").requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x):
        return policy_loss_from_logits(x, **case, backend="triton", inplace_grad=True)[0]

    with pytest.raises(Exception, match="inplace_grad"):
        step(logits)


def test_inplace_grad(device):
    """inplace_grad writes the same gradient into the logits buffer, bumps its version, and a graph that
    saved those logits for its own backward raises instead of using the overwritten values."""
    config = PolicyLossConfig(divergence="topk_kl")
    case = cast(random_logits_case(5, vocab=100, k=4, config=config), torch.float32, device)
    _, _, expected = run(case, "triton")

    source = case["logits"].clone().requires_grad_(True)
    logits = source * 1.0  # a non-leaf buffer, as a model's output
    other_use = (logits.nan_to_num() ** 2).sum()  # saves logits for its backward
    rest = {k: v for k, v in case.items() if k != "logits"}
    loss, _ = policy_loss_from_logits(logits, **rest, backend="triton", inplace_grad=True)
    version = logits._version
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    assert grad.data_ptr() == logits.data_ptr() and logits._version > version
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other_use.backward()


def test_masked_and_empty(backends, device):
    """Nothing valid: loss, metrics and gradient 0, never NaN (the garbage rows are not read); a NaN logit
    at a valid position shows in the loss."""
    case = random_logits_case(2, layout="padded", vocab=32, k=4, config=PolicyLossConfig(divergence="topk_tv"))
    empty = dict(case, response_mask=torch.zeros_like(case["response_mask"]))
    for backend in backends:
        loss, metrics, grad = run(cast(empty, torch.float32, device), backend)
        assert loss.item() == 0 and all(v == 0 for v in metrics.values()) and (grad == 0).all()
    poisoned = dict(case, logits=case["logits"].clone())
    b, t = case["response_mask"].nonzero()[0].tolist()
    poisoned["logits"][b, t, 3] = float("nan")
    for backend in backends:
        loss, metrics, _ = run(cast(poisoned, torch.float32, device), backend)
        assert math.isnan(loss.item()) and math.isnan(metrics["entropy"])


def test_policy_loss_rejects_topk():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs logits: use policy_loss_from_logits"):
        policy_loss(lp, lp, torch.ones(2), divergence="topk_tv")


def _errors_case():
    return cast(random_logits_case(9, vocab=16, k=4, config=PolicyLossConfig(divergence="topk_tv")), torch.float32)


@pytest.mark.parametrize("change,match", [
    (lambda c: c["rollout_topk_ids"].__setitem__((0, 0, 1), 16), "rollout_topk_ids must lie in"),
    (lambda c: c["rollout_topk_ids"].__setitem__((0, 0, 1), int(c["rollout_topk_ids"][0, 0, 0])), "distinct"),
    (lambda c: c["input_ids"].__setitem__((0, 0), -1), "input_ids must lie in"),
    (lambda c: c.update(rollout_topk_ids=c["rollout_topk_ids"][..., :0],
                        rollout_topk_log_probs=c["rollout_topk_log_probs"][..., :0]), "K = 0"),
    (lambda c: c.update(rollout_topk_ids=None, rollout_topk_log_probs=None), "needs rollout_topk_ids"),
    (lambda c: c.update(rollout_topk_log_probs=c["rollout_topk_log_probs"][..., :2]), "rollout_topk_log_probs has"),
    (lambda c: c.update(input_ids=c["input_ids"][:, 1:]), "input_ids has shape"),
    (lambda c: c.update(old_log_prob=c["old_log_prob"][:, 1:]), "old_log_prob has shape"),
    (lambda c: c.update(logits=c["logits"][0]), "logits has shape"),
    (lambda c: c.update(input_ids=c["input_ids"].float()), "input_ids must be an int32 or int64"),
    (lambda c: c.update(temperature=0.0), "temperature=0.0"),
    (lambda c: c.update(temperature=float("nan")), "temperature=nan"),
    (lambda c: c.update(temperature=-1), "temperature=-1"),
    (lambda c: c.update(backend="cuda"), "backend='cuda'"),
])
def test_errors_name_the_argument(change, match):
    case = _errors_case()
    case["response_mask"][0, 0] = True  # the position the changes hit is valid
    case["logits"][0, 0] = 0.0
    case["input_ids"][0, 0] = 1
    case.setdefault("backend", "reference")
    change(case)
    with pytest.raises(ValueError, match=match):
        policy_loss_from_logits(**case)


def test_masked_positions_are_not_validated(backends, device):
    """ids -100 and repeated top-K ids at masked positions are padding, not errors (the case generator puts
    them there): both backends accept them."""
    case = _errors_case()
    assert (case["input_ids"] == -100).any()
    for backend in backends:
        loss, _ = policy_loss_from_logits(**cast(case, torch.float32, device), backend=backend)
        assert math.isfinite(loss.item())


def test_fuzz_and_bench_commands(tmp_path, capsys):
    """`ptr-kernels fuzz --from-logits` (Triton in the interpreter against the oracle) and a tiny
    `ptr-kernels bench --from-logits` run and report."""
    from ptr_kernels.cli import main

    assert main(["fuzz", "--from-logits", "--backend", "triton", "--cases", "2", "--max-len", "8"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["bench", "--from-logits", "--methods", "ppo", "--max-reps", "1", "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "from_logits.csv").read_text().splitlines()
    assert rows[0].startswith("provider,method") and any(r.startswith("fused,ppo") for r in rows)
    assert all(r.split(",")[6] for r in rows[1:])  # every provider that ran has a time


def _aot_compile_logits_kernels():
    """Compile the forward (every TOPK, with and without a mask) and backward kernels for sm_90, bf16 logits."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ptr_kernels.ops import logits as L

    def compile_one(fn, types, constexprs):
        names = fn.arg_names
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
        source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))

    count = 0
    for topk in (0, 1, 2):
        for has_mask in (True, False):
            types = dict(logits_ptr="*bf16", ids_ptr="*i64", mask_ptr="*i1", olp_ptr="*bf16", topk_ids_ptr="*i64",
                         topk_lp_ptr="*fp32", lp_ptr="*fp32", div_ptr="*fp32", entropy_ptr="*fp32", lse_ptr="*fp32",
                         stride_row="i64", stride_pos="i64", inv_temperature="fp32")
            constexprs = dict(TOPK=topk, HAS_MASK=has_mask, BLOCK_V=4096, BLOCK_K=32)
            if not has_mask:
                constexprs["mask_ptr"] = None
            if topk == 0:
                constexprs.update(topk_ids_ptr=None, topk_lp_ptr=None, div_ptr=None)
            compile_one(L.logits_forward_kernel, types, constexprs)
            count += 1
    for out in ("*bf16", "*fp32"):
        types = dict(logits_ptr=out, ids_ptr="*i64", mask_ptr="*i1", lse_ptr="*fp32", grad_lp_ptr="*fp32",
                     upstream_ptr="*fp32", aux_ptr="*fp32", out_ptr=out, stride_row="i64", stride_pos="i64",
                     out_stride_row="i64", out_stride_pos="i64", inv_temperature="fp32")
        compile_one(L.logits_backward_kernel, types, dict(HAS_MASK=True, BLOCK_V=4096))
        count += 1
    print("compiled", count)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the other tests compile and run the kernels")
def test_logits_kernels_compile_for_sm90_without_gpu():
    """The interpreter does not type-check like the compiler: compile the vocabulary kernels for sm_90 ahead
    of time, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and "compiled 8" in out.stdout, out.stdout + out.stderr[-3000:]


if __name__ == "__main__":
    _aot_compile_logits_kernels()
