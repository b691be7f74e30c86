"""The host side of the kernels: everything the host does around a launch, nothing the kernels compute.

- where the kernels run (`check_device`: CUDA, or CPU tensors in the Triton interpreter) and contiguous inputs;
- every size: the token kernel's BLOCK, its grid of work items and its scratch rows; the vocabulary kernels'
  BLOCK_V and warps; the LM head's tokens per chunk;
- the launches, their arguments and their outputs: `fused_forward` (the token kernel, whose last program also
  reduces), `scale_grad` (the backward), `logits_forward` / `logits_backward` (the vocabulary kernels) and
  `logits_loss_forward` (the from-logits forward: the vocabulary kernel, then the token kernel with D given);
- `finish`: the loss and the metrics dict from `aux`, in the reference's dtype.

No host sync: every size comes from shapes, and a normalizer is a number or a device tensor's pointer.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple, Optional

import torch
import triton

from ..carried_state import NO_CARRIED_STATE, SHARD_FINAL, CarriedState
from . import ids, reduce, token
from . import logits as logits_kernels
from .plan import KernelPlan, token_launch

MIN_BLOCK = 16
MIN_FLAGS = 1 << 16  # flags of the launch state allocated at least (one per item slot)
SCALE_BLOCK = 1024  # positions per program of the backward
MAX_BLOCK_V = 4096  # vocabulary entries per step of the logits kernels
CHUNK_BUDGET_BYTES = 1 << 30  # the LM head: one chunk's logits and their gradient, at most
CHUNK_FREE_FRACTION = 4  # ... and at most a quarter of the device's free memory
MIN_CHUNK, MAX_CHUNK = 16, 8192  # tokens per chunk: a GEMM of at least a few tiles, at most a bounded buffer


# ---- where the kernels run, and their inputs ----

def interpreter_active() -> bool:
    """Whether the kernels run in the Triton interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(token.token_kernel, InterpretedFunction)


INTERPRETER_ACTIVE = interpreter_active()


def check_device(device: torch.device) -> None:
    """The Triton kernels run on CUDA tensors, and on CPU tensors in the Triton interpreter only (a RuntimeError
    says how to enable it); other devices (meta, mps, ...) are a ValueError."""
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETER_ACTIVE):  # the common case, decided fast
        return
    if device.type != "cpu":
        raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU tensors in the Triton interpreter), "
                         f"got tensors on {device}: use backend='reference'")
    raise RuntimeError(
        "backend='triton' got CPU tensors, but Triton kernels run on CPU only in the Triton interpreter: "
        "set the environment variable TRITON_INTERPRET=1 before triton is first imported "
        "(or use backend='reference' / move the tensors to CUDA)")


def contiguous(t):
    """`t` as a contiguous tensor (None stays None); `is_contiguous` first: cheaper than a no-op `contiguous`."""
    return t if t is None or t.is_contiguous() else t.contiguous()


# ---- the token kernel: tiling, grid, launch state, launch ----

_forced_block = 0  # BLOCK set by `forced_block_size` (0: chosen from the shapes)


@contextlib.contextmanager
def forced_block_size(block: int):
    """Every token-kernel launch in the context uses `block` positions per block (a power of two in
    [16, 1024]; 0: chosen from the shapes), so that tests reach many blocks, or one program per sequence."""
    global _forced_block
    previous, _forced_block = _forced_block, block
    try:
        yield
    finally:
        _forced_block = previous


