"""The Triton kernel (`backend="triton"`) against the float64 reference.

Runs on CUDA when a GPU is present, otherwise on CPU in the Triton interpreter (the root conftest.py); the
fixtures `device` and `run_policy_loss` come from tests/conftest.py.

Tolerances, from the kernel's float32 error model (inputs are rounded to the tested dtype first, and the
float64 reference sees the same rounded values):
- gradient, per token: |g - g_ref| <= GRAD_RTOL |g_ref| + GRAD_ATOL * max|g_ref|;
- loss: |loss - loss_ref| <= LOSS_RTOL * (the loss aggregated over |l_t|, the scale before cancellation);
- float metrics: METRIC_RTOL relative to the scale of the mean (mean |old_log_prob - log_prob|, mean D, ...).
A mask/clip decision may differ from the reference only at a near-tie: the one near-tie rule of the fuzz
(`ptr_kernels.testing.fuzz.literal_result`: the literal loop on the rounded inputs marks the tokens whose
decision lies within the float32 tie tolerance of flipping). Every token whose gradient disagrees must be such a
token; the loss may differ by those tokens' ungated contributions and the count metrics by their number.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels: triton exists for Linux only")

from ptr_kernels import PolicyLossConfig, policy_loss  # noqa: E402
from ptr_kernels.ops.runtime import forced_block_size  # noqa: E402
from ptr_kernels.testing.cases import random_case  # noqa: E402
from ptr_kernels.testing.fuzz import literal_result  # noqa: E402
from ptr_kernels.config import LOSS_AGG_MODES  # noqa: E402
from ptr_kernels.validation import mask_as_bool, max_seqlen, packed_to_rows  # noqa: E402
from ptr_kernels.reference import aggregate, token_terms  # noqa: E402

NORMALIZERS = ("dp_size", "batch_num_tokens", "global_batch_size")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GRAD_RTOL, GRAD_ATOL = 2e-5, 1e-6
LOSS_RTOL = 2e-5
METRIC_RTOL = 2e-5
DIVERGENCE_ATOL = 1e-6  # D's absolute float32 error, in the metrics that average it
FUZZ_CASES = 400  # seeds 0..399
# On a GPU each new combination of options and dtypes compiles a kernel variant (the 400 cases draw about
# 380, ~0.5 s each); PTR_KERNELS_FUZZ_CASES runs the first n cases only, to fit a time-limited GPU check.
FUZZ_RUN = int(os.environ.get("PTR_KERNELS_FUZZ_CASES", FUZZ_CASES))

# numpy warns about inf * 0 in branches that tl.where then discards (interpreter only)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def run_triton(inputs, device, block=0, tensor_normalizers=False):
    """Kernel loss, metrics and d loss / d log_prob on `device`, returned on the CPU; `block` 0 lets the wrapper
    choose; `tensor_normalizers` passes dp_size, batch_num_tokens, global_batch_size as 0-dim device tensors."""
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if tensor_normalizers:
        inputs.update({k: torch.tensor(inputs[k], device=device) for k in NORMALIZERS if inputs[k] is not None})
    log_prob = inputs.pop("log_prob").clone().requires_grad_(True)
    with forced_block_size(block):
        loss, metrics = policy_loss(log_prob, **inputs, backend="triton")
    loss.backward()
    assert log_prob.grad.dtype == log_prob.dtype
    return loss.detach().cpu().double(), {k: v.cpu().double() for k, v in metrics.items()}, log_prob.grad.cpu()


class Rows:
    """A float64 case laid out in rows `[S, T]` as the reference does, with its per-token terms."""

    def __init__(self, inputs):
        self.inputs = inputs
        lp, olp, adv, rw = (inputs[k] for k in ("log_prob", "old_log_prob", "advantages", "rollout_is_weights"))
        mask = mask_as_bool(inputs["response_mask"], lp)
        self.cu = inputs["cu_seqlens"]
        if self.cu is not None:
            self.width = max_seqlen(self.cu)
            per_seq = adv.shape[0] == self.cu.numel() - 1 and adv.shape[0] != lp.shape[0]
            lp, olp, rw = self.rows(lp), self.rows(olp), self.rows(rw)
            adv = adv if per_seq else self.rows(adv)
            mask = packed_to_rows(mask, self.cu, self.width, fill=False)
        self.log_prob, self.old_log_prob, self.mask = lp, olp, mask
        self.config = inputs["config"]
        self.terms = token_terms(lp, olp, adv, mask, self.config, rollout_is_weights=rw)
        # the same tokens with every gate open: the most a gate flip can change a token's loss by
        opened = self.config.replace(method="dppo", delta=1e30, delta_low=None, delta_high=None)
        self.ungated = token_terms(lp, olp, adv, mask, opened, rollout_is_weights=rw).loss

    def rows(self, t):
        if t is None or self.cu is None:
            return t
        return packed_to_rows(t, self.cu, self.width)

    def agg_weight(self):
        """d loss / d l_t of the aggregation (per token, rows): it is linear in the token losses."""
        token_loss = torch.zeros_like(self.terms.loss, requires_grad=True)
        i = self.inputs
        lsf = self.config.loss_scale_factor
        loss = aggregate(token_loss, self.mask, self.config.loss_agg_mode, dp_size=i["dp_size"],
                         batch_num_tokens=i["batch_num_tokens"], global_batch_size=i["global_batch_size"],
                         loss_scale_factor=lsf)
        (weight,) = torch.autograd.grad(loss, token_loss, allow_unused=True)
        return torch.zeros_like(token_loss) if weight is None else weight



def check_case(case, dtype, device, run_policy_loss, block=0):
    """Kernel vs float64 reference on `case` rounded to `dtype`; every disagreement must be a near-tie."""
    what = f"{case.describe()} dtype={dtype} block={block or 'auto'}"
    ref_inputs = case.rounded(dtype).inputs(torch.float64)
    loss, metrics, grad = run_triton(case.inputs(dtype), device, block, tensor_normalizers=case.seed % 4 == 3)
    ref_loss, ref_metrics, ref_grad = run_policy_loss(ref_inputs, "reference")
    ref_loss = ref_loss.detach()
    assert torch.isfinite(loss), what
    # the gradient is returned in `dtype`: compare after that rounding (float16 can overflow, like the reference)
    rounded_ref = ref_grad.to(dtype)
    assert torch.equal(torch.isfinite(grad), torch.isfinite(rounded_ref)), what
    assert (grad[~torch.isfinite(rounded_ref)] == rounded_ref[~torch.isfinite(rounded_ref)]).all(), what
    finite = torch.isfinite(rounded_ref)
    grad, ref_grad = torch.where(finite, grad, 0).double(), torch.where(finite, ref_grad, 0)
    out = torch.finfo(dtype)  # one rounding step of the output, also in the subnormal range
    out_rtol, out_atol = (out.eps, out.eps * out.smallest_normal) if dtype != torch.float32 else (0.0, 0.0)

    rows = Rows(ref_inputs)
    near = rows.rows(literal_result(case, dtype).near_tie) & rows.mask
    weight = rows.agg_weight()
    grad_rows, ref_grad_rows = rows.rows(grad), rows.rows(ref_grad)
    masked = ~mask_as_bool(ref_inputs["response_mask"], ref_inputs["log_prob"])
    assert (grad[masked] == 0).all(), f"gradient at masked positions: {what}"

    g_scale = ref_grad_rows.abs().max().item() if ref_grad_rows.numel() else 0.0
    allowed = (GRAD_RTOL + out_rtol) * ref_grad_rows.abs() + GRAD_ATOL * g_scale + out_atol
    off = (grad_rows - ref_grad_rows).abs() > allowed
    unexplained = off & ~near
    assert not unexplained.any(), (
        f"gradient differs at {int(unexplained.sum())} token(s) that are not near-ties: {what}; "
        f"first {grad_rows[unexplained][:5].tolist()} vs reference {ref_grad_rows[unexplained][:5].tolist()}")

    tie_slack = (weight.abs() * rows.ungated.abs() * near).sum().item()  # tied tokens, counted or not
    loss_scale = (weight.abs() * rows.terms.loss.abs()).sum().item() + tie_slack
    assert abs(loss.item() - ref_loss.item()) <= LOSS_RTOL * loss_scale + tie_slack + 1e-30, (
        f"loss {loss.item()!r} vs reference {ref_loss.item()!r} (scale {loss_scale:.3g}): {what}")

    assert set(metrics) == set(ref_metrics), what
    n_tok = max(int(rows.mask.sum()), 1)
    m = rows.mask
    float_scales = {
        "ppo_kl": torch.where(m, rows.old_log_prob - rows.log_prob, 0).abs().sum().item() / n_tok,
        "divergence_mean": rows.terms.divergence.sum().item() / n_tok,
        "delta_b_mean": rows.terms.delta_b.abs().max().item() if rows.terms.delta_b.numel() else 0.0,
    }
    for key, value in metrics.items():
        expected = ref_metrics[key].item()
        if key in float_scales:
            allowed = METRIC_RTOL * float_scales[key] + DIVERGENCE_ATOL * (key != "ppo_kl")
        else:  # fractions of tokens: each near-tie may count on either side
            allowed = int(near.sum()) / n_tok + 1e-7
        assert abs(value.item() - expected) <= allowed, f"metric {key}: {value.item()!r} vs {expected!r}: {what}"
    return int(off.sum())


@pytest.mark.parametrize("seed", range(FUZZ_RUN))
def test_fuzz_against_reference(seed, device, run_policy_loss):
    """One of 400 seeded cases from `ptr_kernels.testing.cases`; dtypes cycle, half of them with 16-token blocks so
    the prefix carry crosses many blocks, a quarter with the global normalizers as 0-dim tensors."""
    case = random_case(seed, max_len=512)
    check_case(case, DTYPES[seed % 3], device, run_policy_loss, block=16 if seed % 2 else 0)


def test_soft_gate_with_rounding_negative_kl(device, run_policy_loss):
    """Regression (seed 1050 of `ptr-kernels fuzz`): binary_kl of pi ~ mu rounds a hair below 0 in float32,
    and the soft gate min(1, 1/z) with such a z <= 0 must stay 1, not become a huge negative factor."""
    case = random_case(1050, max_len=512)
    assert case.config.divergence == "binary_kl" and case.config.gate == "soft"
    check_case(case, torch.float32, device, run_policy_loss)


def test_fuzz_covers_every_option():
    """The fuzz seeds draw every method, option, layout and aggregation mode of docs/math.md sections 2-6."""
    seen = set()
    for seed in range(FUZZ_CASES):
        case = random_case(seed, max_len=512)
        c = case.config
        seen |= {("method", c.method), ("agg", c.loss_agg_mode), ("packed", case.packed),
                 ("dtype", str(DTYPES[seed % 3])), ("adv_per_seq", case.advantages.shape != case.log_prob.shape),
                 ("rw", case.rollout_is_weights is not None), ("mask", case.response_mask is not None),
                 ("clamp", c.log_ratio_clamp is not None)}
        if case.packed:
            seen.add(("cu", str(case.cu_seqlens.dtype)))
        if c.method == "cppo":
            seen |= {("cppo gate", c.gate), ("cppo surrogate", c.surrogate), ("cppo div", c.divergence),
                     ("quantile", c.delta_b_quantile is not None), ("length_mode", type(c.length_mode).__name__),
                     ("length_mode", str(c.length_mode) if isinstance(c.length_mode, str) else "int")}
        if c.method == "dppo":
            seen |= {("dppo split", c.delta_low is not None or c.delta_high is not None),
                     ("dppo surrogate", c.surrogate), ("dppo div", c.divergence)}
        if c.method == "ppo":
            seen.add(("dual", c.clip_ratio_c is not None))
    expected = {("method", m) for m in ("cppo", "dppo", "ppo")} | {("agg", a) for a in LOSS_AGG_MODES}
    expected |= {(k, v) for k in ("packed", "adv_per_seq", "rw", "mask", "clamp", "quantile", "dppo split", "dual")
                 for v in (True, False)}
    expected |= {("dtype", str(d)) for d in DTYPES} | {("cu", "torch.int32"), ("cu", "torch.int64")}
    expected |= {("cppo gate", "hard"), ("cppo gate", "soft"), ("length_mode", "sequence"),
                 ("length_mode", "padded"), ("length_mode", "int")}
    expected |= {(f"{m} {k}", v) for m in ("cppo", "dppo") for k, vs in
                 (("surrogate", ("ratio", "logp")), ("div", ("binary_tv", "binary_kl"))) for v in vs}
    assert expected <= seen, f"never drawn: {sorted(expected - seen)}"


def _cppo_config(**kw):
    return PolicyLossConfig(method="cppo", **kw)


@pytest.mark.parametrize("quantile", [None, 0.9])
def test_long_sequence_many_blocks(quantile, device, run_policy_loss):
    """Two sequences of 65,536 tokens (packed, int64 offsets) and the same as a padded [2, 65536] batch:
    the prefix budget carries across 64 blocks of 1024 (128 blocks of 512 for the padded run)."""
    g = torch.Generator().manual_seed(7)
    n = 65_536
    old = -torch.rand(2 * n, generator=g, dtype=torch.float64) * 3
    lp = (old + torch.randn(2 * n, generator=g, dtype=torch.float64) * 0.05).clamp(max=0)
    adv = torch.randn(2, generator=g, dtype=torch.float64)
    mask = torch.rand(2 * n, generator=g) > 0.1
    # delta_b small enough that the budget binds late in the sequences
    config = _cppo_config(delta_b=0.005, delta_b_quantile=quantile, delta_b_max_mult=1.5)
    packed = dict(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask,
                  cu_seqlens=torch.tensor([0, n, 2 * n], dtype=torch.int64), rollout_is_weights=None,
                  config=config, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    case = _as_case(packed)
    assert check_case(case, torch.float32, device, run_policy_loss) <= 20
    padded = dict(packed, log_prob=lp.view(2, n), old_log_prob=old.view(2, n), response_mask=mask.view(2, n),
                  cu_seqlens=None)
    assert check_case(_as_case(padded), torch.float32, device, run_policy_loss, block=512) <= 20
    rows = Rows(case.rounded(torch.float32).inputs(torch.float64))
    assert rows.terms.rejected_budget.sum() > 100  # the budget really binds, so the carry is exercised


def _as_case(inputs):
    """Wrap explicit float64 inputs as a `cases.Case`."""
    from ptr_kernels.testing.cases import Case
    kw = {k: inputs[k] for k in NORMALIZERS}
    return Case(seed=-1, log_prob=inputs["log_prob"], old_log_prob=inputs["old_log_prob"],
                advantages=inputs["advantages"], response_mask=inputs["response_mask"],
                cu_seqlens=inputs["cu_seqlens"], rollout_is_weights=inputs["rollout_is_weights"],
                config=inputs["config"], kwargs=kw)


@pytest.mark.parametrize("agg,quantile", [("token-mean", None), ("seq-mean-token-mean", 0.9)])
def test_many_sequences(agg, quantile, device, run_policy_loss):
    """10,000 short packed sequences (lengths 0..12, int32 cu_seqlens), many per program."""
    g = torch.Generator().manual_seed(11)
    S = 10_000
    lengths = torch.randint(0, 13, (S,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    N = int(lengths.sum())
    old = -torch.rand(N, generator=g, dtype=torch.float64) * 2
    lp = (old + torch.randn(N, generator=g, dtype=torch.float64) * 0.2).clamp(max=0)
    inputs = dict(log_prob=lp, old_log_prob=old, advantages=torch.randn(S, generator=g, dtype=torch.float64),
                  response_mask=torch.rand(N, generator=g) > 0.2, cu_seqlens=cu, rollout_is_weights=None,
                  config=_cppo_config(loss_agg_mode=agg, delta_b_quantile=quantile), dp_size=2,
                  batch_num_tokens=None, global_batch_size=None)
    check_case(_as_case(inputs), torch.float32, device, run_policy_loss)


@pytest.mark.parametrize("method", ["cppo", "dppo", "ppo"])
@pytest.mark.parametrize("packed", [False, True])
def test_garbage_at_masked_positions(method, packed, device, run_policy_loss):
    """+-inf / NaN / 1e30 at masked positions never reach the loss, the gradient or a metric."""
    g = torch.Generator().manual_seed(3)
    B, T = 3, 40
    old = -torch.rand(B, T, generator=g, dtype=torch.float64)
    lp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    rw = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    mask = torch.rand(B, T, generator=g) > 0.3
    junk = torch.tensor([math.inf, -math.inf, math.nan, 1e30], dtype=torch.float64)
    pick = torch.randint(0, 4, (4, B, T), generator=g)
    lp, old, adv, rw = (torch.where(mask, t, junk[pick[i]]) for i, t in enumerate((lp, old, adv, rw)))
    inputs = dict(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask, cu_seqlens=None,
                  rollout_is_weights=rw, config=PolicyLossConfig(method=method, log_ratio_clamp=None),
                  dp_size=1, batch_num_tokens=None, global_batch_size=None)
    if packed:
        inputs.update({k: inputs[k].reshape(-1) for k in ("log_prob", "old_log_prob", "advantages",
                                                           "response_mask", "rollout_is_weights")})
        inputs["cu_seqlens"] = torch.tensor([0, T, 2 * T, 3 * T], dtype=torch.int32)
    # asserts finite loss and gradient, zero gradient where masked
    check_case(_as_case(inputs), torch.float32, device, run_policy_loss)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
def test_empty_batch(packed, agg, device):
    """No valid token: loss 0, gradient 0, metrics 0, no NaN (all-masked rows, and zero-length input)."""
    shapes = [((0,), torch.tensor([0], dtype=torch.int32)), ((5,), torch.tensor([0, 2, 5], dtype=torch.int32))] \
        if packed else [((0, 4), None), ((2, 5), None), ((3, 0), None)]
    for shape, cu in shapes:
        lp = torch.full(shape, -0.5, device=device, requires_grad=True)
        kw = dict(cu_seqlens=None if cu is None else cu.to(device), method="cppo", loss_agg_mode=agg,
                  loss_scale_factor=4.0 if packed else None)
        loss, metrics = policy_loss(lp, torch.full(shape, -0.4, device=device), torch.ones(shape, device=device),
                                    torch.zeros(shape, dtype=torch.bool, device=device), backend="triton", **kw)
        loss.backward()
        assert loss.item() == 0.0 and (lp.grad == 0).all()
        assert all(v.item() == 0.0 for v in metrics.values())


def test_cppo_reduces_to_dppo(device):
    """docs/math.md section 3: cppo with w_min = 1 and a budget that never binds equals dppo with the same delta."""
    case = random_case(5, max_len=200, methods=("cppo",))
    cfg = case.config.replace(w_min=1.0, delta_b=1e6, delta_b_quantile=None, gate="hard")
    a = run_triton(dict(case.inputs(torch.float32), config=cfg), device)
    b = run_triton(dict(case.inputs(torch.float32), config=cfg.replace(method="dppo", delta_low=None,
                                                                         delta_high=None)), device)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert torch.equal(a[1]["mask_frac"], b[1]["mask_frac"])


def test_quantile_selection_exact(device):
    """The calibrated delta_b selects torch.quantile's order statistics: D on a grid of multiples of 1/64
    (with repeats), so a wrong rank would be off by at least frac / 64; lengths 1..40, q in [0, 1]."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(1, 41))
        # mu = 1, pi = 1 - j/64: D = j/64 (up to the float32 rounding of log_prob)
        lp = torch.log(1 - torch.tensor(rng.integers(1, 64, size=(1, n)) / 64.0)).float().double()
        q = float(rng.choice([0.0, 1.0, rng.random()]))
        mask = torch.tensor(rng.random((1, n)) > 0.3)
        cfg = _cppo_config(delta_b=0.2, delta_b_max_mult=4.0, delta_b_quantile=q)  # clamp range [0.2, 0.8]
        inputs = dict(log_prob=lp, old_log_prob=torch.zeros(1, n, dtype=torch.float64),
                      advantages=torch.ones(1, dtype=torch.float64), response_mask=mask, cu_seqlens=None,
                      rollout_is_weights=None, config=cfg, dp_size=1, batch_num_tokens=None,
                      global_batch_size=None)
        _, metrics, _ = run_triton(_as_case(inputs).inputs(torch.float32), device, block=16)
        d = (1 - lp.exp())[mask]
        expected = torch.quantile(d, q).clamp(0.2, 0.8).item() if d.numel() else 0.0
        assert metrics["delta_b_mean"].item() == pytest.approx(expected, rel=1e-5, abs=1e-7), (n, q)


