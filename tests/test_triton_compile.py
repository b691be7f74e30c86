"""`policy_loss(..., backend="triton")` inside `torch.compile(fullgraph=True)`.

The kernel is the custom op `ptr_kernels::policy_loss_fused`: Dynamo traces around it with its fake
implementation, AOTAutograd traces its registered backward, and at run time the compiled graph calls the
real op, which launches the Triton kernel (on CPU: in the Triton interpreter). So on CPU this test runs the
whole compiled forward and backward end to end, the kernel included, and compares with eager.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels: triton exists for Linux only")

from ptr_kernels import PolicyLossConfig, policy_loss  # noqa: E402
from ptr_kernels.testing.cases import random_case  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf * 0 in discarded branches


@pytest.mark.parametrize("method", ["cppo", "ppo"])
@pytest.mark.parametrize("normalizer", ["number", "tensor"])
def test_compile_fullgraph_matches_eager(method, normalizer, device):
    """Compiled (fullgraph, no graph break) loss, metrics and gradient equal the eager kernel's."""
    case = random_case(4, max_len=64, layout="padded", methods=(method,))
    inputs = case.inputs(torch.float32, device)
    config = inputs.pop("config").replace(loss_agg_mode="token-mean", delta_b_quantile=0.9)
    log_prob = inputs.pop("log_prob")
    for key in ("dp_size", "batch_num_tokens", "global_batch_size"):
        inputs.pop(key)
    # global normalizers as Python numbers or as 0-dim device tensors: neither may be read on the host
    num_tokens = 50 if normalizer == "number" else torch.tensor(50.0, device=device)

    def step(lp):
        loss, metrics = policy_loss(lp, **inputs, config=config, backend="triton", dp_size=2,
                                    batch_num_tokens=num_tokens)
        return loss * 3.0, metrics

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    results = []
    for fn in (step, compiled):
        lp = log_prob.clone().requires_grad_(True)
        loss, metrics = fn(lp)
        loss.backward()
        results.append((loss.detach(), {k: v.detach() for k, v in metrics.items()}, lp.grad))
    (loss_e, met_e, grad_e), (loss_c, met_c, grad_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=0)
    assert met_c.keys() == met_e.keys()
    for key in met_e:
        torch.testing.assert_close(met_c[key], met_e[key], rtol=1e-6, atol=0)


def _compiled_matches_eager(device: str, seed: int, max_len: int, layout: str, compile_backend: str,
                            **overrides) -> None:
    """`policy_loss(..., backend="triton")` of a random cppo case under torch.compile(fullgraph=True) gives the
    eager loss and gradient."""
    case = random_case(seed, max_len=max_len, layout=layout, methods=("cppo",))
    inputs = case.inputs(torch.float32, device)
    config = inputs.pop("config").replace(**overrides)
    log_prob = inputs.pop("log_prob")
    for key in ("dp_size", "batch_num_tokens", "global_batch_size"):
        inputs.pop(key)

    def step(lp):
        return policy_loss(lp, **inputs, config=config, backend="triton")[0]

    lp_e = log_prob.clone().requires_grad_(True)
    loss_e = step(lp_e)
    loss_e.backward()
    lp_c = log_prob.clone().requires_grad_(True)
    loss_c = torch.compile(step, fullgraph=True, backend=compile_backend)(lp_c)
    loss_c.backward()
    torch.testing.assert_close(loss_c.detach(), loss_e.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(lp_c.grad, lp_e.grad, rtol=1e-6, atol=0)


def test_compile_inductor_cpu_graph(device):
    """With the inductor backend the graph around the op is compiled too (C++ codegen on CPU, when a
    compiler is available): forward and backward run and match eager."""
    _compiled_matches_eager(device, 8, 32, "padded", "inductor", loss_agg_mode="seq-mean-token-mean")


def test_config_object_default(device):
    """The default config (cppo, calibrated delta_b) compiles with the config passed as overrides."""
    lp = torch.randn(2, 8, device=device).clamp(max=0)

    def step(lp):
        return policy_loss(lp, lp.detach() - 0.05, torch.ones(2, device=device), backend="triton",
                           config=PolicyLossConfig(), delta=0.1)[0]

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(lp), step(lp), rtol=1e-6, atol=0)