def block_size(num_tokens: int, num_seqs: int) -> int:
    """A power of two near the mean sequence length, in [MIN_BLOCK, MAX_BLOCK] (shapes only, no sync)."""
    mean = -(-num_tokens // max(num_seqs, 1))
    return min(max(1 << (mean - 1).bit_length(), MIN_BLOCK), ids.MAX_BLOCK.value)  # plain Python: host time


def stage_count(prepass: bool, quantile: bool, packed: bool, extent: int, block: int) -> int:
    """Stages of work items in one launch (the token kernel decides the same): 1, or when the kernel needs a
    pre-pass and a tile can have several chunks (packed, or rows longer than a chunk) the pre-pass items, for a
    calibrated delta_b with one-row tiles the gathering items (quantile.gather_keys), then the deciding items."""
    if not prepass or not (packed or extent > ids.CHUNK.value):
        return 1
    return 3 if quantile and block == ids.TILE.value else 2


def launch_sizes(packed: bool, num_seqs: int, extent: int, block: int, stages: int) -> tuple:
    """(programs, item slots, histogram rows) of one launch, from the shapes alone (no sync).

    Work items (`chunks.work_item` numbers them): a main item per tile, then room for the tiles' later chunks,
    the overflow items. The deciding stage runs every item; each earlier stage the overflow items only (chunk
    1's item also does chunk 0's part; a tile of one chunk needs none). A slot (flag, scratch row) per item and
    stage, at least one per program. With gathering items (3 stages, one-row tiles), a histogram row of the
    launch state per possible first overflow index (quantile.gather_keys)."""
    tiles = -(-num_seqs // (ids.TILE.value // block))
    if packed:
        overflow = extent // ids.CHUNK.value
    else:
        overflow = tiles * (max(-(-extent // ids.CHUNK.value), 1) - 1)
    items = tiles + overflow
    grid = max(items + (stages - 1) * overflow, 1)
    return grid, max(stages * items, grid), overflow + 1 if stages == 3 else 0


def scratch_size(slots: int, block: int) -> int:
    """Floats of the items' scratch rows after the per-sequence rows of `sums`."""
    return slots * (ids.TILE.value // block) * ids.ITEM_WIDTH.value


def launch_state(device: torch.device, slots: int, rows: int = 0) -> torch.Tensor:
    """The int32 launch state of `device` (the count, the ticket, a flag per item slot, then `rows` histogram
    rows of ids.SELECT_WIDTH), zero, with room for `slots` flags: allocated on the first call and when a larger
    launch comes (make those calls outside a CUDA graph capture). Launches in one stream run in order and share
    it; two losses running at once on two streams of one device would not (docs/kernels.md)."""
    size = ids.FLAGS.value + slots + rows * ids.SELECT_WIDTH.value
    state = _LAUNCH_STATES.get(device)
    if state is None or state.numel() < size:
        state = _LAUNCH_STATES[device] = torch.zeros(max(2 * size, ids.FLAGS.value + MIN_FLAGS), dtype=torch.int32,
                                                     device=device)
    elif device.type == "cpu":  # the interpreter: a launch stopped part-way (an exception, Ctrl-C) left counts
        state.zero_()
    return state


_LAUNCH_STATES = {}


def reduction_arguments(agg_mode: int, loss_scale_factor, normalizers: tuple) -> tuple:
    """The run-time arguments of `reduce.reduce_stats` after `num_seqs`: (dp_ptr, dp_factor, tokens_ptr, tokens,
    seqs_ptr, seqs). `normalizers` = (dp_size, batch_num_tokens, global_batch_size), each None, a number or a
    0-dim tensor: a tensor travels as a pointer, a number as a float; absent counts are -1. dp_factor is the
    number dp_size (1 when absent or a tensor), divided by `loss_scale_factor` for seq-mean-token-sum-norm (a
    zero width gives 0, as a zero count does)."""
    dp, tokens, seqs = normalizers
    if isinstance(dp, torch.Tensor) or isinstance(tokens, torch.Tensor) or isinstance(seqs, torch.Tensor):
        return _reduction_arguments(agg_mode, loss_scale_factor, dp, tokens, seqs)
    return _number_reduction_arguments(agg_mode, loss_scale_factor, dp, tokens, seqs)  # the common case, cached


def _reduction_arguments(agg_mode: int, loss_scale_factor, dp, tokens, seqs) -> tuple:
    dp_ptr, dp_factor = _normalizer_arguments(dp, 1.0)
    if agg_mode == ids.AGG_SEQ_MEAN_TOKEN_SUM_NORM.value:
        dp_factor = dp_factor / loss_scale_factor if loss_scale_factor else 0.0
    return (dp_ptr, dp_factor, *_normalizer_arguments(tokens, -1.0), *_normalizer_arguments(seqs, -1.0))


# normalizers that are numbers or None: the arguments once per combination
_number_reduction_arguments = functools.lru_cache(maxsize=1024)(_reduction_arguments)


def _normalizer_arguments(value, absent: float) -> tuple:
    """(pointer, number) of one global normalizer for `reduce_stats`: a tensor's pointer, or the number (`absent`
    where there is none; beside a pointer only dp_size's is read, as a factor of 1)."""
    if value is None or isinstance(value, torch.Tensor):
        return value, absent
    return None, float(value)


def fused_forward(log_prob, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, divergence, *,
                  plan: KernelPlan, adv_per_seq: bool, loss_scale_factor, normalizers: tuple,
                  carried: CarriedState = NO_CARRIED_STATE):
    """Launch the token kernel on validated inputs: one launch at every shape (its last program reduces the
    per-sequence sums into the loss and the metrics), no host sync.

    Args: the tensors of `policy_loss` (padded `[B, T]` or packed `[N]` + `cu_seqlens [S + 1]`), `divergence`
    (D per token, f32, like log_prob: given exactly when the config's divergence is a Top-K one);
    `loss_scale_factor` the divisor of seq-mean-token-sum-norm (`Layout.loss_scale_factor`); `normalizers` =
    (dp_size, batch_num_tokens, global_batch_size), each None, a number or a 0-dim tensor; `carried` a shard of
    longer sequences (docs/math.md section 8).
    Returns: loss `[]` f32; aux `[plan.aux_size]` f32 (the backward scale, then the metrics); grad
    `[like log_prob]` f32: d loss / d log_prob_t up to the backward scale (0 at masked positions); with
    `carried.output_final_state` also final_state `[S, 3]` float64, the state after the shard.
    """
    packed = cu_seqlens is not None
    num_seqs = cu_seqlens.shape[0] - 1 if packed else log_prob.shape[0]
    numel = log_prob.numel()
    extent = numel if packed else log_prob.shape[1]
    block = _forced_block or block_size(numel, num_seqs)
    constexprs, prepass = token_launch(plan, packed, adv_per_seq, response_mask is not None,
                                       carried.sequence_length is not None, carried.sequence_delta_b is not None, block)
    stages = stage_count(prepass, constexprs["BUDGET"] == ids.BUDGET_QUANTILE.value, packed, extent, block)
    grid, slots, select_rows = launch_sizes(packed, num_seqs, extent, block, stages)
    # outputs: grad like log_prob (contiguous, as the kernel writes it; log_prob may be a view), the loss (a tensor
    # of its own: a user may modify it in place), and one buffer for aux, the per-sequence sums (a row at least:
    # a batch without sequences still launches) and the work items' rows
    grad = torch.empty_like(log_prob, dtype=torch.float32, memory_format=torch.contiguous_format)
    loss = grad.new_empty(())
    sums = grad.new_empty(ids.OUT_WIDTH.value + max(num_seqs, 1) * ids.NUM_STATS.value
                          + scratch_size(slots, block))
    device = log_prob.device
    shard = carried.pack(num_seqs, device) if carried.given else None
    # contiguous inputs (a mask of any dtype: != 0 is valid)
    token.token_kernel[(grid,)](
        contiguous(log_prob), contiguous(old_log_prob), contiguous(advantages), contiguous(response_mask),
        contiguous(rollout_is_weights), contiguous(divergence), contiguous(cu_seqlens), shard, grad, loss, sums,
        launch_state(device, slots, select_rows), plan.params(device),
        *reduction_arguments(constexprs["MODE"], loss_scale_factor, normalizers), num_seqs, extent, **constexprs)
    aux = sums[:plan.aux_size]  # OUT_AUX = 0
    if carried.output_final_state:  # a tensor of its own, not a view that would keep the shard rows alive
        return loss, aux, grad, shard[:, SHARD_FINAL:].clone()
    return loss, aux, grad


def scale_grad(grad: torch.Tensor, upstream: torch.Tensor, aux: torch.Tensor, dtype: torch.dtype):
    """Backward in one launch: grad * upstream * aux[AUX_SCALE] in `dtype` (upstream: a 1-element tensor)."""
    out = torch.empty_like(grad, dtype=dtype, memory_format=torch.contiguous_format)
    numel = grad.numel()
    if numel:
        reduce.scale_grad_kernel[(-(-numel // SCALE_BLOCK),)](grad, upstream, aux, out, numel, BLOCK=SCALE_BLOCK)
    return out


def finish(loss: torch.Tensor, aux: torch.Tensor, method: str, dtype: torch.dtype):
    """`(loss, metrics)` in the reference's dtype (float64 for float64 input), the metrics from one unbind."""
    if dtype == torch.float64:
        loss, aux = loss.to(dtype), aux.to(dtype)
    values = aux.unbind()
    return loss, {name: values[i] for name, i in reduce.METRIC_POSITIONS[method]}


# ---- the vocabulary kernels ----

class LogitsForward(NamedTuple):
    """Per-token outputs of `logits_forward`, shape of input_ids, float32, 0 at masked positions."""

    log_prob: torch.Tensor  # log pi(y_t)
    divergence: Optional[torch.Tensor]  # Top-K D_t (None for a binary divergence)
    entropy: torch.Tensor  # H(pi_t)
    log_normalizer: torch.Tensor  # log sum exp(logits / temperature): the backward's softmax


def _row_strides(t: torch.Tensor) -> tuple:
    """(width, stride of the row index, stride of the position) for `[B, T, V]` or packed `[N, V]`."""
    if t.dim() == 3:
        return max(t.shape[1], 1), t.stride(0), t.stride(1)
    return max(t.shape[0], 1), 0, t.stride(0)


def _block_v(vocab: int) -> int:
    return min(triton.next_power_of_2(max(vocab, 1)), MAX_BLOCK_V)


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 2048 else 4


def logits_forward(logits, input_ids, mask, old_log_prob, topk_ids, topk_log_probs, *, temperature: float,
                   topk: int) -> LogitsForward:
    """One launch of `logits.logits_forward_kernel`.

    logits `[B, T, V]` or `[N, V]` (any float dtype, last dim contiguous); input_ids, mask (any dtype, != 0 valid,
    or None), old_log_prob of shape logits.shape[:-1], contiguous; topk_ids / topk_log_probs `[..., K]` contiguous
    (or None when `topk` is TOPK_NONE); `topk` one of TOPK_NONE, TOPK_TV, TOPK_KL (`KernelPlan.topk`).
    """
    shape, vocab = input_ids.shape, logits.shape[-1]
    f32 = dict(dtype=torch.float32, device=logits.device)
    lp, entropy, lse = (torch.empty(shape, **f32) for _ in range(3))
    divergence = torch.empty(shape, **f32) if topk != ids.TOPK_NONE.value else None
    num_k = topk_ids.shape[-1] if topk_ids is not None else 0
    if input_ids.numel():
        block_v = _block_v(vocab)
        logits_kernels.logits_forward_kernel[(input_ids.numel(),)](
            logits, input_ids, mask, old_log_prob, topk_ids, topk_log_probs, lp, divergence, entropy, lse,
            *_row_strides(logits), vocab, num_k, 1.0 / temperature,
            TOPK=topk, HAS_MASK=mask is not None, BLOCK_V=block_v,
            BLOCK_K=triton.next_power_of_2(max(num_k, 1)), num_warps=_num_warps(block_v))
    return LogitsForward(lp, divergence, entropy, lse)


def logits_backward(logits, input_ids, mask, log_normalizer, grad_log_prob, upstream, aux, *, temperature: float,
                    out: torch.Tensor) -> torch.Tensor:
    """One launch of `logits.logits_backward_kernel` into `out` (like logits, last dim contiguous; may be
    logits): d loss / d logits."""
    if input_ids.numel():
        block_v = _block_v(logits.shape[-1])
        logits_kernels.logits_backward_kernel[(input_ids.numel(),)](
            logits, input_ids, mask, log_normalizer, grad_log_prob, upstream, aux, out,
            *_row_strides(logits), *_row_strides(out)[1:], logits.shape[-1], 1.0 / temperature,
            HAS_MASK=mask is not None, BLOCK_V=block_v, num_warps=_num_warps(block_v))
    return out


def masked_mean(values: torch.Tensor, mask) -> torch.Tensor:
    """Mean of `values` (0 at masked positions) over the valid positions; 0 when there is none (no sync)."""
    if mask is None:
        return values.sum() / max(values.numel(), 1)
    count = (mask != 0).sum()
    return torch.where(count > 0, values.sum() / count.clamp(min=1), 0.0)


def logits_loss_forward(logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
                        topk_ids, topk_log_probs, *, plan: KernelPlan, temperature: float, adv_per_seq: bool,
                        loss_scale_factor, normalizers: tuple, carried: CarriedState = NO_CARRIED_STATE):
    """The from-logits forward on validated inputs: `logits_forward` (log pi(y_t), the Top-K D_t, entropy, log Z
    per token), then `fused_forward` with that log pi(y_t) and D (for a binary divergence the token kernel
    computes D itself), then the entropy's mean. Returns `(loss, aux, entropy_mean, grad_log_prob,
    log_normalizer, input_ids, mask)` (+ `final_state` when `carried` asks for it); the last four (ids and mask
    made contiguous) feed the backward."""
    mask = contiguous(response_mask)  # bool, int or float: != 0 is valid, in every kernel
    input_ids = input_ids.contiguous()
    old_log_prob = old_log_prob.contiguous()
    per_token = logits_forward(logits, input_ids, mask, old_log_prob, contiguous(topk_ids),
                               contiguous(topk_log_probs), temperature=temperature, topk=plan.topk)
    loss, aux, grad_log_prob, *final_state = fused_forward(
        per_token.log_prob, old_log_prob, advantages, mask, cu_seqlens, rollout_is_weights, per_token.divergence,
        plan=plan, adv_per_seq=adv_per_seq, loss_scale_factor=loss_scale_factor, normalizers=normalizers,
        carried=carried)
    entropy = masked_mean(per_token.entropy, mask)
    return (loss, aux, entropy, grad_log_prob, per_token.log_normalizer, input_ids, mask, *final_state)


# ---- the LM head ----

def default_chunk_size(vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk of the LM head: the largest power of two whose logits (float32) and logits gradient
    (`dtype`) fit in 1 GiB and in a quarter of the free device memory, within [16, 8192]. (V = 152064 in bf16:
    1024 tokens.)"""
    budget = CHUNK_BUDGET_BYTES
    if device.type == "cuda":  # a driver query, not a stream sync; the caching allocator's free blocks count
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(budget, free // CHUNK_FREE_FRACTION)
    per_token = vocab * (accumulator_dtype(dtype).itemsize + dtype.itemsize)
    tokens = max(budget // per_token, 1)
    return max(MIN_CHUNK, min(MAX_CHUNK, 1 << (tokens.bit_length() - 1)))


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the LM head's logits and of the weight gradient's sum: float32, float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)