def test_strided_inputs(device, run_policy_loss):
    """Non-contiguous views (a strided cu_seqlens, a transposed log_prob, expanded advantages, one-element
    tensor normalizers) give the reference's loss, metrics and gradient."""
    torch.manual_seed(0)
    lp = -torch.rand(40, dtype=torch.float64)
    packed = dict(log_prob=lp, old_log_prob=lp + 0.2 * torch.randn(40, dtype=torch.float64),
                  advantages=torch.randn(4, dtype=torch.float64),
                  cu_seqlens=torch.tensor([0, 0, 5, 5, 17, 17, 30, 30, 40, 40])[::2],  # values 0, 5, 17, 30, 40
                  response_mask=None, rollout_is_weights=None, config=PolicyLossConfig(delta_b_quantile=0.5),
                  dp_size=2, batch_num_tokens=torch.tensor([30.0]), global_batch_size=torch.tensor(3))
    lp2 = -torch.rand(12, 4, dtype=torch.float64).t()  # [4, 12], not contiguous
    padded = dict(log_prob=lp2, old_log_prob=(lp2 + 0.2 * torch.randn(4, 12, dtype=torch.float64)),
                  advantages=torch.randn(4, 1, dtype=torch.float64).expand(4, 12),
                  response_mask=(torch.rand(12, 4) > 0.2).t(), cu_seqlens=None, rollout_is_weights=None,
                  config=PolicyLossConfig(method="ppo", clip_ratio_c=3.0, loss_agg_mode="seq-mean-token-mean"),
                  dp_size=torch.tensor([2]), batch_num_tokens=None, global_batch_size=None)
    for inputs in (packed, padded):
        loss, metrics, grad = run_triton(inputs, device)
        ref_loss, ref_metrics, ref_grad = run_policy_loss(inputs, "reference")
        torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=0)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=1e-7)
        for key in ref_metrics:
            torch.testing.assert_close(metrics[key], ref_metrics[key].double(), rtol=2e-5, atol=1e-7)


