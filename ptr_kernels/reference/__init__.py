"""The pure-PyTorch references, the readable statement of docs/math.md that every kernel is tested against:
`tokens` (the token-level loss, its aggregation and metrics), `logits` (the loss from logits: log_softmax
materialized in float64, then `tokens` with D given) and `hidden` (the LM head materialized, then `logits`).

`from ptr_kernels.reference import ...` reads the token-level names from here."""

from .tokens import (SEQ_MEAN_EPS, TokenTerms, aggregate, calibrated_delta_b, compute_dtype, divergence,
                     final_state, metrics, policy_loss_reference, position_weight, token_terms, valid_values)

__all__ = ["SEQ_MEAN_EPS", "TokenTerms", "aggregate", "calibrated_delta_b", "compute_dtype", "divergence",
           "final_state", "metrics", "policy_loss_reference", "position_weight", "token_terms", "valid_values"]
