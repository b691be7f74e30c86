"""`ptr-kernels bench --from-logits`: the loss from logits, fused against materializing the distribution.

Providers, each one fwd + bwd from logits `[B, T, V]` to d loss / d logits:
- fused:  `policy_loss_from_logits(..., backend="triton")` (cppo / dppo with topk_tv, ppo with binary_tv)
- eager:  float32 log_softmax + gather + the Top-K divergence in PyTorch + the token reference
- trl:    TRL's `selective_log_softmax_and_entropy` (log-probs and entropy, no vocabulary divergence) + our
          token kernel (binary_tv: TRL gives no top-K probabilities), when trl is installed
- liger:  Liger-Kernel's `triton_grpo_loss` (ppo clip only, reduce=True, beta=0; its temperature and eps are
          compile-time constants: warmed up first), when liger-kernel is installed
Per row: median time of fwd + bwd (CUDA events, L2 flushed; `perf_counter` on CPU) and, on CUDA, the peak memory
above the inputs. Writes from_logits.csv and from_logits.md under the output folder.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import torch

from ..config import PolicyLossConfig
from ..reference import policy_loss_reference
from ..reference.logits import topk_divergence
from .results import measure_into
from .timing import Timer, peak_memory_mib

K = 20
TEMPERATURE = 0.9
SHAPES = {"full": [(4, 1024, 32768), (16, 2048, 32768), (4, 1024, 151936), (16, 2048, 151936)],
          "tiny": [(2, 16, 256)]}
METHOD_DIVERGENCE = {"cppo": "topk_tv", "dppo": "topk_tv", "ppo": "binary_tv"}
COLUMNS = ("provider", "method", "divergence", "B", "T", "V", "time_ms", "peak_mib", "note")


def make_inputs(B: int, T: int, V: int, device, dtype) -> dict:
    """RL-like inputs: logits ~ N(0, 2^2), mu = pi with a drift, y_t ~ mu, mu's top-K, 90% of positions valid."""
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (2.0 * torch.randn(B, T, V, generator=g)).to(device, dtype)
    log_mu = torch.log_softmax(logits.float() / TEMPERATURE + 0.3 * torch.randn(B, T, V, generator=g).to(device), -1)
    input_ids = torch.multinomial(log_mu.exp().view(-1, V), 1).view(B, T)
    topk_log_probs, topk_ids = log_mu.topk(K, dim=-1)
    old_log_prob = log_mu.gather(-1, input_ids[..., None])[..., 0]
    del log_mu
    mask = torch.rand(B, T, generator=g).to(device) < 0.9
    return dict(logits=logits, input_ids=input_ids, old_log_prob=old_log_prob,
                advantages=torch.randn(B, generator=g).to(device), response_mask=mask,
                rollout_topk_ids=topk_ids, rollout_topk_log_probs=topk_log_probs)


def eager_loss(inp: dict, logits: torch.Tensor, config: PolicyLossConfig) -> torch.Tensor:
    """log_softmax (float32) + gather + Top-K D + the token reference: the distribution materialized."""
    log_pi = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)
    log_prob = log_pi.gather(-1, inp["input_ids"][..., None])[..., 0]
    div = None
    if config.divergence.startswith("topk"):
        with torch.no_grad():
            div = topk_divergence(log_pi, inp["input_ids"], inp["old_log_prob"], inp["rollout_topk_ids"],
                                  inp["rollout_topk_log_probs"], config.divergence)
    return policy_loss_reference(log_prob, inp["old_log_prob"], inp["advantages"], inp["response_mask"],
                                 config=config, divergence_values=div)[0]


