"""The traffic model: the bytes per token that the fused loss's design must move, per method, layout and dtype.

One fwd+bwd call of the design (docs/benchmarks.md, "Traffic model"):

- forward reads `log_prob`, `old_log_prob`, per-token `advantages` (the dtype's size each) and the bool
  `response_mask` (1 byte), and packed input the int32 `cu_seqlens` (4 bytes per sequence boundary);
- forward writes the per-token gradient in float32 (4 bytes) and backward reads it back (4 bytes): the saved
  gradient that lets backward be one elementwise pass;
- backward writes the gradient in `log_prob`'s dtype.

The *minimum* leaves out the saved gradient: each input read once and the gradient written once (17 bytes per
token in float32). The model is the same for every method: cppo's quantile (counting passes over the sequence)
is meant to be served from registers or L2, so its extra reads are lost bandwidth, not traffic the design needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .workloads import LAYOUTS, METHODS, MODES

MASK_BYTES = 1  # bool
SAVED_GRAD_BYTES = 4  # float32
CU_SEQLENS_BYTES = 4  # int32, per boundary (sequences + 1)


@dataclass(frozen=True)
class Traffic:
    """Bytes of one call: `per_token` times the tokens plus `per_sequence` times the sequences plus `fixed`."""

    per_token: int
    per_sequence: int = 0
    fixed: int = 0

    def bytes(self, tokens: int, sequences: int) -> int:
        return self.per_token * tokens + self.per_sequence * sequences + self.fixed


def traffic(method: str, layout: str, dtype: torch.dtype, mode: str = "fwd_bwd", *, minimum: bool = False) -> Traffic:
    """The bytes that one call must move (the design's model, or with `minimum` the lower bound).

    Args:
        method: "cppo", "dppo" or "ppo" (the same model for each; validated so a typo is not silently priced).
        layout: "padded" (`[B, T]`, padding included: it is read) or "packed" (adds the int32 `cu_seqlens`).
        dtype: dtype of `log_prob`, `old_log_prob` and `advantages` (float32, bfloat16, float16).
        mode: "fwd" (forward only: the saved gradient written, not read back) or "fwd_bwd".
        minimum: each input read once and, for fwd_bwd, the gradient written once in `dtype`.

    Example: float32 fwd_bwd is 25 bytes per token (13 + 8 + 4), its minimum 17; bfloat16 17 and 9.
    """
    for name, value, choices in (("method", method, METHODS), ("layout", layout, LAYOUTS), ("mode", mode, MODES)):
        if value not in choices:
            raise ValueError(f"{name}={value!r} is invalid: expected one of {', '.join(choices)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is invalid: expected a floating torch.dtype")
    size = torch.empty((), dtype=dtype).element_size()
    forward = 3 * size + MASK_BYTES
    if mode == "fwd":
        per_token = forward + (0 if minimum else SAVED_GRAD_BYTES)
    else:
        per_token = forward + size + (0 if minimum else 2 * SAVED_GRAD_BYTES)
    packed = layout == "packed"
    return Traffic(per_token=per_token, per_sequence=CU_SEQLENS_BYTES if packed else 0,
                   fixed=CU_SEQLENS_BYTES if packed else 0)
