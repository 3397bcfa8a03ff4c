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
    dpo        DPO against the initial policy on the data's own chosen/rejected replies (the
               paper's DPO on HH-RLHF), or on pairs drawn once from the principle contrast
               (RLCD): pi_w's answer to x_w chosen, pi_l's answer to x rejected
    ppo        the paper's PPO baseline: token-level PPO with a per-token KL penalty to pi_ref
               (Eq. 2), a value head, GAE and a clipped ratio; reward: the guides' contrastive
               sequence reward sum_t log pi_w(y_t) - log pi_l(y_t), or a sequence-classification
               reward model's score of x + y (objective.reward_model)
"""

from __future__ import annotations

import dataclasses

from iq_lightning.config import ObjectiveSpec, RunConfig
from iq_lightning.errors import ConfigError
from iq_lightning.losses import DIVERGENCES
from iq_lightning.objectives.base import Objective, SamplePlan, StepLoss, batch_prompts, batch_responses, sampling_prompt_ids
from iq_lightning.objectives.distill import Distill
from iq_lightning.objectives.dpo import DPO, pair_rows
from iq_lightning.objectives.inverse_q import InverseQ
from iq_lightning.objectives.ppo import PPO, ValueHead, whiten_advantages
from iq_lightning.objectives.sft import SFT

__all__ = [
    "DPO", "OBJECTIVES", "PPO", "SFT", "Distill", "InverseQ", "Objective", "SamplePlan", "StepLoss", "ValueHead",
    "batch_prompts", "batch_responses", "build_objective", "pair_rows", "resolve_and_check", "sampling_prompt_ids",
    "whiten_advantages",
]

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (InverseQ, Distill, SFT, DPO, PPO)}


def build_objective(spec: ObjectiveSpec, alpha: float, reduction: str) -> Objective:
    """The objective named in the config (checked by resolve_and_check)."""
    return OBJECTIVES[spec.name].from_spec(spec, alpha, reduction)


def resolve_and_check(run: RunConfig) -> RunConfig:
    """`run` with its objective's defaults that depend on the rest of the config filled in
    (Objective.resolve: DPO's objective.pairs), so describe, W&B and the restart check see them,
    and the objective's options checked against the run (Objective.check, then its sample plan).
    Here, where objectives are built, so that config.py knows none of them; config.py has checked
    the rest of the run. Raises ConfigError with one line; idempotent."""
    spec = run.objective
    if spec.name not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {spec.name!r}")
    if spec.divergence not in DIVERGENCES:
        raise ConfigError(f"objective.divergence must be one of {', '.join(DIVERGENCES)}, got {spec.divergence!r}")
    cls = OBJECTIVES[spec.name]
    run = dataclasses.replace(run, objective=cls.resolve(spec, run))
    cls.check(run.objective, run)
    # The plan may depend on the objective's settings (DPO's pairs, PPO's reward): ask a built one.
    plan = build_objective(run.objective, run.train.alpha, run.train.reduction).plan
    if plan.principle_in_prompt and run.guide.kind != "principle":
        raise ConfigError(f"objective={spec.name} samples pi_w's answers from the initial policy given the principle: it needs guide=principle")
    if plan.pairs and run.train.micro_batch_size % 2:
        raise ConfigError(
            f"objective={spec.name} trains on chosen/rejected pairs, whole pairs per micro-batch: micro_batch_size must be even, "
            f"got {run.train.micro_batch_size}"
        )
    return run
