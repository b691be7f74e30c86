"""`ptr-kernels bench --from-hidden`: the loss from hidden states, the LM head included, against the other heads.

Providers, each one forward + backward from hidden `[B, T, H]` and the head's weight `[V, H]` (bf16 on CUDA) to
the gradients of both:
- fused:        `policy_loss_from_hidden(..., backend="triton")`, token chunks, never the whole logits
- materialized: logits = hidden @ W^T (bf16, `[N, V]`) + our `policy_loss_from_logits` (the fused from-logits loss)
- liger:        Liger-Kernel's `LigerFusedLinearGRPOLoss` (chunked; PPO clip only, beta = 0), when installed
- trl:          TRL's chunked log-prob head (`trl.kernels.ChunkedLogProbFunction`) + our token loss, when installed
- verl:         verl's torch chunked `FusedLinearForPPO` (log-probs and entropy) + our token loss, when installed
- floor:        the head's own GEMMs: hidden @ W^T forward, its two gradient GEMMs backward (no loss)
cppo and dppo run Top-K TV (K = 20) where the provider can compute it (fused, materialized); the log-prob heads
(trl, verl) give no distribution, so their loss is binary TV; Liger's is PPO clip (a `note` says so).
`--step` runs the step benchmark instead (`benchmark/step.py`). Per row: median time (CUDA events, L2
flushed; `perf_counter` on CPU), the peak memory above the inputs on CUDA, and the time over the floor's.
Writes from_hidden.csv and from_hidden.md; on a CPU one tiny shape (the real shapes need CUDA).
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import torch

from ..config import PolicyLossConfig
from .results import measure_into
from .timing import Timer, peak_memory_mib

K = 20
TEMPERATURE = 0.9
SEQ_LEN = {"full": 2048, "tiny": 16}
SHAPES = {"full": [(8192, 3584, 152064), (32768, 3584, 152064)], "tiny": [(32, 16, 128)]}  # (N, H, V)
LOSS_PROVIDERS = ("fused", "materialized", "liger", "trl", "verl")  # and the floor, first at each shape
METHOD_DIVERGENCE = {"cppo": "topk_tv", "dppo": "topk_tv", "ppo": "binary_tv"}
SAMPLE_CHUNK = 2048  # tokens per chunk when drawing the rollout (mu's distribution is never whole either)
COLUMNS = ("provider", "method", "divergence", "N", "H", "V", "time_ms", "peak_mib", "vs_floor", "note")


def make_inputs(num_seqs: int, width: int, size: int, vocab: int, device, dtype, hidden=None, weight=None) -> dict:
    """RL-like inputs: hidden ~ N(0, 1), a head with logits of std ~2 (or the given ones), mu = pi with a drift
    on the logits, y_t ~ mu, mu's top-K, 90% of positions valid. mu is drawn a chunk of tokens at a time."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if hidden is None:
        hidden = torch.randn(num_seqs, width, size, generator=g).to(device, dtype)
    if weight is None:
        weight = (torch.randn(vocab, size, generator=g) * (2.0 / math.sqrt(size))).to(device, dtype)
    flat = hidden.view(-1, size)
    ids, old_log_prob, topk_ids, topk_log_probs = [], [], [], []
    for start in range(0, flat.shape[0], SAMPLE_CHUNK):
        logits = (flat[start:start + SAMPLE_CHUNK] @ weight.t()).float()
        log_mu = torch.log_softmax((logits + 0.3 * torch.randn_like(logits)) / TEMPERATURE, dim=-1)
        y = torch.multinomial(log_mu.exp(), 1)
        ids.append(y[:, 0])
        old_log_prob.append(log_mu.gather(-1, y)[:, 0])
        values, indices = log_mu.topk(K, dim=-1)
        topk_ids.append(indices)
        topk_log_probs.append(values)
    shape = (num_seqs, width)
    return dict(hidden=hidden, weight=weight, input_ids=torch.cat(ids).view(shape),
                old_log_prob=torch.cat(old_log_prob).view(shape),
                advantages=torch.randn(num_seqs, generator=g).to(device),
                response_mask=(torch.rand(shape, generator=g) < 0.9).to(device),
                rollout_topk_ids=torch.cat(topk_ids).view(*shape, K),
                rollout_topk_log_probs=torch.cat(topk_log_probs).view(*shape, K))


