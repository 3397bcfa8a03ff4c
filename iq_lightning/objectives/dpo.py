"""DPO on principle-contrast preference pairs (RLCD's construction).

The paper's DPO baseline trains on HH-RLHF's own chosen/rejected replies; that needs (not built
yet): prompts that carry both replies (data.py keeps only the shared prefix today), a SamplePlan
flag under which the DataModule tokenizes the given replies instead of sampling, and the guides
scoring them (guide.score takes any responses) to fill ref_logprobs. The pair storage (`role`),
whole-pair micro-batches and DPO.step below would serve it unchanged."""

from __future__ import annotations

import torch

from iq_lightning.config import ObjectiveSpec
from iq_lightning.errors import ConfigError
from iq_lightning.forward import response_logprobs
from iq_lightning.losses import dpo_loss
from iq_lightning.objectives.base import Objective, SamplePlan, StepLoss
from iq_lightning.rollouts import CHOSEN, REJECTED, ROLE_CODES


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
    def check(cls, spec: ObjectiveSpec, run) -> None:
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
