"""Context distillation: supervised fine-tuning on pi_w's own answers."""

from __future__ import annotations

from iq_lightning.forward import response_logprobs
from iq_lightning.losses import sft_loss
from iq_lightning.objectives.base import Objective, SamplePlan, StepLoss


class SFT(Objective):
    """Context distillation the classic way: y_w ~ pi_w(. | x_w) drawn once from the initial
    model given the principle, then L = -sum_t log pi_theta(y_w,t | x, y_w,<t) (losses.sft_loss)."""

    name = "sft"
    plan = SamplePlan(on_policy=False, principle_in_prompt=True)

    def __init__(self, reduction: str = "token_mean"):
        self.reduction = reduction

    def step(self, policy, batch, guide) -> StepLoss:
        policy_logprobs = response_logprobs(policy, batch, float32_logits=True)
        return StepLoss(sft_loss(policy_logprobs, batch["response_mask"], self.reduction), policy_logprobs, {})
