"""Scale-out over torch.distributed (docs/distributed.md): the global normalizers of data parallelism, and a
context-parallel CPPO whose shards give exactly the unsplit sequence's mask, loss and gradient.

- `global_counts`: the whole batch's token and sequence counts over a data-parallel group (one all_reduce).
- `cp_shard_state`: the exchange of context parallelism (docs/math.md section 8): each rank holds one
  consecutive shard of every sequence, in rank order; it gets the global positions, T_w, the calibrated
  delta_b_i (an exact distributed quantile) and the carried prefix state of its shards.
- `cp_policy_loss`: `cp_shard_state` + `ptr_kernels.policy_loss` on the shard with the whole batch's
  normalizers; the losses of the ranks add up to the unsplit batch's loss.

Everything here works on token-flat views: a padded `[S, T]` shard or a packed `[N]` shard with
`cu_seqlens [S + 1]` becomes per-token values, sequence ids and local positions. No host sync: every
count stays on the device (collectives on a CUDA group are asynchronous to the host).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from .api import run_policy_loss
from .carried_state import NO_CARRIED_STATE, STATE_WIDTH, CarriedState
from .config import DEFAULT_CONFIG, PolicyLossConfig, resolve_config
from .reference import SEQ_MEAN_EPS, compute_dtype, divergence, position_weight, valid_values
from .validation import check_count_inputs, mask_as_bool, resolve_loss_scale_factor

RADIX_BITS = 8  # the distributed quantile selects 8 bits of the key per collective
RADIX = 1 << RADIX_BITS


# ---------------------------------------------------------------- data parallelism

def global_counts(response_mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None, *,
                  group=None):
    """`(batch_num_tokens, global_batch_size, dp_size)` of the whole batch over `group`, with one all_reduce.

    Args:
        response_mask: `[B, T]` (padded) or `[N]` (packed, with `cu_seqlens`); nonzero = valid.
        cu_seqlens: `[S + 1]` offsets of a packed shard; alone, every packed token is valid.
        group: the data-parallel process group (None: the default group). Without an initialized process
            group the counts are this process's and dp_size is 1.
    Returns:
        three 0-dim int64 tensors on the inputs' device: the valid tokens, the non-empty sequences and the
        group's size, ready for `policy_loss(..., dp_size=, batch_num_tokens=, global_batch_size=)`.
    """
    if response_mask is None and cu_seqlens is None:
        raise ValueError("global_counts needs response_mask or cu_seqlens")
    check_count_inputs(response_mask, cu_seqlens)
    if cu_seqlens is not None:
        seq_tokens = _segment_sums(mask_as_bool(response_mask, cu_seqlens.new_empty(0)) if response_mask is not None
                                   else None, cu_seqlens)
    else:
        if response_mask.dim() != 2:
            raise ValueError(f"response_mask has shape {tuple(response_mask.shape)}: padded input is [B, T]; "
                             "packed input needs cu_seqlens")
        seq_tokens = mask_as_bool(response_mask, response_mask).sum(dim=1)
    counts = torch.stack([seq_tokens.sum(), (seq_tokens > 0).sum()])
    size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, group=group)
        size = dist.get_world_size(group)
    return counts[0], counts[1], torch.full((), size, dtype=torch.int64, device=counts.device)


def _segment_sums(valid: Optional[torch.Tensor], cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Valid tokens per packed sequence `[S]` (int64) from a prefix sum: no loop, no sync."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if valid is None:
        return lengths
    prefix = torch.nn.functional.pad(valid.long().cumsum(0), (1, 0))
    return prefix[cu_seqlens[1:].long()] - prefix[cu_seqlens[:-1].long()]


# ---------------------------------------------------------------- context parallelism: the exchange

class ShardState(NamedTuple):
    """What one rank's shards need from the others (docs/math.md section 8); `[S]` unless noted."""

    initial_state: torch.Tensor  # [S, 3] (slack, S, W) of the earlier ranks' shards, compute dtype
    position_offset: torch.Tensor  # int64, global position of the shard's first position
    sequence_length: torch.Tensor  # int64, T_w of the whole sequence (0 for a sequence without valid token)
    sequence_delta_b: torch.Tensor  # delta_b_i of the whole sequence, compute dtype
    sequence_tokens: torch.Tensor  # int64, n_i of the whole sequence
    padded_width: torch.Tensor  # int64 0-dim, the whole padded row (sum of the shards' widths)

    @property
    def carried(self) -> CarriedState:
        """The shard inputs of the loss call."""
        return CarriedState(self.initial_state, self.position_offset, self.sequence_length, self.sequence_delta_b)


