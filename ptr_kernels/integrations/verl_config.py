"""verl config classes for `ptr_cppo`: verl 0.9.1 turns each config section into a strict dataclass, which refuses
keys it does not declare. `CPPOPolicyLossConfig` is verl's `PolicyLossConfig` with the `cppo_*` keys of
`ptr_kernels.integrations.verl.CPPO_KEYS`, selected with the section's `_target_`:

    actor_rollout_ref.actor.policy_loss._target_=ptr_kernels.integrations.verl_config.CPPOPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=ptr_cppo
    +actor_rollout_ref.actor.policy_loss.cppo_w_min=0.7

Its defaults are the authors' verl CPPO (docs/math.md section 11); values are checked when the config is built
(ValueError naming the key). Importing this module imports verl.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from verl.workers.config import PolicyLossConfig as VerlPolicyLossConfig

from ..config import PolicyLossConfig
from .verl import CPPO_KEYS, cppo_value


@dataclass
class CPPOPolicyLossConfig(VerlPolicyLossConfig):
    """verl's policy-loss section with `ptr_cppo`'s options; every other field is verl's."""

    loss_mode: str = "ptr_cppo"
    cppo_w_min: float = 0.8
    cppo_delta_b: float = 0.02
    cppo_delta_b_q: Optional[float] = 0.9
    cppo_delta_b_k: float = 1.0
    cppo_delta_b_max_mult: float = 2.0
    cppo_length_mode: Any = "padded"  # "padded", "sequence" or an int horizon
    cppo_gate: str = "hard"
    cppo_divergence: str = "binary_tv"
    cppo_surrogate: str = "logp"

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        keys = [key for key in CPPO_KEYS if hasattr(self, key)]  # cppo_w_len_mode is cppo_length_mode here
        try:
            PolicyLossConfig(method="cppo", **{CPPO_KEYS[key]: cppo_value(key, getattr(self, key)) for key in keys})
        except ValueError as error:  # name the verl key, not the PolicyLossConfig field
            for key in keys:
                if f"PolicyLossConfig.{CPPO_KEYS[key]}=" in str(error):
                    raise ValueError(f"policy_loss.{key}={getattr(self, key)!r} is invalid: {error}") from None
            raise