def test_gradient_dtype(device):
    """The gradient comes back in log_prob's dtype (float64 input is computed in float32)."""
    case = random_case(1, max_len=20)
    for dtype in DTYPES + (torch.float64,):
        _, _, grad = run_triton(case.inputs(dtype), device)
        assert grad.dtype == dtype


def test_cpu_without_interpreter_says_how():
    """backend="triton" on CPU tensors without TRITON_INTERPRET=1 raises an error naming the variable."""
    code = ("import torch, ptr_kernels\n"
            "try:\n"
            "    ptr_kernels.policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "set the environment variable TRITON_INTERPRET=1 before triton is first imported" in out.stdout, \
        out.stdout + out.stderr


def test_exact_ties_are_proven_near_ties(device, run_policy_loss):
    """Thresholds placed exactly on a token's float64 D (dppo) or ratio (ppo clip-higher): float32 may
    decide either way there. The check must accept those disagreements as proven near-ties, and some
    disagreements must actually occur, so the proof above is exercised rather than vacuous."""
    g = torch.Generator().manual_seed(5)
    T = 48
    old = (-torch.rand(1, T, generator=g, dtype=torch.float64) * 2).float().double()
    lp = (old + 0.05 + torch.rand(1, T, generator=g, dtype=torch.float64) * 0.1).clamp(max=0).float().double()
    adv = torch.ones(1, T, dtype=torch.float64)  # A > 0 and x > 0: every token moves away from mu
    base = dict(log_prob=lp, old_log_prob=old, advantages=adv, response_mask=None, cu_seqlens=None,
                rollout_is_weights=None, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    div = (lp.exp() - old.exp()).abs()[0]
    ratio = (lp - old).exp()[0]
    disagreements = 0
    for k in range(0, T, 2):
        dppo = PolicyLossConfig(method="dppo", delta=float(div[k]), loss_agg_mode="token-sum")
        ppo = PolicyLossConfig(method="ppo", clip_ratio_high=float(ratio[k]) - 1, loss_agg_mode="token-sum")
        for config in (dppo, ppo):
            disagreements += check_case(_as_case(dict(base, config=config)), torch.float32, device, run_policy_loss)
    assert disagreements > 0
