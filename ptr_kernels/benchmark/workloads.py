"""The benchmark's workloads: methods, layouts, shapes of each sweep, and RL-like input sets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import PolicyLossConfig

METHODS = ("cppo", "dppo", "ppo")
LAYOUTS = ("padded", "packed")
MODES = ("fwd", "fwd_bwd")


@dataclass(frozen=True)
class Shape:
    """One batch geometry. padded: `batch` rows of `tokens // batch` positions; packed: `batch` sequences,
    `tokens` in all.

    `compile_priority` (lower first, None: not compiled) and `loop` mark the shapes where the expensive
    providers run, so the full sweep fits its time budget.
    """

    layout: str
    batch: int
    tokens: int
    compile_priority: Optional[int] = None
    loop: bool = False

    @property
    def name(self) -> str:
        if self.layout == "padded":
            return f"{self.batch}x{self.tokens // self.batch}"
        return f"{self.batch}seq/{self.tokens}tok"


def padded(batch: int, width: int, **kw) -> Shape:
    """`batch` rows of `width` positions."""
    return Shape("padded", batch, batch * width, **kw)


def packed(sequences: int, tokens: int, **kw) -> Shape:
    """`sequences` packed sequences of random lengths, `tokens` in all."""
    return Shape("packed", sequences, tokens, **kw)


# The shapes that two targets compare (docs/benchmarks.md, "Targets"): a few long sequences
# (long-context RL) against the same 1M tokens in short rows.
LONG_SEQUENCES = packed(8, 8 * 131072)
LONG_BASELINE = padded(256, 4096, compile_priority=1, loop=True)

SWEEPS = {
    "tiny": (padded(4, 64, compile_priority=0, loop=True), padded(8, 256, loop=True),
             packed(4, 256, compile_priority=1), packed(16, 2048)),
    "full": (
        padded(8, 512, loop=True), padded(32, 1024, loop=True), padded(64, 2048, loop=True),
        LONG_BASELINE,  # 1M tokens
        padded(512, 8192, compile_priority=0, loop=True),  # the compile and eager comparisons
        padded(4096, 1024, loop=True),  # 4,096 sequences: the loop comparison
        padded(1024, 8192), padded(2048, 8192), padded(4096, 8192),  # >= 16M tokens: bandwidth
        packed(8, 4096), packed(64, 65536), packed(1024, 2**20, compile_priority=2),
        LONG_SEQUENCES,  # 8 x 131,072 tokens
        packed(4096, 2**22), packed(2048, 2**24),
    ),
}


@dataclass
class Inputs:
    """One input set on the device; `mask_float` is the float 0/1 mask verl's losses take."""

    log_prob: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    mask_float: torch.Tensor
    cu_seqlens: Optional[torch.Tensor]

    def min_bytes(self, mode: str) -> int:
        """Each input read once, plus for fwd_bwd the gradient written once."""
        tensors = (self.log_prob, self.old_log_prob, self.advantages, self.mask, self.cu_seqlens)
        n = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        if mode == "fwd_bwd":
            n += self.log_prob.numel() * self.log_prob.element_size()
        return n


def packed_lengths(shape: Shape, seed: int) -> torch.Tensor:
    """`batch` random lengths (0.25x to 1.75x the mean) summing to `tokens` exactly."""
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(shape.batch, dtype=torch.float64).uniform_(0.25, 1.75, generator=g)
    ends = (w.cumsum(0) / w.sum() * shape.tokens).round().long()
    ends[-1] = shape.tokens
    lengths = torch.diff(ends, prepend=ends.new_zeros(1))
    if bool((lengths < 1).any()):
        raise ValueError(f"cannot split {shape.tokens} tokens into {shape.batch} sequences of at least 1")
    return lengths


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int, structure_seed: int) -> Inputs:
    """Inputs like an RL batch: token log-probs near 0, log_prob = old_log_prob + small drift, one advantage
    per sequence broadcast to its tokens (`[B, T]` / `[N]`, as verl stores it), response masks with padding
    (padded) or tool-token holes (packed). The structure (lengths, mask) depends on `structure_seed` only,
    so every input set of a shape has the same `cu_seqlens` (the compile provider specializes on it)."""
    gs = torch.Generator().manual_seed(structure_seed)
    if shape.layout == "padded":
        B, T = shape.batch, shape.tokens // shape.batch
        lengths = torch.randint(T // 2, T + 1, (B,), generator=gs)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        size, cu_seqlens = (B, T), None
    else:
        seq_len = packed_lengths(shape, structure_seed)
        mask = torch.rand(shape.tokens, generator=gs) > 0.03
        size = (shape.tokens,)
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), seq_len.cumsum(0)]).to(torch.int32)
    g = torch.Generator(device=device).manual_seed(seed)
    # mean token probability about 0.5 and a drift that the masks act on (cppo masks about 3.5% of the tokens,
    # dppo and ppo about 1%), as a few updates into a rollout batch
    old = -torch.empty(size, device=device).exponential_(1.0, generator=g).clamp(max=15.0)
    lp = (old + 0.1 * torch.randn(size, device=device, generator=g)).clamp(max=0.0)
    adv_seq = torch.randn(shape.batch, device=device, generator=g)
    if shape.layout == "padded":
        adv = adv_seq[:, None].expand(size).contiguous()
    else:
        adv = adv_seq.repeat_interleave(seq_len.to(device))
    mask = mask.to(device)
    return Inputs(log_prob=lp.to(dtype).requires_grad_(), old_log_prob=old.to(dtype), advantages=adv.to(dtype),
                  mask=mask, mask_float=mask.to(torch.float32),
                  cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device))


def method_config(method: str) -> PolicyLossConfig:
    """The defaults of `PolicyLossConfig` (docs/math.md sections 3-4): cppo with calibrated delta_b (P90,
    cap 2x), dppo Binary-TV, ppo clip-higher."""
    return PolicyLossConfig(method=method)
