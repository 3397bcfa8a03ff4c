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

from iq_lightning.config import ObjectiveSpec
from iq_lightning.objectives.base import Objective, SamplePlan, StepLoss, batch_prompts, batch_responses, sampling_prompt_ids
from iq_lightning.objectives.distill import Distill
from iq_lightning.objectives.dpo import DPO, pair_rows
from iq_lightning.objectives.inverse_q import InverseQ
from iq_lightning.objectives.ppo import PPO, ValueHead, whiten_advantages
from iq_lightning.objectives.sft import SFT

__all__ = [
    "DPO", "OBJECTIVES", "PPO", "SFT", "Distill", "InverseQ", "Objective", "SamplePlan", "StepLoss", "ValueHead",
    "batch_prompts", "batch_responses", "build_objective", "pair_rows", "sampling_prompt_ids", "whiten_advantages",
]

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (InverseQ, Distill, SFT, DPO, PPO)}


def build_objective(spec: ObjectiveSpec, alpha: float, reduction: str) -> Objective:
    """The objective named in the config (validated there)."""
    return OBJECTIVES[spec.name].from_spec(spec, alpha, reduction)
