"""Seeded random policy-loss cases: the shared input generator of the tests and `ptr-kernels fuzz`.

A case draws a layout (padded or packed), sequence lengths (1 and empty rows included), masks with holes,
garbage (+-inf, NaN) at masked positions, and a random in-range `PolicyLossConfig` with random global
normalizers. Tensors are float64 on the CPU; `Case.inputs(dtype, device)` rounds and moves them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..config import LOSS_AGG_MODES, PolicyLossConfig

GARBAGE = (float("inf"), float("-inf"), float("nan"), 1e30, -1e30)


@dataclass
class Case:
    """One batch and config. Tensors are float64/bool/int on the CPU; `kwargs` are the global normalizers."""

    seed: int
    log_prob: torch.Tensor  # [B, T] or [N]
    old_log_prob: torch.Tensor
    advantages: torch.Tensor  # [B, T], [B], [N] or [S]
    response_mask: Optional[torch.Tensor]  # bool, shape of log_prob, or None (all valid)
    cu_seqlens: Optional[torch.Tensor]  # int32/int64 [S + 1] for packed input
    rollout_is_weights: Optional[torch.Tensor]
    config: PolicyLossConfig
    kwargs: dict  # dp_size, batch_num_tokens, global_batch_size

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_tokens(self) -> int:
        return self.log_prob.numel()

    def rounded(self, dtype: torch.dtype) -> "Case":
        """The same case with its float inputs rounded to `dtype` (still stored in float64)."""
        def r(t):
            return None if t is None else t.to(dtype).to(torch.float64)
        return dataclasses.replace(self, log_prob=r(self.log_prob), old_log_prob=r(self.old_log_prob),
                                   advantages=r(self.advantages), rollout_is_weights=r(self.rollout_is_weights))

    def inputs(self, dtype: torch.dtype = torch.float64, device="cpu") -> dict:
        """Keyword arguments for `policy_loss` / `policy_loss_reference` (config included)."""
        def cast(t, float_dtype=dtype):
            if t is None:
                return None
            return t.to(device=device, dtype=float_dtype if t.is_floating_point() else t.dtype)
        return dict(log_prob=cast(self.log_prob), old_log_prob=cast(self.old_log_prob),
                    advantages=cast(self.advantages), response_mask=cast(self.response_mask),
                    cu_seqlens=cast(self.cu_seqlens), rollout_is_weights=cast(self.rollout_is_weights),
                    config=self.config, **self.kwargs)

    def describe(self) -> str:
        c = self.config
        layout = f"packed S={self.cu_seqlens.numel() - 1}" if self.packed else f"padded {tuple(self.log_prob.shape)}"
        return (f"seed={self.seed} {layout} N={self.num_tokens} method={c.method} div={c.divergence} "
                f"gate={c.gate} surrogate={c.surrogate} agg={c.loss_agg_mode} length_mode={c.length_mode}")


def random_config(rng: np.random.Generator, *, packed: bool, methods: Optional[Sequence[str]] = None,
                  max_len: int = 300) -> PolicyLossConfig:
    """An in-range config; every option of docs/math.md is drawn with some probability."""
    def maybe(p, value):
        return value if rng.random() < p else None

    method = rng.choice(methods or ("cppo", "cppo", "dppo", "ppo"))
    quantile = maybe(0.7, float(rng.choice([0.0, 0.5, 0.9, 1.0, rng.random()])))
    agg = str(rng.choice(LOSS_AGG_MODES))
    scale = float(rng.uniform(1, 2 * max_len))
    length_mode = rng.choice(["sequence", "sequence", "padded", "int"])
    return PolicyLossConfig(
        method=str(method),
        divergence=str(rng.choice(["binary_tv", "binary_kl"])),
        delta=float(rng.uniform(0.01, 0.3)),
        delta_low=maybe(0.3, float(rng.uniform(0.01, 0.3))),
        delta_high=maybe(0.3, float(rng.uniform(0.01, 0.3))),
        w_min=float(rng.choice([1.0, rng.uniform(0.2, 1.0)])),
        delta_b=float(rng.choice([0.0, rng.uniform(0.0, 0.05)])),
        delta_b_quantile=quantile,
        delta_b_max_mult=float(rng.choice([1.0, rng.uniform(1.0, 4.0)])),
        length_mode=int(rng.integers(1, max_len + 1)) if length_mode == "int" else str(length_mode),
        gate=str(rng.choice(["hard", "soft"])),
        surrogate=str(rng.choice(["ratio", "logp"])),
        ratio_cap=float(rng.uniform(1.2, 20.0)),
        log_ratio_clamp=float(rng.choice([20.0, rng.uniform(0.2, 5.0)])) if rng.random() < 0.8 else None,
        clip_ratio_low=float(rng.uniform(0.0, 0.5)),
        clip_ratio_high=float(rng.uniform(0.0, 0.5)),
        clip_ratio_c=maybe(0.4, float(rng.uniform(1.1, 5.0))),
        loss_agg_mode=agg,
        loss_scale_factor=scale if (packed and agg == "seq-mean-token-sum-norm") else maybe(0.3, scale),
        # from a child generator: the draws after the config (the case's data) do not move
        delta_b_quantile_scale=float(_scale_choice(rng.spawn(1)[0])),
    )


def _scale_choice(rng: np.random.Generator) -> float:
    return rng.choice([1.0, rng.uniform(0.25, 4.0)])


def _lengths(rng: np.random.Generator, n: int, max_len: int) -> np.ndarray:
    """Sequence lengths mixing 1, short, long and (rarely) empty sequences."""
    kind = rng.choice(["one", "short", "any"], size=n, p=[0.1, 0.3, 0.6])
    short = rng.integers(1, min(16, max_len) + 1, size=n)
    anylen = rng.integers(1, max_len + 1, size=n)
    lengths = np.where(kind == "one", 1, np.where(kind == "short", short, anylen))
    return np.where(rng.random(n) < 0.08, 0, lengths)


def random_case(seed: int, *, max_len: int = 300, max_seqs: int = 8, methods: Optional[Sequence[str]] = None,
                layout: Optional[str] = None) -> Case:
    """A random case. `layout` is "padded", "packed" or None (either); lengths lie in 0..max_len."""
    rng = np.random.default_rng(seed)
    packed = rng.random() < 0.5 if layout is None else layout == "packed"
    S = int(rng.integers(1, max_seqs + 1))
    lengths = _lengths(rng, S, max_len)
    config = random_config(rng, packed=packed, methods=methods, max_len=max_len)

    if packed:
        shape = (int(lengths.sum()),)
        cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
        cu_seqlens = cu.to(torch.int32 if rng.random() < 0.5 else torch.int64)
        valid = np.ones(shape, dtype=bool)
    else:
        T = int(max(lengths.max(), 1) + rng.integers(0, 3))
        shape = (S, T)
        cu_seqlens = None
        valid = np.arange(T)[None, :] < lengths[:, None]  # right padding
    hole_rate = float(rng.choice([0.0, 0.1, 0.4]))
    valid &= rng.random(shape) >= hole_rate
    has_mask = not (packed and hole_rate == 0.0 and rng.random() < 0.5)

    # mu near a sampling distribution; pi drifts from it by a case-wide scale, with rare large moves.
    old_lp = -rng.exponential(float(rng.choice([0.05, 0.5, 2.0])), size=shape)
    drift = float(rng.choice([0.01, 0.1, 0.5]))
    noise = rng.normal(0.0, drift, size=shape)
    if config.log_ratio_clamp is not None:
        noise = np.where(rng.random(shape) < 0.02, rng.normal(0.0, 25.0, size=shape), noise)
    log_prob = np.minimum(old_lp + noise, 0.0)

    # per sequence or per token; a packed [S] that equals [N] would read as per token, so avoid it
    per_seq = rng.random() < 0.5 and not (packed and shape[0] == S)
    adv_shape = (S,) if per_seq else shape
    advantages = rng.normal(0.0, 1.0, size=adv_shape) * (rng.random(adv_shape) >= 0.1)  # some zeros
    rollout_is_weights = rng.uniform(0.5, 2.0, size=shape) if rng.random() < 0.3 else None

    if has_mask and rng.random() < 0.4:  # garbage where the mask is 0 must never reach the result
        junk = rng.choice(GARBAGE, size=shape)
        log_prob = np.where(valid, log_prob, junk)
        old_lp = np.where(valid, old_lp, rng.choice(GARBAGE, size=shape))
        if advantages.shape == shape:
            advantages = np.where(valid, advantages, rng.choice(GARBAGE, size=shape))
        if rollout_is_weights is not None:
            rollout_is_weights = np.where(valid, rollout_is_weights, rng.choice(GARBAGE, size=shape))

    num_valid = int(valid.sum())
    kwargs = dict(dp_size=int(rng.choice([1, 1, 2, 4])),
                  batch_num_tokens=int(rng.integers(1, 2 * num_valid + 2)) if rng.random() < 0.3 else None,
                  global_batch_size=int(rng.integers(1, 2 * S + 2)) if rng.random() < 0.3 else None)

    def t(a):
        return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64))

    return Case(seed=seed, log_prob=t(log_prob), old_log_prob=t(old_lp), advantages=t(advantages),
                response_mask=torch.from_numpy(valid) if has_mask else None, cu_seqlens=cu_seqlens,
                rollout_is_weights=t(rollout_is_weights), config=config, kwargs=kwargs)
