"""Training objectives: how an objective's samples are drawn and its loss on a micro-batch.

Inverse-Q* and its baselines implement one interface, so they share the sampler, the DataModule,
the strategies, validation, logging, checkpoints and export: a comparison between them differs
only in the objective. The losses themselves are pure functions (objective.py, losses.py).

    inverse_q  Algorithm 1: regress log pi_theta(y_t) onto log pi_hat(y_t) of on-policy samples
    distill    on-policy distillation towards pi_hat over the whole vocabulary (GKD / SDFT);
               at alpha = 1 the teacher is pi_w, TRL's self-distillation with the principle as
               privileged context
    sft        context distillation: pi_w's own answers to x_w, drawn once, then supervised
               fine-tuning on (x, y_w)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from iq_lightning.config import ObjectiveSpec
from iq_lightning.data import EncodedPrompt, Prompt
from iq_lightning.errors import ConfigError
from iq_lightning.forward import float32_head, response_logits, response_logprobs
from iq_lightning.guides import GuideScorer, PrincipleGuide
from iq_lightning.logprobs import token_logprobs
from iq_lightning.losses import DIVERGENCES, distill_loss, sft_loss
from iq_lightning.objective import estimated_optimal_logprobs, inverse_q_loss


@dataclass(frozen=True)
class SamplePlan:
    """How an objective's training samples are drawn.

    on_policy: drawn with the current policy at every epoch; otherwise drawn once, at epoch 0
        (where the policy is still the initial model), and the same samples serve every epoch.
    principle_in_prompt: sampled from x_w (the principle in the prompt: pi_w's own answers, for a
        principle guide); the rollouts still hold the plain prompt x that the policy learns from.
    """

    on_policy: bool = True
    principle_in_prompt: bool = False


@dataclass
class StepLoss:
    """An objective's loss on a micro-batch, the policy's log-probs of the sampled tokens (for the
    diagnostics every objective logs against the stored targets) and its own figures."""

    loss: torch.Tensor
    policy_logprobs: torch.Tensor
    figures: dict[str, torch.Tensor]


class Objective(ABC):
    name: ClassVar[str]
    plan: ClassVar[SamplePlan] = SamplePlan()
    # Whether the guides run inside the training step (whole teacher distributions), which the
    # memory plan counts in the training phase.
    guides_in_step: ClassVar[bool] = False

    @classmethod
    def from_spec(cls, spec: ObjectiveSpec, alpha: float, reduction: str) -> "Objective":
        return cls(reduction)

    @abstractmethod
    def step(self, policy, batch: dict, guide: GuideScorer) -> StepLoss:
        """The loss on one micro-batch of rollouts (collate's batch, on the policy's device)."""


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


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (InverseQ, Distill, SFT)}


def build_objective(spec: ObjectiveSpec, alpha: float, reduction: str) -> Objective:
    """The objective named in the config (validated there)."""
    return OBJECTIVES[spec.name].from_spec(spec, alpha, reduction)


def sampling_prompt_ids(plan: SamplePlan, guide: GuideScorer, prompt: EncodedPrompt) -> tuple[int, ...]:
    """The prompt a training sample is drawn from: x, or x_w for pi_w's own answers."""
    if plan.principle_in_prompt:
        if not isinstance(guide, PrincipleGuide):
            raise ConfigError("sampling from the principle prompt needs guide=principle")
        return guide.winner_prompt_ids(prompt)
    return prompt.input_ids


def batch_prompts(batch: dict) -> list[EncodedPrompt]:
    """The micro-batch's prompts, as the guides take them (collate keeps them beside the tensors)."""
    return [EncodedPrompt(Prompt(p["id"], tuple(p["messages"]), p["category"]), tuple(p["input_ids"])) for p in batch["prompts"]]


def batch_responses(batch: dict) -> list[list[int]]:
    mask = batch["response_mask"].bool()
    return [row[keep].tolist() for row, keep in zip(batch["response_ids"], mask)]