def make_loss(provider: str, method: str, inp: dict):
    """`(fn(hidden, weight) -> loss, divergence, note)` of one provider, or None when it is not installed or
    does not compute `method`."""
    from ..api import policy_loss
    from ..from_hidden import policy_loss_from_hidden
    from ..from_logits import policy_loss_from_logits

    config = PolicyLossConfig(method=method, divergence=METHOD_DIVERGENCE[method])
    binary = config.replace(divergence="binary_tv")
    tokens = {k: inp[k] for k in ("input_ids", "old_log_prob", "advantages", "response_mask")}
    topk = dict(rollout_topk_ids=inp["rollout_topk_ids"], rollout_topk_log_probs=inp["rollout_topk_log_probs"])
    backend = "triton" if inp["hidden"].is_cuda else "reference"

    def token_loss(log_prob):  # our token kernel on a peer's log-probs (binary TV: no distribution there)
        return policy_loss(log_prob.view(tokens["old_log_prob"].shape), tokens["old_log_prob"], tokens["advantages"],
                           tokens["response_mask"], config=binary, backend=backend)[0]

    if provider == "fused":
        return (lambda h, w: policy_loss_from_hidden(h, w, **tokens, **topk, temperature=TEMPERATURE, config=config,
                                                     backend="triton")[0]), config.divergence, ""
    if provider == "materialized":
        return (lambda h, w: policy_loss_from_logits(h @ w.t(), **tokens, **topk, temperature=TEMPERATURE,
                                                     config=config, backend="triton")[0]), config.divergence, ""
    if provider == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError:
            return None
        if method != "ppo":
            return None
        head = LigerFusedLinearGRPOLoss(beta=0.0, epsilon_low=config.clip_ratio_low,
                                        epsilon_high=config.clip_ratio_high, temperature=TEMPERATURE,
                                        use_ref_model=False)
        mask = tokens["response_mask"].int()
        return (lambda h, w: head(h, w, tokens["input_ids"], mask, tokens["advantages"], None, None,
                                  tokens["old_log_prob"])[0]), "ppo clip", "Liger's own PPO clip loss"
    if provider == "trl":
        try:
            from trl.kernels import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
        except ImportError:
            return None
        ids = tokens["input_ids"].reshape(-1)
        return (lambda h, w: token_loss(ChunkedLogProbFunction.apply(
            h.reshape(-1, h.shape[-1]), w, None, ids, TEMPERATURE, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
            ("entropy",))[0])), "binary_tv", "TRL gives log-probs only"
    if provider == "verl":
        try:
            from verl.utils.experimental.torch_functional import FusedLinearForPPO
        except ImportError:
            return None
        head = FusedLinearForPPO()
        return (lambda h, w: token_loss(head(h, w, tokens["input_ids"], temperature=TEMPERATURE)[0])), \
            "binary_tv", "verl gives log-probs only"
    raise ValueError(f"unknown provider {provider!r}")


def loss_step(fn, inp: dict):
    """One forward + backward: the loss, then its gradients into hidden and weight."""
    hidden = inp["hidden"].detach().requires_grad_(True)
    weight = inp["weight"].detach().requires_grad_(True)
    return torch.autograd.grad(fn(hidden, weight), [hidden, weight])


def floor_step(inp: dict, upstream: torch.Tensor):
    """The head's three GEMMs: logits = hidden @ W^T, then d hidden = G W and d W = G^T hidden."""
    hidden = inp["hidden"].detach().requires_grad_(True)
    weight = inp["weight"].detach().requires_grad_(True)
    return torch.autograd.grad(hidden @ weight.t(), [hidden, weight], upstream)


def measure(step, device: torch.device, reps: int) -> tuple:
    """(median ms of `step()`, peak MiB above what was allocated before, NaN on CPU)."""
    step()  # warm-up: compiles Triton kernels
    median = statistics.median(Timer(device).times(lambda _: step(), reps)) / 1e3
    peak = peak_memory_mib(step, device) if device.type == "cuda" else float("nan")
    return median, peak


def loss_paths(methods, providers, inp):
    """(provider, method, loss function, divergence, note) of every path that runs here (`make_loss` gives None
    for a peer that is not installed)."""
    for method in methods:
        for provider in providers:
            made = make_loss(provider, method, inp)
            if made is not None:
                yield (provider, method, *made)


def write_table(rows: list, out: Path, name: str, columns: tuple, quiet: bool = False) -> None:
    """`name`.csv and `name`.md under `out`."""
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print(f"wrote {out / (name + '.csv')} and {out / (name + '.md')}")


def run(args, device: torch.device, out: Path) -> int:
    """Run the head comparison (or `--step`); 0, or 1 if a provider failed (its row says why)."""
    if args.step:
        from .step import run as run_step
        return run_step(args, device, out)
    sweep = args.sweep or ("full" if device.type == "cuda" else "tiny")
    if sweep == "full" and device.type != "cuda":
        print("--from-hidden: the real shapes (N up to 32K, V = 152064) need CUDA; on a CPU use the tiny sweep")
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = args.max_reps or (10 if device.type == "cuda" else 2)
    out.mkdir(parents=True, exist_ok=True)
    from .cli import interpreter_ready
    providers = LOSS_PROVIDERS
    if device.type == "cpu" and not interpreter_ready():
        print("CPU without the Triton interpreter (TRITON_INTERPRET=1 before triton is imported): no 'fused' or "
              "'materialized' rows")
        providers = LOSS_PROVIDERS[2:]
    rows, failed = [], False

    def record(row: dict, step, floor_ms=None) -> None:
        nonlocal failed
        failed |= measure_into(row, lambda: measure(step, device, reps), device)  # the materialized head at 32K
        if floor_ms and row["time_ms"]:
            row["vs_floor"] = f"{float(row['time_ms']) / floor_ms:.2f}"
        rows.append(row)
        print(" ".join(f"{k}={row[k]}" for k in COLUMNS if row[k] != ""), flush=True)
        write_table(rows, out, "from_hidden", COLUMNS, quiet=True)  # so far: a step stopped at its limit keeps them

    for num_tokens, size, vocab in SHAPES[sweep]:
        width = min(SEQ_LEN[sweep], num_tokens)
        inp = make_inputs(num_tokens // width, width, size, vocab, device, dtype)
        upstream = torch.randn(inp["hidden"].shape[:-1] + (vocab,), device=device, dtype=dtype)
        shape = dict(N=num_tokens, H=size, V=vocab, time_ms="", peak_mib="", vs_floor="")
        floor = dict(provider="floor", method="", divergence="", **shape, note="hidden @ W^T, its two gradient GEMMs")
        record(floor, lambda: floor_step(inp, upstream))
        del upstream
        for provider, method, fn, divergence, note in loss_paths(args.methods, providers, inp):
            row = dict(provider=provider, method=method, divergence=divergence, **shape, note=note)
            record(row, lambda: loss_step(fn, inp), float(floor["time_ms"]) if floor["time_ms"] else None)
        del inp
    write_table(rows, out, "from_hidden", COLUMNS)
    return 1 if failed else 0
