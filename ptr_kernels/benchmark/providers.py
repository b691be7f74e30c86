"""The providers: each one's loss as a function of one input set, and one timed step (fwd or fwd+bwd).

- fused:   `policy_loss(..., backend="triton")` (CUDA; on CPU only through TRITON_INTERPRET=1 and on request)
- eager:   `policy_loss_reference` on the same device
- compile: `torch.compile(policy_loss_reference, dynamic=False)`, one compile per shape, compile time excluded
- loop:    `baselines.cppo_per_sequence_loop` (one Python iteration per sequence, as the authors' code; cppo, padded)
- verl:    `baselines.verl_policy_loss_dppo_tv` / `verl_policy_loss_vanilla` (dppo / ppo, padded)
"""

from __future__ import annotations

from typing import Callable

import torch

from ..reference import policy_loss_reference
from ..testing.baselines import cppo_per_sequence_loop, verl_policy_loss_dppo_tv, verl_policy_loss_vanilla
from .workloads import Inputs, method_config

PROVIDERS = ("fused", "eager", "compile", "loop", "verl")


def supports(provider: str, method: str, layout: str) -> bool:
    """Whether `provider` computes `method` on `layout` input (the loop and verl: padded only)."""
    if provider == "loop":
        return method == "cppo" and layout == "padded"
    if provider == "verl":
        return method in ("dppo", "ppo") and layout == "padded"
    return True


def make_call(provider: str, method: str) -> Callable[[Inputs], torch.Tensor]:
    """The provider's loss as a function of one input set (returns the 0-dim loss)."""
    cfg = method_config(method)
    if provider in ("eager", "compile", "fused"):
        def reference(inp: Inputs, fn=policy_loss_reference):
            return fn(inp.log_prob, inp.old_log_prob, inp.advantages, inp.mask, cu_seqlens=inp.cu_seqlens,
                      config=cfg)[0]
        if provider == "eager":
            return reference
        if provider == "compile":
            # one compile per (shape, method), all kept for the launch counts: more graphs of one function
            # than dynamo's default recompile limit (8), past which it would silently run eager
            config = torch._dynamo.config
            limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, limit, max(getattr(config, limit), 64))
            compiled = torch.compile(policy_loss_reference, dynamic=False)
            return lambda inp: reference(inp, compiled)
        from ..api import policy_loss
        return lambda inp: policy_loss(inp.log_prob, inp.old_log_prob, inp.advantages, inp.mask,
                                       cu_seqlens=inp.cu_seqlens, config=cfg, backend="triton")[0]
    if provider == "loop":
        return lambda inp: cppo_per_sequence_loop(inp.log_prob, inp.old_log_prob, inp.advantages, inp.mask,
                                                  config=cfg)[0]
    if provider == "verl" and method == "dppo":
        return lambda inp: verl_policy_loss_dppo_tv(inp.old_log_prob, inp.log_prob, inp.advantages,
                                                    inp.mask_float, cfg.loss_agg_mode, clip_ratio=cfg.delta)[0]
    if provider == "verl" and method == "ppo":
        return lambda inp: verl_policy_loss_vanilla(inp.old_log_prob, inp.log_prob, inp.advantages,
                                                    inp.mask_float, cfg.loss_agg_mode,
                                                    clip_ratio_low=cfg.clip_ratio_low,
                                                    clip_ratio_high=cfg.clip_ratio_high)[0]
    raise ValueError(f"provider {provider!r} does not run method {method!r}")


def step(call: Callable[[Inputs], torch.Tensor], inp: Inputs, mode: str) -> torch.Tensor:
    """One call in `mode`: the forward ("fwd") or the forward and `loss.backward()` ("fwd_bwd")."""
    loss = call(inp)
    if mode == "fwd_bwd":
        loss.backward()
    return loss


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (absolute when b is all zero), in float64."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    return err / scale if scale > 0 else err
