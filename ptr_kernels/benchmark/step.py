"""`ptr-kernels bench --from-hidden --step`: one training step of a small decoder with each loss path.

The decoder is made in code with random weights (no download): token embedding, pre-norm transformer layers
with causal self-attention, a final norm and an LM head `[V, H]` (4 layers, H = 1024, V = 152064, 8 x 1024
tokens in bf16 on CUDA; 2 layers, H = 32, V = 256 on a CPU). A step is forward + loss + backward into every
parameter; the loss paths are those of `benchmark/hidden_bench.py` (fused, materialized, and the peers when
installed), on the same rollout. Per row: the median step time and the peak memory above the model and its
inputs (CUDA): the number a user feels. Writes step.csv and step.md.
"""

from __future__ import annotations

import torch

from .hidden_bench import LOSS_PROVIDERS, loss_paths, make_inputs, measure, write_table
from .results import measure_into

SIZES = {"full": dict(layers=4, size=1024, heads=16, vocab=152064, num_seqs=8, width=1024),
         "tiny": dict(layers=2, size=32, heads=4, vocab=256, num_seqs=2, width=16)}
COLUMNS = ("provider", "method", "divergence", "layers", "H", "V", "tokens", "time_ms", "peak_mib", "note")


class Decoder(torch.nn.Module):
    """A causal pre-norm transformer returning the final hidden states `[B, T, H]`; `head` is the LM head."""

    def __init__(self, layers: int, size: int, heads: int, vocab: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, size)
        self.layers = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(size, heads, 4 * size, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = torch.nn.LayerNorm(size)
        self.head = torch.nn.Linear(size, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device,
                                                                      dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, src_mask=causal, is_causal=True)
        return self.norm(x)


def run(args, device: torch.device, out) -> int:
    """The step benchmark; 0, or 1 if a loss path failed (its row says why)."""
    sweep = args.sweep or ("full" if device.type == "cuda" else "tiny")
    if sweep == "full" and device.type != "cuda":
        print("--from-hidden --step: the real decoder (V = 152064) needs CUDA; on a CPU use the tiny sweep")
        return 2
    sizes = SIZES[sweep]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = args.max_reps or (10 if device.type == "cuda" else 2)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Decoder(sizes["layers"], sizes["size"], sizes["heads"], sizes["vocab"]).to(device, dtype)
    tokens = torch.randint(0, sizes["vocab"], (sizes["num_seqs"], sizes["width"]), device=device)
    with torch.no_grad():  # the rollout: mu drawn from the model's own head, with a drift
        inp = make_inputs(sizes["num_seqs"], sizes["width"], sizes["size"], sizes["vocab"], device, dtype,
                          hidden=model(tokens), weight=model.head.weight)
    from .cli import interpreter_ready
    providers = LOSS_PROVIDERS if device.type == "cuda" or interpreter_ready() else LOSS_PROVIDERS[2:]
    rows, failed = [], False
    for provider, method, fn, divergence, note in loss_paths(args.methods, providers, inp):

        def step():
            model.zero_grad(set_to_none=True)
            fn(model(tokens), model.head.weight).backward()

        row = dict(provider=provider, method=method, divergence=divergence, layers=sizes["layers"],
                   H=sizes["size"], V=sizes["vocab"], tokens=tokens.numel(), time_ms="", peak_mib="", note=note)
        failed |= measure_into(row, lambda: measure(step, device, reps), device)
        rows.append(row)
        print(" ".join(f"{k}={row[k]}" for k in COLUMNS if row[k] != ""), flush=True)
    write_table(rows, out, "step", COLUMNS)
    return 1 if failed else 0
