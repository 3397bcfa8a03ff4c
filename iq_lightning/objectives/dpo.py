"""DPO against the initial policy, on the data's own preference pairs (the paper's DPO baseline on
HH-RLHF's chosen/rejected replies) or on pairs from the principle contrast (RLCD's construction).

objective.pairs=dataset: each prompt's chosen and rejected replies (data.Prompt) are tokenized by
the DataModule instead of sampled (SamplePlan.given_pairs), and the guides score them like samples
to fill ref_logprobs. objective.pairs=principle: pi_w's answer chosen, pi_l's rejected, sampled
once. Either way the pair storage (`role`), whole-pair micro-batches and DPO.step are the same."""

from __future__ import annotations

import torch

import dataclasses

from iq_lightning.config import PAIRED_SOURCES, UNPAIRED_SOURCES, ObjectiveSpec
from iq_lightning.errors import ConfigError
from iq_lightning.forward import response_logprobs
from iq_lightning.losses import dpo_loss
from iq_lightning.objectives.base import Objective, SamplePlan, StepLoss
from iq_lightning.rollouts import CHOSEN, REJECTED, ROLE_CODES


PAIR_SOURCES = ("dataset", "principle")


class DPO(Objective):
    """DPO (Rafailov et al. 2023) with pi_ref = the initial policy. Pairs (`pairs`): "dataset",
    the data's own chosen/rejected replies to each prompt, read once; "principle", built from the
    principle contrast where no preference data exists (RLCD): for each prompt, pi_w's answer (the
    initial model given x_w) is chosen and pi_l's (the initial model given x) rejected, drawn once
    at epoch 0. Either way the epoch-0 pairs are reused every epoch.

        L = -log sigmoid(beta * [(log pi_theta(y_c|x) - log pi_ref(y_c|x)) - (same for y_r)])
    with sequence log-probs summed over the response, averaged over the micro-batch's pairs
    (train.reduction does not apply). log pi_ref(y_t|x) is each rollout's stored ref_logprobs
    (pi_l given x, computed by the guides when the pairs were scored), so the step runs no
    reference forward. Figures: the implicit rewards beta * (log pi_theta - log pi_ref) of chosen
    and rejected answers, their margin and the fraction of pairs ranked right (TRL's rewards/*)."""

    name = "dpo"

    @classmethod
    def from_spec(cls, spec: ObjectiveSpec, alpha: float, reduction: str) -> "DPO":
        return cls(spec.beta, spec.pairs or "principle")

    @classmethod
    def resolve(cls, spec: ObjectiveSpec, run) -> ObjectiveSpec:
        if spec.pairs is not None:
            return spec
        return dataclasses.replace(spec, pairs="dataset" if run.data.source in PAIRED_SOURCES else "principle")

    @classmethod
    def check(cls, spec: ObjectiveSpec, run) -> None:
        if not spec.beta > 0:
            raise ConfigError(f"objective.beta (DPO's KL coefficient) must be > 0, got {spec.beta}")
        if spec.pairs not in PAIR_SOURCES:
            raise ConfigError(f"objective.pairs must be dataset or principle, got {spec.pairs!r}")
        if spec.pairs == "dataset" and run.data.source in UNPAIRED_SOURCES:
            raise ConfigError(
                f"objective.pairs=dataset: data={run.data.source} has prompts only, no chosen/rejected replies; use data=hh_rlhf, "
                "data=local rows with chosen and rejected, or objective.pairs=principle"
            )

    def __init__(self, beta: float = 0.1, pairs: str = "principle"):
        self.beta = beta
        self.pairs = pairs
        given = pairs == "dataset"
        self.plan = SamplePlan(on_policy=False, principle_in_prompt=not given, pairs=True, given_pairs=given)

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