def test_config_built_inside_the_compiled_region(device):
    """Overrides given inside the compiled function build the config during tracing: the kernel must run that
    config (not the default one), exactly as eager does, and the loss must differ from the default's."""
    g = torch.Generator().manual_seed(5)
    lp = (-torch.rand(3, 16, generator=g)).to(device)
    olp = (lp + 0.4 * torch.randn(3, 16, generator=g).to(device))
    adv = torch.randn(3, generator=g).to(device)

    def step(x, **overrides):
        return policy_loss(x, olp, adv, backend="triton", **overrides)

    overrides = dict(method="ppo", clip_ratio_low=0.05, clip_ratio_high=0.05, loss_agg_mode="seq-mean-token-sum")
    compiled = torch.compile(lambda x: step(x, **overrides), fullgraph=True, backend="aot_eager")
    results = []
    for fn in (lambda x: step(x, **overrides), compiled, step):
        x = lp.clone().requires_grad_(True)
        loss, metrics = fn(x)
        loss.backward()
        results.append((loss.detach(), metrics, x.grad))
    (loss_e, met_e, grad_e), (loss_c, met_c, grad_c), (loss_default, _, _) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=0)
    assert met_c.keys() == met_e.keys() and "clip_frac_low" in met_c
    for key in met_e:
        torch.testing.assert_close(met_c[key], met_e[key], rtol=1e-6, atol=0)
    assert not torch.allclose(loss_e, loss_default)


def test_compile_packed(device):
    """Packed input (length_mode="padded": the longest sequence read on device, and the backward's
    per-sequence expansion) compiles with fullgraph=True (cu_seqlens is checked by an async assert under
    compile) and matches eager."""
    _compiled_matches_eager(device, 3, 40, "packed", "aot_eager", length_mode="padded", loss_agg_mode="seq-mean-token-mean")


# Kernel variants for the ahead-of-time compile check: every constexpr value at least once (METHOD: cppo 0,
# dppo 1, ppo 2; DIVERGENCE: binary_tv 0, binary_kl 1, given 2; BUDGET: fixed 0, quantile 1, given 2; HORIZON:
# last 0, int 1, max_len 2, given 3, width 4; every aggregation MODE) and every optional input present and absent
# (None: the kernel reads the layout from which pointers are None). `absent`: the inputs passed as None.
AOT_VARIANTS = [
    (dict(METHOD=0, DIVERGENCE=0, GATE=0, SURROGATE=0, BUDGET=1, HORIZON=0, ADV_PER_SEQ=False, MODE=3, BLOCK=1024),
     ("div_ptr", "shard_ptr", "dp_ptr", "tokens_ptr", "seqs_ptr")),
    (dict(METHOD=0, DIVERGENCE=1, GATE=1, SURROGATE=1, BUDGET=1, HORIZON=2, ADV_PER_SEQ=True, MODE=3, BLOCK=16),
     ("mask_ptr", "rw_ptr", "div_ptr", "shard_ptr")),
    (dict(METHOD=0, DIVERGENCE=2, GATE=0, SURROGATE=0, BUDGET=0, HORIZON=4, ADV_PER_SEQ=True, MODE=1, BLOCK=256),
     ("rw_ptr", "cu_ptr", "shard_ptr", "dp_ptr", "tokens_ptr", "seqs_ptr")),
    (dict(METHOD=1, DIVERGENCE=1, GATE=0, SURROGATE=1, BUDGET=0, HORIZON=0, ADV_PER_SEQ=False, MODE=4, BLOCK=1024),
     ("rw_ptr", "div_ptr", "cu_ptr", "shard_ptr", "tokens_ptr", "seqs_ptr")),
    (dict(METHOD=2, DIVERGENCE=0, GATE=0, SURROGATE=0, BUDGET=0, HORIZON=0, ADV_PER_SEQ=False, MODE=2, BLOCK=128),
     ("div_ptr", "shard_ptr", "dp_ptr", "tokens_ptr")),
    # a context-parallel shard: carried state, T_w and delta_b given
    (dict(METHOD=0, DIVERGENCE=0, GATE=0, SURROGATE=0, BUDGET=2, HORIZON=3, ADV_PER_SEQ=True, MODE=0, BLOCK=256),
     ("rw_ptr", "div_ptr", "dp_ptr", "tokens_ptr", "seqs_ptr")),
    (dict(METHOD=0, DIVERGENCE=0, GATE=1, SURROGATE=0, BUDGET=0, HORIZON=1, ADV_PER_SEQ=False, MODE=0, BLOCK=64),
     ("rw_ptr", "div_ptr", "cu_ptr", "dp_ptr", "tokens_ptr", "seqs_ptr")),
]