def make_call(provider: str, method: str, inp: dict):
    """`fn(logits) -> loss` of one provider, or None when it is not installed or does not compute `method`."""
    config = PolicyLossConfig(method=method, divergence=METHOD_DIVERGENCE[method])
    rest = {k: v for k, v in inp.items() if k != "logits"}
    if provider == "fused":
        from ..from_logits import policy_loss_from_logits
        return lambda logits: policy_loss_from_logits(logits, **rest, temperature=TEMPERATURE, config=config,
                                                      backend="triton")[0]
    if provider == "eager":
        return lambda logits: eager_loss(inp, logits, config)
    if provider == "trl":
        try:
            from trl.trainer.utils import selective_log_softmax_and_entropy
        except ImportError:
            return None
        from ..api import policy_loss
        binary = config.replace(divergence="binary_tv")

        def trl_loss(logits):
            log_prob, _ = selective_log_softmax_and_entropy(logits, inp["input_ids"], temperature=TEMPERATURE)
            return policy_loss(log_prob, inp["old_log_prob"], inp["advantages"], inp["response_mask"], config=binary,
                               backend="triton" if logits.is_cuda else "reference")[0]
        return trl_loss
    if provider == "liger" and method == "ppo":
        try:
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        except ImportError:
            return None

        def liger_loss(logits):  # Liger reads logits [B, L + 1, V] and drops the last position
            padded = torch.nn.functional.pad(logits, (0, 0, 0, 1))
            out = triton_grpo_loss(padded, inp["old_log_prob"], None, inp["input_ids"], inp["advantages"],
                                   inp["response_mask"].int(), temperature=TEMPERATURE, beta=0.0,
                                   eps_low=config.clip_ratio_low, eps_high=config.clip_ratio_high, reduce=True)
            return out[0] if isinstance(out, tuple) else out
        return liger_loss
    return None


def measure(fn, inp: dict, device: torch.device, reps: int) -> tuple:
    """(median ms of fwd + bwd, peak MiB or NaN on CPU)."""
    def step(_=None):
        logits = inp["logits"].detach().requires_grad_(True)
        loss = fn(logits)
        (grad,) = torch.autograd.grad(loss, logits)
        return grad
    step()  # warm-up: compiles Triton kernels (and Liger's constants)
    timer = Timer(device)
    median = statistics.median(timer.times(step, reps)) / 1e3
    peak = peak_memory_mib(step, device) if device.type == "cuda" else float("nan")
    return median, peak


def run(args, device: torch.device, out: Path) -> int:
    """Run the from-logits comparison; 0, or 1 if a provider failed (its row says why)."""
    sweep = args.sweep or ("full" if device.type == "cuda" else "tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = args.max_reps or (20 if device.type == "cuda" else 2)
    out.mkdir(parents=True, exist_ok=True)
    from .cli import interpreter_ready
    providers = ("fused", "eager", "trl", "liger")
    if device.type == "cpu" and not interpreter_ready():
        print("CPU without the Triton interpreter (TRITON_INTERPRET=1 before triton is imported): no 'fused' row")
        providers = providers[1:]
    rows, failed = [], False
    for B, T, V in SHAPES[sweep]:
        inp = make_inputs(B, T, V, device, dtype)
        for method in args.methods:
            for provider in providers:
                fn = make_call(provider, method, inp)
                if fn is None:
                    continue
                divergence = "binary_tv" if provider == "trl" else METHOD_DIVERGENCE[method]
                row = dict(provider=provider, method=method, divergence=divergence, B=B, T=T, V=V,
                           time_ms="", peak_mib="", note="")
                # eager runs out of memory at 16 x 2048 x 152k: a row with a note
                failed |= measure_into(row, lambda: measure(fn, inp, device, reps), device)
                rows.append(row)
                print(" ".join(f"{k}={row[k]}" for k in COLUMNS if row[k] != ""), flush=True)
        del inp
    with open(out / "from_logits.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| provider | method | divergence | B x T | V | fwd+bwd ms | peak MiB | note |", "|---" * 8 + "|"]
    lines += [f"| {r['provider']} | {r['method']} | {r['divergence']} | {r['B']} x {r['T']} | {r['V']} | "
              f"{r['time_ms']} | {r['peak_mib']} | {r['note']} |" for r in rows]
    (out / "from_logits.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'from_logits.csv'} and {out / 'from_logits.md'}")
    return 1 if failed else 0
