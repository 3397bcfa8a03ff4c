"""Inverse-Q* (Algorithm 1), the default objective."""

from __future__ import annotations

from iq_lightning.config import ObjectiveSpec
from iq_lightning.errors import ConfigError
from iq_lightning.forward import response_logprobs
from iq_lightning.objective import PENALTIES, clipped_targets, inverse_q_loss
from iq_lightning.objectives.base import Objective, StepLoss


class InverseQ(Objective):
    """L = sum_t m_t rho(log pi_hat(y_t) - log pi_theta(y_t)) on on-policy samples (Algorithm 1:
    rho(r) = r^2); the targets were computed by the guides when the epoch was sampled.

    Two open choices of docs/method.md, off by default (conf/objective/inverse_q.yaml):
    penalty/huber_delta: rho (objective.residual_penalty: squared, or huber);
    target_clip: each target at most that many nats from log pi_ref(y_t) (objective.clipped_targets),
    applied here, to the stored raw targets, so the rollouts keep what the guides gave."""

    name = "inverse_q"

    @classmethod
    def from_spec(cls, spec: ObjectiveSpec, alpha: float, reduction: str) -> "InverseQ":
        return cls(reduction, spec.penalty, spec.huber_delta, spec.target_clip)

    @classmethod
    def check(cls, spec: ObjectiveSpec, run) -> None:
        if spec.penalty not in PENALTIES:
            raise ConfigError(f"objective.penalty must be one of {', '.join(PENALTIES)}, got {spec.penalty!r}")
        if isinstance(spec.huber_delta, bool) or not isinstance(spec.huber_delta, (int, float)) or not spec.huber_delta > 0:
            raise ConfigError(f"objective.huber_delta must be a number > 0 (nats), got {spec.huber_delta!r}")
        clip = spec.target_clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            raise ConfigError(f"objective.target_clip must be null or a number > 0 (nats), got {clip!r}")

    def __init__(self, reduction: str = "token_mean", penalty: str = "squared", huber_delta: float = 1.0, target_clip: float | None = None):
        self.reduction = reduction
        self.penalty = penalty
        self.huber_delta = huber_delta
        self.target_clip = target_clip

    def step(self, policy, batch, guide) -> StepLoss:
        policy_logprobs = response_logprobs(policy, batch, float32_logits=True)
        targets = batch["target_logprobs"]
        if self.target_clip is not None:
            targets = clipped_targets(targets, batch["ref_logprobs"], self.target_clip)
        loss = inverse_q_loss(policy_logprobs, targets, batch["response_mask"], self.reduction, self.penalty, self.huber_delta)
        return StepLoss(loss, policy_logprobs, {})