class _Tokens(NamedTuple):
    """A shard as token-flat views `[N]`: validity, sequence id, local 0-based position."""

    valid: torch.Tensor
    seq: torch.Tensor
    pos: torch.Tensor
    num_seqs: int
    seq_positions: torch.Tensor  # [S] int64, positions per sequence in the shard (valid or not)


def _flat_tokens(log_prob: torch.Tensor, response_mask, cu_seqlens) -> _Tokens:
    valid = mask_as_bool(response_mask, log_prob)
    device = log_prob.device
    if cu_seqlens is None:
        S, T = log_prob.shape
        seq = torch.arange(S, device=device).repeat_interleave(T)
        pos = torch.arange(T, device=device).repeat(S)
        return _Tokens(valid.reshape(-1), seq, pos, S, torch.full((S,), T, dtype=torch.int64, device=device))
    S = cu_seqlens.numel() - 1
    index = torch.arange(log_prob.shape[0], device=device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), index, right=True)
    pos = index - cu_seqlens.long()[seq] if index.numel() else index
    return _Tokens(valid, seq, pos, S, (cu_seqlens[1:] - cu_seqlens[:-1]).long())


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """`[R, *t.shape]`: every rank's `t`, in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _exclusive_before(gathered: torch.Tensor, group) -> torch.Tensor:
    """Sum of the rows of the ranks before this one (the exclusive scan of an all_gather), in rank order on
    every rank: the same additions in the same order everywhere."""
    rank = dist.get_rank(group)
    return gathered[:rank].sum(dim=0) if rank else torch.zeros_like(gathered[0])


def cp_shard_state(log_prob: torch.Tensor, old_log_prob: torch.Tensor, response_mask=None, *, cu_seqlens=None,
                   config: Optional[PolicyLossConfig] = None, group=None, divergence_values=None) -> ShardState:
    """The exchange of context parallelism for cppo: 2 collectives (fixed delta_b) or 2 + 4 (calibrated,
    float32; 2 + 8 for float64), the protocol of docs/distributed.md.

    Each rank of `group` holds the next consecutive shard (in rank order) of the same S sequences: padded
    `[S, T_k]` with `response_mask`, or packed `[N_k]` with `cu_seqlens [S + 1]` (a sequence may have no
    position on a rank: an empty shard). `divergence_values` (like log_prob): D given instead of the binary
    divergence (a from-logits path). No gradient flows through the state.
    """
    config = config or DEFAULT_CONFIG
    dt = compute_dtype(log_prob.dtype)
    with torch.no_grad():
        tokens = _flat_tokens(log_prob, response_mask, cu_seqlens)
        S, device = tokens.num_seqs, log_prob.device
        # 1. lengths: positions, last valid position (1-based, 0: none) and valid count of every shard
        last = torch.zeros(S, dtype=torch.int64, device=device).scatter_reduce_(
            0, tokens.seq, torch.where(tokens.valid, tokens.pos + 1, 0), "amax")
        counts = torch.zeros(S, dtype=torch.int64, device=device).index_add_(0, tokens.seq, tokens.valid.long())
        shards = _all_gather(torch.stack([tokens.seq_positions, last, counts], dim=1), group)  # [R, S, 3]
        offsets = torch.cumsum(shards[:, :, 0], dim=0) - shards[:, :, 0]  # exclusive, per rank
        position_offset = offsets[dist.get_rank(group)]
        sequence_tokens = shards[:, :, 2].sum(dim=0)
        totals = shards[:, :, 0].sum(dim=0)  # positions of each whole sequence
        padded_width = totals.max() if S else torch.zeros((), dtype=torch.int64, device=device)
        if config.length_mode == "sequence":
            sequence_length = torch.where(shards[:, :, 1] > 0, offsets + shards[:, :, 1], 0).amax(dim=0)
        elif config.length_mode == "padded":  # the padded row, or the longest packed sequence
            sequence_length = padded_width.expand(S).clone()
        else:
            sequence_length = torch.full((S,), config.length_mode, dtype=torch.int64, device=device)

        # 2. delta_b_i: fixed, or the exact quantile of the whole sequence's D
        lp = valid_values(log_prob.reshape(-1), tokens.valid, dt)
        olp = valid_values(old_log_prob.reshape(-1), tokens.valid, dt)
        if divergence_values is None:
            div = divergence(lp, olp, config.divergence) * tokens.valid.to(dt)
        else:
            div = valid_values(divergence_values.reshape(-1), tokens.valid, dt)
        delta_b = torch.full((S,), config.delta_b, dtype=dt, device=device)
        if config.delta_b_quantile is not None:
            quantile, n = distributed_quantile(div, tokens.valid & ~div.isnan(), tokens.seq, S,
                                               config.delta_b_quantile, group=group)
            scaled = torch.where(n > 0, config.delta_b_quantile_scale * quantile, delta_b)
            delta_b = scaled.clamp(min=config.delta_b, max=config.delta_b_max_mult * config.delta_b)

        # 3. the carried state: an exclusive scan of the shard totals (they depend only on the shard's inputs)
        weight = position_weight((tokens.pos + position_offset[tokens.seq] + 1).to(dt),
                                 sequence_length[tokens.seq].to(dt), config.w_min) * tokens.valid.to(dt)
        columns = torch.stack([weight * (delta_b[tokens.seq] - div), weight * div, weight], dim=1)
        shard_totals = torch.zeros(S, STATE_WIDTH, dtype=dt, device=device).index_add_(0, tokens.seq, columns)
        initial_state = _exclusive_before(_all_gather(shard_totals, group), group)
    return ShardState(initial_state, position_offset, sequence_length, delta_b, sequence_tokens, padded_width)


# ---------------------------------------------------------------- the exact distributed quantile

def distributed_quantile(values: torch.Tensor, valid: torch.Tensor, seq: torch.Tensor, num_seqs: int, q: float, *,
                         group=None):
    """Per sequence, `torch.quantile(values of the sequence over all ranks, q)` (linear interpolation), exactly.

    Args: token-flat `values [N]` (float32 or float64), `valid [N]` bool (which take part), `seq [N]` int64
    sequence ids in [0, num_seqs); the same `num_seqs` sequences on every rank of `group`.
    Returns: `(quantile [S], count [S] int64)`; the quantile is meaningless (0) where count is 0.

    A radix select on order-preserving integer keys of the floats, 8 bits per round, for the two order
    statistics kb = floor(q (n - 1)) and ka = ceil(q (n - 1)) together: each round all_reduces one int32
    histogram per sequence (`[S, 256]` in the first round, which also gives n; `[S, 2, 256]` after), so 4
    collectives for float32 and 8 for float64, whatever the data. No sort, no gather of the values.
    """
    bits = torch.finfo(values.dtype).bits
    int_dtype = {32: torch.int32, 64: torch.int64}[bits]
    sign = -(1 << (bits - 1))
    raw = values.contiguous().view(int_dtype)
    # unsigned order of the floats: flip every bit of negatives, only the sign bit of the others
    keys = (raw ^ torch.where(raw < 0, torch.full_like(raw, -1), torch.full_like(raw, sign))).long()
    device = values.device
    seq_valid = torch.where(valid, seq, 0)
    digit_count = bits // RADIX_BITS
    chosen = torch.zeros(num_seqs, 2, digit_count, dtype=torch.int64, device=device)
    candidate = valid[:, None].expand(-1, 2).clone()  # [N, 2]: keys that match the digits chosen so far
    target = torch.zeros(num_seqs, 2, dtype=torch.int64, device=device)
    n = frac = None
    for r in range(digit_count):
        digit = (keys >> (bits - RADIX_BITS * (r + 1))) & (RADIX - 1)  # arithmetic shift, masked: the digit
        if r == 0:  # both order statistics share the first histogram, whose sums are the counts n_i
            hist = torch.zeros(num_seqs * RADIX, dtype=torch.int32, device=device)
            hist.index_add_(0, seq_valid * RADIX + digit, valid.int())
            dist.all_reduce(hist, group=group)
            hist = hist.view(num_seqs, 1, RADIX).expand(-1, 2, -1)
            n = hist[:, 0].sum(dim=1)
            # torch.quantile: rank q (n - 1) in the values' dtype, the order statistics below and above it
            rank = torch.full((num_seqs,), q, dtype=values.dtype, device=device) * (n - 1).clamp(min=0).to(values.dtype)
            below = rank.floor()
            frac = rank - below
            target = torch.stack([below, rank.ceil()], dim=1).long()
        else:
            hist = torch.zeros(num_seqs * 2 * RADIX, dtype=torch.int32, device=device)
            for j in range(2):
                hist.index_add_(0, (seq_valid * 2 + j) * RADIX + digit, candidate[:, j].int())
            dist.all_reduce(hist, group=group)
            hist = hist.view(num_seqs, 2, RADIX)
        cumulative = hist.long().cumsum(dim=2)
        bucket = (cumulative <= target[:, :, None]).sum(dim=2).clamp(max=RADIX - 1)  # first bucket past target
        target = target - torch.where(bucket > 0, cumulative.gather(2, (bucket - 1).clamp(min=0)[:, :, None])[:, :, 0], 0)
        chosen[:, :, r] = bucket
        candidate &= digit[:, None] == bucket[seq_valid]
    # the chosen digits are the keys, most significant first: assemble the bytes, undo the key flip
    key_bytes = chosen.flip(2).to(torch.uint8).contiguous()
    key = key_bytes.view(int_dtype)[:, :, 0]  # little-endian bytes
    raw_stat = key ^ torch.where(key < 0, torch.full_like(key, sign), torch.full_like(key, -1))
    stats = raw_stat.contiguous().view(values.dtype)  # [S, 2]: d_(kb), d_(ka)
    return torch.lerp(stats[:, 0], stats[:, 1], frac), n.long()


# ---------------------------------------------------------------- context parallelism: the loss

def cp_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                   response_mask: Optional[torch.Tensor] = None, *, cu_seqlens: Optional[torch.Tensor] = None,
                   group=None, dp_group=None, config: Optional[PolicyLossConfig] = None, backend: str = "auto",
                   rollout_is_weights: Optional[torch.Tensor] = None, dp_size=1, batch_num_tokens=None,
                   global_batch_size=None, **overrides):
    """`policy_loss` of one context-parallel shard: the ranks' losses add up to the unsplit batch's loss.

    Each rank of `group` (the context-parallel group) holds the next consecutive shard, in rank order, of the
    same S sequences: padded `[S, T_k]` or packed `[N_k]` + `cu_seqlens [S + 1]` (a sequence may have no
    position on a rank); advantages `[S]` (the same on every rank) or per token. Every token then gets the
    mask, loss and gradient of the unsplit sequence (cppo: `cp_shard_state`; dppo and ppo are local).

    Normalizers: `batch_num_tokens` and `global_batch_size` default to the counts of the whole sequences of
    the group, summed over `dp_group` too when given (one more all_reduce); `dp_size` as in `policy_loss`
    (the gradient reduction of the data-parallel x context-parallel mesh averages over its ranks: pass the
    number of ranks it averages over, docs/distributed.md). `seq-mean-token-mean` and
    `seq-mean-token-sum-norm` are computed through their identities with token-sum / seq-mean-token-sum
    (1 / n_i of the whole sequence as a per-token factor; the padded width of the whole row), since the
    shard alone knows neither. The metrics are the shard's (means over its valid tokens).
    Returns `(loss, metrics)`.
    """
    config = resolve_config(config, overrides)
    if config.method == "cppo":
        state = cp_shard_state(log_prob, old_log_prob, response_mask, cu_seqlens=cu_seqlens, config=config,
                               group=group)
        carried, sequence_tokens, padded_width = state.carried, state.sequence_tokens, state.padded_width
    else:
        carried = NO_CARRIED_STATE
        sequence_tokens, padded_width = _sequence_tokens(log_prob, response_mask, cu_seqlens, group)
    with torch.no_grad():
        counts = torch.stack([sequence_tokens.sum(), (sequence_tokens > 0).sum()])
        if dp_group is not None:
            dist.all_reduce(counts, group=dp_group)
    batch_num_tokens = counts[0] if batch_num_tokens is None else batch_num_tokens
    global_batch_size = counts[1] if global_batch_size is None else global_batch_size

    mode = config.loss_agg_mode
    if mode == "seq-mean-token-mean":  # sum_i (L_i / n_i) / N_seq = token-sum of l_t / n_i, scaled by 1 / N_seq
        tokens = _flat_tokens(log_prob, response_mask, cu_seqlens)
        inverse = (1.0 / (sequence_tokens.to(torch.float64) + SEQ_MEAN_EPS))[tokens.seq].reshape(log_prob.shape)
        inverse = inverse.to(compute_dtype(log_prob.dtype))
        rollout_is_weights = inverse if rollout_is_weights is None else rollout_is_weights * inverse
        dp_size = _ratio(dp_size, global_batch_size, log_prob.device)
        config = config.replace(loss_agg_mode="token-sum")
    elif mode == "seq-mean-token-sum-norm":  # seq-mean-token-sum / loss_scale_factor (default: the whole width)
        scale = resolve_loss_scale_factor(mode, config.loss_scale_factor, None if cu_seqlens is not None
                                          else padded_width)
        dp_size = _ratio(dp_size, scale, log_prob.device)
        config = config.replace(loss_agg_mode="seq-mean-token-sum", loss_scale_factor=None)
    return run_policy_loss(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                           (dp_size, batch_num_tokens, global_batch_size), carried, config, backend)


def _sequence_tokens(log_prob, response_mask, cu_seqlens, group):
    """n_i of the whole sequences and the whole padded width, for the methods without a carried state."""
    tokens = _flat_tokens(log_prob, response_mask, cu_seqlens)
    counts = torch.zeros(tokens.num_seqs, dtype=torch.int64, device=log_prob.device)
    counts.index_add_(0, tokens.seq, tokens.valid.long())
    shards = _all_gather(torch.stack([tokens.seq_positions, counts], dim=1), group)
    totals = shards[:, :, 0].sum(dim=0)
    width = totals.max() if tokens.num_seqs else torch.zeros((), dtype=torch.int64, device=log_prob.device)
    return shards[:, :, 1].sum(dim=0), width


def _ratio(numerator, denominator, device) -> torch.Tensor:
    """numerator / denominator as a 0-dim float64 tensor, 0 where the denominator is 0 (nothing to average)."""
    num, den = (v.to(torch.float64).reshape(()) if isinstance(v, torch.Tensor)
                else torch.full((), float(v), dtype=torch.float64, device=device) for v in (numerator, denominator))
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
