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
    dpo        DPO against the initial policy on pairs drawn once from the principle contrast
               (RLCD): pi_w's answer to x_w chosen, pi_l's answer to x rejected
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
from iq_lightning.losses import DIVERGENCES, distill_loss, dpo_loss, sft_loss
from iq_lightning.objective import estimated_optimal_logprobs, inverse_q_loss
from iq_lightning.rollouts import CHOSEN, REJECTED, ROLE_CODES


@dataclass(frozen=True)
class SamplePlan:
    """How an objective's training samples are drawn.

    on_policy: drawn with the current policy at every epoch; otherwise drawn once, at epoch 0
        (where the policy is still the initial model), and the same samples serve every epoch.
    principle_in_prompt: sampled from x_w (the principle in the prompt: pi_w's own answers, for a
        principle guide); the rollouts still hold the plain prompt x that the policy learns from.
    pairs: each drawn prompt is sampled twice, a pair stored as two adjacent rollouts: role
        "chosen" sampled as principle_in_prompt says, then role "rejected" sampled from plain x.
        samples_per_epoch still counts rollouts (half as many prompts, rounded up to whole pairs),
        and every micro-batch holds whole pairs (micro_batch_size must be even).
    """

    on_policy: bool = True
    principle_in_prompt: bool = False
    pairs: bool = False

    @property
    def draws(self) -> tuple[tuple[str | None, bool], ...]:
        """Per drawn prompt, in stored order: each sample's role and whether it is drawn from x_w."""
        if self.pairs:
            return ((CHOSEN, self.principle_in_prompt), (REJECTED, False))
        return ((None, self.principle_in_prompt),)


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

    @classmethod
    def check(cls, spec: ObjectiveSpec) -> None:
        """Raise ConfigError for a value of the objective group this objective cannot use."""

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

    @classmethod
    def check(cls, spec: ObjectiveSpec) -> None:
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


class DPO(Objective):
    """DPO (Rafailov et al. 2023) with pi_ref = the initial policy, on preference pairs built from
    the principle contrast where no preference data exists (RLCD): for each prompt, pi_w's answer
    (the initial model given x_w) is chosen and pi_l's (the initial model given x) rejected, drawn
    once at epoch 0 and reused every epoch.

        L = -log sigmoid(beta * [(log pi_theta(y_c|x) - log pi_ref(y_c|x)) - (same for y_r)])
    with sequence log-probs summed over the response, averaged over the micro-batch's pairs
    (train.reduction does not apply). log pi_ref(y_t|x) is each rollout's stored ref_logprobs
    (pi_l given x, computed by the guides when the pairs were scored), so the step runs no
    reference forward. Figures: the implicit rewards beta * (log pi_theta - log pi_ref) of chosen
    and rejected answers, their margin and the fraction of pairs ranked right (TRL's rewards/*)."""

    name = "dpo"
    plan = SamplePlan(on_policy=False, principle_in_prompt=True, pairs=True)

    @classmethod
    def from_spec(cls, spec: ObjectiveSpec, alpha: float, reduction: str) -> "DPO":
        return cls(spec.beta)

    @classmethod
    def check(cls, spec: ObjectiveSpec) -> None:
        if not spec.beta > 0:
            raise ConfigError(f"objective.beta (DPO's KL coefficient) must be > 0, got {spec.beta}")

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def step(self, policy, batch, guide) -> StepLoss:
        policy_logprobs = response_logprobs(policy, batch, float32_logits=True)
        keep = batch["response_mask"].bool()
        policy_sums = torch.where(keep, policy_logprobs, torch.zeros_like(policy_logprobs)).sum(-1)
        ref = batch["ref_logprobs"].to(policy_sums.device)
        ref_sums = torch.where(keep, ref, torch.zeros_like(ref)).sum(-1)
        chosen, rejected = pair_rows(batch)
        loss, chosen_rewards, rejected_rewards = dpo_loss(
            policy_sums[chosen], policy_sums[rejected], ref_sums[chosen], ref_sums[rejected], self.beta
        )
        margins = chosen_rewards - rejected_rewards
        figures = {
            "dpo_reward_accuracy": (margins > 0).float().mean(),
            "dpo_reward_margin": margins.mean(),
            "dpo_reward_chosen": chosen_rewards.mean(),
            "dpo_reward_rejected": rejected_rewards.mean(),
        }
        return StepLoss(loss, policy_logprobs, figures)


def pair_rows(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of a micro-batch's chosen and rejected answers, pair by pair (collate's `role`);
    a micro-batch that splits a pair is an error, not a silently mismatched loss."""
    role = batch["role"]
    chosen = (role == ROLE_CODES[CHOSEN]).nonzero().flatten()
    rejected = (role == ROLE_CODES[REJECTED]).nonzero().flatten()
    ids = [p["id"] for p in batch["prompts"]]
    if len(chosen) == 0 or len(chosen) != len(rejected) or any(ids[c] != ids[r] for c, r in zip(chosen.tolist(), rejected.tolist())):
        raise ValueError(f"a micro-batch must hold whole chosen/rejected pairs; got roles {role.tolist()} for prompts {ids}")
    return chosen, rejected


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (InverseQ, Distill, SFT, DPO)}


def build_objective(spec: ObjectiveSpec, alpha: float, reduction: str) -> Objective:
    """The objective named in the config (validated there)."""
    return OBJECTIVES[spec.name].from_spec(spec, alpha, reduction)


def sampling_prompt_ids(principle_in_prompt: bool, guide: GuideScorer, prompt: EncodedPrompt) -> tuple[int, ...]:
    """The prompt a training sample is drawn from: x, or x_w for pi_w's own answers."""
    if principle_in_prompt:
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
