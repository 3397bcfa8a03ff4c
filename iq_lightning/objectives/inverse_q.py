"""Inverse-Q* (Algorithm 1), the default objective."""

from __future__ import annotations

from iq_lightning.forward import response_logprobs
from iq_lightning.objective import inverse_q_loss
from iq_lightning.objectives.base import Objective, StepLoss


class InverseQ(Objective):
    """L = sum_t m_t (log pi_hat(y_t) - log pi_theta(y_t))^2 on on-policy samples (Algorithm 1);
    the targets were computed by the guides when the epoch was sampled."""

    name = "inverse_q"

    def __init__(self, reduction: str = "token_mean"):
        self.reduction = reduction

    def step(self, policy, batch, guide) -> StepLoss:
        policy_logprobs = response_logprobs(policy, batch, float32_logits=True)
        loss = inverse_q_loss(policy_logprobs, batch["target_logprobs"], batch["response_mask"], self.reduction)
        return StepLoss(loss, policy_logprobs, {})
