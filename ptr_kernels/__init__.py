"""ptr_kernels: fused Triton kernels for position-dependent trust-region policy losses (CPPO, DPPO, PPO)."""

from .api import PolicyLoss, policy_loss
from .config import PolicyLossConfig
from .from_hidden import policy_loss_from_hidden
from .from_logits import policy_loss_from_logits
from .reference import policy_loss_reference

__all__ = ["PolicyLoss", "PolicyLossConfig", "policy_loss", "policy_loss_from_hidden", "policy_loss_from_logits",
           "policy_loss_reference"]
__version__ = "0.1.0"
