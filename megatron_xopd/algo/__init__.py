"""The X-OPD objective: advantages, rollout weights, the sampled-token loss and the divergence variants."""

from .loss import (
    CROSS_MODAL,
    IN_MODAL,
    LOSSES,
    RESPONSES,
    XOPDConfig,
    policy_gradient_terms,
    rollout_weights,
    token_advantages,
    weighted_loss,
)

__all__ = [
    "CROSS_MODAL",
    "IN_MODAL",
    "LOSSES",
    "RESPONSES",
    "XOPDConfig",
    "policy_gradient_terms",
    "rollout_weights",
    "token_advantages",
    "weighted_loss",
]
