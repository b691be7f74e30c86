"""`GRPOTrainer`: TRL 1.16's `trl.GRPOTrainer` with its policy loss computed by `ptr_kernels.policy_loss`.

    from ptr_kernels.integrations.trl import GRPOTrainer      # instead of `from trl import GRPOTrainer`
    trainer = GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=ds,
                          policy_loss_config=PolicyLossConfig(method="cppo"))   # None: TRL's own PPO clip

`policy_loss_config=None` reproduces TRL's loss for loss_type grpo, bnpo, dr_grpo, dapo and luspo (its
PPO clip with `epsilon` / `epsilon_high`, no log-ratio clamp, no dual clip) and logs TRL's clip metrics.
A `PolicyLossConfig` (CPPO, DPPO, PPO) replaces the per-token loss; its `loss_agg_mode` and
`loss_scale_factor` are set from `loss_type` (table in docs/integrations.md) and its metrics are logged
as `ptr/<name>` (and `mask_frac` also as TRL's `clip_ratio/region_mean`). A GRPOConfig option the fused
loss cannot compute is a ValueError at construction when a `PolicyLossConfig` is given; without one, TRL's own
`_compute_loss` runs instead with a one-time warning (`fallback_reason`). Importing this module imports TRL.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import trl
from trl.trainer.utils import nanmax, nanmin

from ..api import BACKENDS, policy_loss
from ..config import PolicyLossConfig, unused_fields

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def unsupported_options(args: trl.GRPOConfig, aux_loss_enabled: bool = False) -> list:
    """The options of `args` the fused loss cannot compute, each named as the user sets it."""
    options = {
        f"loss_type={args.loss_type!r} (supported: {', '.join(SUPPORTED_LOSS_TYPES)})":
            args.loss_type not in SUPPORTED_LOSS_TYPES,
        f"beta={args.beta} (KL to a reference model)": args.beta != 0.0,
        f"importance_sampling_level={args.importance_sampling_level!r}": args.importance_sampling_level != "token",
        f"top_entropy_quantile={args.top_entropy_quantile} (entropy masking)": args.top_entropy_quantile < 1.0,
        f"off_policy_mask_threshold={args.off_policy_mask_threshold} (off-policy sequence masking)":
            args.off_policy_mask_threshold is not None,
        f"delta={args.delta} (two-sided clipping)": args.delta is not None,
        f"entropy_coef={args.entropy_coef} / use_adaptive_entropy={args.use_adaptive_entropy} (an entropy bonus)":
            args.entropy_coef != 0.0 or args.use_adaptive_entropy,
        "router_aux_loss_coef (a MoE router auxiliary loss)": aux_loss_enabled,
    }
    return [option for option, applies in options.items() if applies]


class GRPOTrainer(trl.GRPOTrainer):
    """`trl.GRPOTrainer` plus `policy_loss_config` (a `PolicyLossConfig`, or None for TRL's PPO clip) and
    `policy_loss_backend` ("auto": the Triton kernel on CUDA, the reference on CPU)."""

    def __init__(self, *args, policy_loss_config: Optional[PolicyLossConfig] = None,
                 policy_loss_backend: str = "auto", **kwargs):
        if policy_loss_config is not None and not isinstance(policy_loss_config, PolicyLossConfig):
            raise ValueError(f"policy_loss_config must be a PolicyLossConfig or None, "
                             f"got {type(policy_loss_config).__name__}")
        if policy_loss_backend not in BACKENDS:
            raise ValueError(f"policy_loss_backend={policy_loss_backend!r} is invalid: expected one of "
                             f"{', '.join(map(repr, BACKENDS))}")
        grpo_config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if policy_loss_config is not None:
            # before TRL builds anything (beta != 0 would load a reference model); the router loss needs the model
            if grpo_config is not None:
                self._refuse(unsupported_options(grpo_config), policy_loss_config)
            self._warn_unused(policy_loss_config)
        super().__init__(*args, **kwargs)
        if policy_loss_config is not None:
            self._refuse(unsupported_options(self.args, self.aux_loss_enabled), policy_loss_config)
        self.policy_loss_config = policy_loss_config
        self.policy_loss_backend = policy_loss_backend
        self._fallback_warned = False

    @staticmethod
    def _refuse(options: list, config: PolicyLossConfig) -> None:
        if options:
            raise ValueError(f"ptr_kernels GRPOTrainer: policy_loss_config=PolicyLossConfig(method={config.method!r}, "
                             f"...) cannot be computed together with GRPOConfig option(s) {'; '.join(options)}: "
                             "unset them, or pass policy_loss_config=None for TRL's own loss")

    @staticmethod
    def _warn_unused(config: PolicyLossConfig) -> None:
        """One warning naming the fields of `config` that this trainer ignores."""
        from_loss_type = ("loss_agg_mode", "loss_scale_factor")  # set from loss_type below, whatever they hold
        ignored = [f"{name}={getattr(config, name)!r}" for name in unused_fields(config)
                   if name not in from_loss_type]
        ignored += [f"{name}={getattr(config, name)!r} (set from GRPOConfig.loss_type)" for name in from_loss_type
                    if getattr(config, name) != getattr(PolicyLossConfig(), name)]
        if ignored:
            warnings.warn(f"ptr_kernels GRPOTrainer: PolicyLossConfig(method={config.method!r}) ignores "
                          f"{', '.join(ignored)}", stacklevel=3)

    def fallback_reason(self) -> Optional[str]:
        """Why this trainer's configuration needs TRL's own loss, or None when ours computes it."""
        return "; ".join(unsupported_options(self.args, self.aux_loss_enabled)) or None

    def _compute_loss(self, model, inputs):
        reason = self.fallback_reason()
        if reason is not None:
            if not self._fallback_warned:
                warnings.warn(f"ptr_kernels GRPOTrainer: {reason} is not supported by the fused loss; "
                              "using TRL's own loss", stacklevel=2)
                self._fallback_warned = True
            return super()._compute_loss(model, inputs)

        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            num_images=inputs.get("num_images"),
            pixel_attention_mask=inputs.get("pixel_attention_mask"),
            spatial_shapes=inputs.get("spatial_shapes"),
            num_tiles=inputs.get("num_tiles"),
            image_sizes=inputs.get("image_sizes"),
            token_type_ids=inputs.get("token_type_ids"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
            image_position_ids=inputs.get("image_position_ids"),
        )
        # None when the old policy is the current one (TRL skips computing it): the ratio is then 1
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:
            old_per_token_logps = per_token_logps.detach()
        advantages = inputs["advantages"]
        rollout_is_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            rollout_is_weights = inputs["importance_sampling_ratio"].expand_as(per_token_logps)

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        agg_fields, normalizers, divisor = self._aggregation(inputs, mask, mode, accumulation)
        config = self._loss_config().replace(**agg_fields)
        loss, metrics = policy_loss(per_token_logps, old_per_token_logps, advantages, mask, config=config,
                                    backend=self.policy_loss_backend, rollout_is_weights=rollout_is_weights,
                                    **normalizers)
        loss = loss / divisor

        self._log_metrics(mode, entropies, per_token_logps, old_per_token_logps, advantages, mask, metrics)
        return loss

    def _loss_config(self) -> PolicyLossConfig:
        """The user's config, or TRL's PPO clip: min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r unclamped."""
        if self.policy_loss_config is not None:
            return self.policy_loss_config
        return PolicyLossConfig(method="ppo", clip_ratio_low=self.epsilon_low, clip_ratio_high=self.epsilon_high,
                                clip_ratio_c=None, log_ratio_clamp=None)

    def _aggregation(self, inputs, mask, mode: str, accumulation: int):
        """TRL's normalizer of `loss_type` as (config fields, policy_loss normalizers, divisor of the loss).

        grpo: mean over the B sequences (empty ones included) of sum / length; bnpo: sum / local tokens;
        dr_grpo: sum / (B * max_completion_length); luspo: mean over the B sequences of the sum; each divided
        by the accumulation steps. dapo: sum / (num_items_in_batch / processes * accumulation / steps_per_gen).
        """
        num_sequences = mask.size(0)
        if self.loss_type == "grpo":
            return ({"loss_agg_mode": "seq-mean-token-mean"}, {"global_batch_size": num_sequences}, accumulation)
        if self.loss_type == "bnpo":
            return {"loss_agg_mode": "token-mean"}, {}, accumulation
        if self.loss_type == "dr_grpo":
            return ({"loss_agg_mode": "seq-mean-token-sum-norm", "loss_scale_factor": self.max_completion_length},
                    {"global_batch_size": num_sequences}, accumulation)
        if self.loss_type == "luspo":
            return ({"loss_agg_mode": "seq-mean-token-sum"}, {"global_batch_size": num_sequences}, accumulation)
        # dapo: num_items_in_batch counts the tokens of the whole generation batch on all processes
        tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            tokens = tokens * accumulation / self.args.steps_per_generation
        return {"loss_agg_mode": "token-mean"}, {"batch_num_tokens": tokens}, 1

    def _global_masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        """Mean of `values [B, T]` over the valid tokens of all processes (TRL's `global_masked_mean`)."""
        totals = torch.stack([(values * mask).sum(), mask.sum().float()])
        totals = self.accelerator.reduce(totals, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    @torch.no_grad()
    def _log_metrics(self, mode, entropies, per_token_logps, old_per_token_logps, advantages, mask, metrics):
        store = self._metrics[mode]
        store["entropy"].append(self._global_masked_mean(entropies, mask))
        if self.policy_loss_config is not None:
            # our metrics are means over the local valid tokens (delta_b_mean: over the non-empty sequences):
            # weight each by its own count across processes
            count = mask.sum().float()
            sequences = (mask.sum(dim=-1) > 0).sum().float() if mask.dim() > 1 else count
            for name, value in metrics.items():
                weight = sequences if name == "delta_b_mean" else count
                totals = self.accelerator.reduce(torch.stack([value.float() * weight, weight]), reduction="sum")
                store[f"ptr/{name}"].append((totals[0] / totals[1].clamp(min=1.0)).item())
            # TRL's key for the fraction of valid tokens the trust region cuts, for existing dashboards
            store["clip_ratio/region_mean"].append(store["ptr/mask_frac"][-1])
            return
        # TRL's own clip metrics, computed as TRL does
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        ratio = torch.exp(per_token_logps - old_per_token_logps)
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        store["clip_ratio/low_mean"].append(self._global_masked_mean(low, mask))
        store["clip_ratio/high_mean"].append(self._global_masked_mean(high, mask))
        store["clip_ratio/region_mean"].append(self._global_masked_mean(torch.maximum(low, high), mask))
        per_sequence = lambda flags: (flags * mask).sum(-1) / mask.sum(-1)  # noqa: E731
        store["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(per_sequence(low))).item())
        store["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(per_sequence(high))).item())
