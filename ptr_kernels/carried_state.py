"""The carried state of a sequence split into consecutive shards (docs/math.md section 8): its layout, and the
shard inputs of one call as one value (`CarriedState`) with their check and the row the kernels read.

A shard of sequence i needs, besides its tokens:

- `initial_state [S, 3]`: the prefix of the earlier shards, columns `STATE_SLACK, STATE_S, STATE_W` =
  (sum_j w_j (delta_b_i - D_j), S = sum_j w_j D_j, W = sum_j w_j) over the valid tokens before the shard.
  The slack equals delta_b_i W - S; it is carried as its own running sum because delta_b_i W - S of two
  large float32 sums loses the digits the hard gate compares (docs/kernels.md). Zeros: the sequence starts here.
- `position_offset [S]` (int): the global position (0-based) of the shard's first position, so that
  t = offset + local position for the position weight w_t.
- `sequence_length [S]`: T_w of the whole sequence (replaces what `length_mode` would derive from the shard).
- `sequence_delta_b [S]`: delta_b_i of the whole sequence (replaces the fixed or calibrated budget; the
  config field `delta_b` keeps its meaning).

`final_state [S, 3]` is the same state after the shard: initial_state plus the shard's own totals. The
totals of a shard depend only on its inputs (every valid token counts in the budget), which is what lets
`ptr_kernels.distributed.cp_policy_loss` get every shard's initial state from one exclusive scan.
The state takes part only in cppo; for dppo and ppo it passes through unchanged.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

STATE_SLACK, STATE_S, STATE_W = 0, 1, 2
STATE_WIDTH = 3
# the kernels read a shard's inputs as one float64 row per sequence, and write the state after it in the same row:
# the state's columns, then position_offset, sequence_length and sequence_delta_b, then the state after
SHARD_OFFSET, SHARD_LENGTH, SHARD_DELTA_B = 3, 4, 5
SHARD_FINAL = 6
SHARD_WIDTH = SHARD_FINAL + STATE_WIDTH


class CarriedState(NamedTuple):
    """The shard inputs of one call (`initial_state`, `position_offset`, `sequence_length`, `sequence_delta_b`,
    each None when not given, and `output_final_state`), built once from the public keywords and handed down
    as one value; all None and False (`NO_CARRIED_STATE`) when the inputs are whole sequences."""

    initial_state: Optional[torch.Tensor] = None
    position_offset: Optional[torch.Tensor] = None
    sequence_length: Optional[torch.Tensor] = None
    sequence_delta_b: Optional[torch.Tensor] = None
    output_final_state: bool = False

    @property
    def given(self) -> bool:
        """Whether the call is a shard of longer sequences (any input given, or the final state asked for)."""
        return bool(self.output_final_state) or self.initial_state is not None or self.position_offset is not None \
            or self.sequence_length is not None or self.sequence_delta_b is not None

    def check(self, num_seqs: int, device: torch.device, *, calibrated: bool) -> None:
        """Shapes, dtypes and devices of the shard inputs (values are not read: that would be a host sync);
        ValueError naming the argument. `calibrated`: cppo with a calibrated delta_b, where a carried state needs
        the whole sequence's `sequence_delta_b` (the earlier shards' slack was built with it)."""
        if calibrated and self.initial_state is not None and self.sequence_delta_b is None:
            raise ValueError("initial_state with a calibrated delta_b (delta_b_quantile set) needs sequence_delta_b: "
                             "the whole sequence's delta_b_i, with which the earlier shards' state was built "
                             "(ptr_kernels.distributed.cp_shard_state computes both)")
        for name, width in _SHARD_INPUTS.items():
            value = getattr(self, name)
            if value is None:
                continue
            expected = (num_seqs,) if width is None else (num_seqs, width)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if tuple(value.shape) != expected:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {expected} (one per sequence)")
            if value.device != device:
                raise ValueError(f"{name} is on {value.device} but log_prob is on {device}")
            integer = name in ("position_offset", "sequence_length")
            if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
                raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
            if not integer and not value.is_floating_point():
                raise ValueError(f"{name} must be a float tensor, got {value.dtype}")

    def pack(self, num_seqs: int, device: torch.device) -> torch.Tensor:
        """The shard inputs as the kernels read them, `[S, SHARD_WIDTH]` float64 (offsets and lengths are exact in
        it): absent ones zero (zero state, first position 0; the length and delta_b columns are read only when
        given), and the final state's columns left for the kernel to write."""
        shard = torch.zeros((num_seqs, SHARD_WIDTH), dtype=torch.float64, device=device)
        if self.initial_state is not None:
            shard[:, :STATE_WIDTH] = self.initial_state
        for column, value in ((SHARD_OFFSET, self.position_offset), (SHARD_LENGTH, self.sequence_length),
                              (SHARD_DELTA_B, self.sequence_delta_b)):
            if value is not None:
                shard[:, column] = value
        return shard


# the tensor inputs in the order of the checks, with their width (None: one number per sequence)
_SHARD_INPUTS = {"initial_state": STATE_WIDTH, "position_offset": None, "sequence_length": None,
                 "sequence_delta_b": None}
NO_CARRIED_STATE = CarriedState()
