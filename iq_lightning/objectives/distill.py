"""On-policy distillation over the whole vocabulary (GKD, TRL's SDFT)."""

from __future__ import annotations

import torch

from iq_lightning.config import ObjectiveSpec
from iq_lightning.errors import ConfigError
from iq_lightning.forward import float32_head, response_logits
from iq_lightning.logprobs import token_logprobs
from iq_lightning.losses import DIVERGENCES, distill_loss
from iq_lightning.objective import estimated_optimal_logprobs
from iq_lightning.objectives.base import Objective, StepLoss, batch_prompts, batch_responses


class Distill(Objective):
    """On-policy distillation: D(pi_hat || pi_theta) per token over the whole vocabulary along
    the policy's own samples (losses.distill_loss: reverse KL, forward KL or generalized JSD).

    The teacher pi_hat ∝ pi_w^alpha pi_l^(1-alpha) is pi_w at alpha = 1. Whole teacher
    distributions cannot be stored per sample (V floats per token), so the guides run again in
    every training step, without gradients: one more guide pass per sample than Inverse-Q*."""

    name = "distill"
    guides_in_step = True

    @classmethod
    def from_spec(cls, spec: ObjectiveSpec, alpha: float, reduction: str) -> "Distill":
        return cls(alpha, spec.divergence, spec.beta, reduction)

    @classmethod
    def check(cls, spec: ObjectiveSpec, run) -> None:
        if not 0.0 <= spec.beta <= 1.0:
            raise ConfigError(f"objective.beta (the JSD mixture weight) must be in [0, 1], got {spec.beta}")

    def __init__(self, alpha: float, divergence: str = "reverse_kl", beta: float = 0.5, reduction: str = "token_mean"):
        if divergence not in DIVERGENCES:
            raise ConfigError(f"objective.divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
        self.alpha, self.divergence, self.beta, self.reduction = alpha, divergence, beta, reduction

    def step(self, policy, batch, guide) -> StepLoss:
        with torch.no_grad():
            logits_w, logits_l, _ = guide._guide_logits(batch_prompts(batch), batch_responses(batch))
            teacher = estimated_optimal_logprobs(logits_w, logits_l, self.alpha)
            del logits_w, logits_l
        with float32_head(policy, batch["input_ids"].device.type):
            student = response_logits(policy, batch)
        teacher = teacher.to(student.device)
        loss = distill_loss(student, teacher, batch["response_mask"], self.divergence, self.beta, reduction=self.reduction)
        policy_logprobs = token_logprobs(student.detach(), batch["response_ids"])
        return StepLoss(loss, policy_logprobs, {})