def _resource_usage(cubin: bytes) -> str:
    """Registers and spill bytes per thread of a compiled kernel, from Triton's bundled cuobjdump."""
    import re
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return "REG:{} STACK:{} SHARED:{} LOCAL:{}".format(*found.groups()) if found else out.strip()[-200:]


def _aot_compile_all():
    """Compile AOT_VARIANTS for sm_90 (bf16 inputs; ints that equal 1 specialized in the last two runs) and the
    backward kernel; print registers and spills per variant."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ptr_kernels.ops import reduce, runtime, token

    def compile_one(fn, signature, constexprs, num_warps):
        names = fn.arg_names
        signature = {n: "constexpr" if n in constexprs else signature.get(n, "fp32") for n in names}
        source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
        return _resource_usage(kernel.asm["cubin"])

    # a launch with one sequence, or a row of one token: Triton specializes an int that equals 1 as a constant
    # unless the kernel says not to (packed, a single sequence once failed Triton 3.6's coalescing pass)
    unspecialized = {p.name for p in token.token_kernel.params if p.do_not_specialize}
    ones = [n for n in ("num_seqs", "extent") if n not in unspecialized]
    for i, (const, absent) in enumerate(AOT_VARIANTS + [AOT_VARIANTS[0], AOT_VARIANTS[2]]):
        specialized = ones if i >= len(AOT_VARIANTS) else []
        # masks of any dtype load as they are: bool (*i1), uint8, float
        mask_type = ("*i1", "*u8", "*fp32")[i % 3]
        types = dict(lp_ptr="*bf16", olp_ptr="*bf16", adv_ptr="*bf16", mask_ptr=mask_type, rw_ptr="*bf16",
                     div_ptr="*fp32", cu_ptr="*i32", shard_ptr="*fp64", grad_ptr="*fp32", loss_ptr="*fp32",
                     sums_ptr="*fp32",
                     counter_ptr="*i32", params_ptr="*fp32", dp_ptr="*i64", tokens_ptr="*fp32", seqs_ptr="*i32",
                     num_seqs="i32", extent="i64")
        constexprs = {**const, **{n: None for n in absent}, **{n: 1 for n in specialized}}
        print("token", const, "absent", absent, compile_one(token.token_kernel, types, constexprs, token.NUM_WARPS))
    # Triton compares every global a kernel uses with its compile-time value at each launch (host time per call)
    print("globals checked per launch:", len(token.token_kernel.used_global_vals))
    # the backward's scaling
    signature = dict(grad_ptr="*fp32", upstream_ptr="*fp32", scale_ptr="*fp32", out_ptr="*bf16", numel="i64")
    compile_one(reduce.scale_grad_kernel, signature, dict(BLOCK=runtime.SCALE_BLOCK), 4)
    print("compiled", len(AOT_VARIANTS) + 3)


def test_every_kernel_takes_at_most_30_parameters():
    """Every @triton.jit function of ptr_kernels.ops, constexprs included: the config's numbers travel in one
    tensor and the optional inputs as None pointers, so a launch binds few arguments (host time per call)."""
    import importlib
    import inspect
    import pkgutil

    import ptr_kernels.ops
    from triton.runtime.jit import JITFunction

    counts = {}
    for module in pkgutil.iter_modules(ptr_kernels.ops.__path__):
        for name, value in vars(importlib.import_module(f"ptr_kernels.ops.{module.name}")).items():
            if isinstance(value, JITFunction) or type(value).__name__ == "InterpretedFunction":
                counts[f"{module.name}.{name}"] = len(inspect.signature(value.fn).parameters)
    assert counts["token.token_kernel"] and counts["common.trust_region_step"]
    assert max(counts.values()) <= 30, {k: v for k, v in counts.items() if v > 30}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the other tests compile and run the kernel")
def test_kernel_compiles_for_sm90_without_gpu():
    """The interpreter does not type-check like the compiler does: compile the kernel for an H100 (sm_90)
    ahead of time, in a process without TRITON_INTERPRET, so GPU-only compile errors show up in CPU CI."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and "compiled" in out.stdout, out.stdout + out.stderr[-3000:]
    usage = [line for line in out.stdout.splitlines() if line.startswith("token")]
    assert usage and all("LOCAL:0" in line for line in usage), "register spills:\n" + "\n".join(usage)
    assert "globals checked per launch: 0" in out.stdout, out.stdout[-500:]  # constants are read as ids.NAME


if __name__ == "__main__":
    _aot_compile_all()
