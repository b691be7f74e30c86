"""Public API: `policy_loss_from_logits`, the policy loss with Top-K divergences, fused over the vocabulary."""

from __future__ import annotations

from typing import Optional

import torch

from .api import resolve_backend, triton_backend
from .carried_state import CarriedState
from .config import PolicyLossConfig, resolve_config
from .reference.logits import reference_policy_loss_from_logits
from .validation import check_logits_inputs, read_topk


def policy_loss_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, old_log_prob: torch.Tensor,
                            advantages: torch.Tensor, response_mask: Optional[torch.Tensor] = None, *,
                            cu_seqlens: Optional[torch.Tensor] = None,
                            rollout_topk_ids: Optional[torch.Tensor] = None,
                            rollout_topk_log_probs: Optional[torch.Tensor] = None, temperature: float = 1.0,
                            config: Optional[PolicyLossConfig] = None, backend: str = "auto",
                            inplace_grad: bool = False, rollout_is_weights: Optional[torch.Tensor] = None,
                            dp_size=1, batch_num_tokens=None, global_batch_size=None,
                            initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                            position_offset: Optional[torch.Tensor] = None,
                            sequence_length: Optional[torch.Tensor] = None,
                            sequence_delta_b: Optional[torch.Tensor] = None, **overrides):
    """The policy loss of `policy_loss` with log pi(y_t) and the divergence computed from the logits.

    pi = softmax(logits / temperature); log_prob_t = log pi(y_t) is the only path of the gradient (D_t is a
    mask input). Divergences: `binary_tv`, `binary_kl` (docs/math.md section 2) and `topk_tv`, `topk_kl`
    (section 7: TopK_t union {y_t} plus an "other" bucket), every method and option of `policy_loss`.

    Args:
        logits: `[B, T, V]` (padded) or `[N, V]` (packed), float32 / bfloat16 / float16, the logits of the
            policy being trained at the positions that predict y_t. Rows may be strided (a slice such as
            `logits[:, :-1]` is read in place); the last dimension should be contiguous.
        input_ids: `[B, T]` / `[N]` int32 or int64: the sampled tokens y_t, in [0, V) at valid positions
            (masked positions may hold anything, e.g. -100).
        old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights, dp_size, batch_num_tokens,
            global_batch_size, config, overrides: as in `policy_loss`.
        rollout_topk_ids: `[B, T, K]` / `[N, K]` int32 or int64, the rollout engine's top-K ids (distinct per
            valid position, in [0, V)); required with K >= 1 for a Top-K divergence, unused otherwise.
        rollout_topk_log_probs: same shape, float: their log-probs under mu (-inf: probability 0).
        temperature: the sampling temperature (finite, > 0).
        backend: "auto" (Triton kernels for CUDA tensors, reference elsewhere), "reference" or "triton".
        initial_state, output_final_state, position_offset, sequence_length, sequence_delta_b: a shard of a
            longer sequence (context parallelism), as in `policy_loss` (docs/math.md section 8).
        inplace_grad: (triton) write the logits' gradient into the logits buffer instead of a new tensor,
            saving V bytes per token in the backward. The logits are gone after `backward()`: their version
            counter is bumped, so a graph that saved them for its own backward raises instead of reading the
            gradient. Needs a contiguous last dimension. The reference ignores it.

    Returns:
        `(loss, metrics)`: the metrics of `policy_loss` plus `entropy`, the mean entropy of pi over the valid
        tokens; with `output_final_state` also the carried state after the shard `[S, 3]`. Bad options or
        inputs raise ValueError naming the argument; on an accelerator the values of
        ids are checked without a host sync (an asynchronous device assert), and the kernels poison a bad id
        with NaN.
    """
    config = resolve_config(config, overrides)
    backend = resolve_backend(backend, logits)
    carried = CarriedState(initial_state, position_offset, sequence_length, sequence_delta_b, output_final_state)
    normalizers = (dp_size, batch_num_tokens, global_batch_size)
    layout = check_logits_inputs(logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens,
                                 rollout_topk_ids, rollout_topk_log_probs, temperature, config, inplace_grad,
                                 rollout_is_weights, normalizers, carried=carried,
                                 values_in_kernel=backend == "triton")
    rollout_topk_ids, rollout_topk_log_probs = read_topk(config, rollout_topk_ids, rollout_topk_log_probs)
    inputs = (logits, input_ids, old_log_prob, advantages, response_mask, cu_seqlens, rollout_is_weights,
              rollout_topk_ids, rollout_topk_log_probs)
    if backend == "reference":
        return reference_policy_loss_from_logits(*inputs, temperature=temperature, config=config, layout=layout,
                                                 normalizers=normalizers, carried=carried)
    return triton_backend().triton_policy_loss_from_logits(*inputs, temperature=temperature, config=config,
                                                           layout=layout, normalizers=normalizers, carried=carried,
                                                           inplace_grad=inplace_grad)
