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
    ppo        the paper's PPO baseline: token-level PPO with a per-token KL penalty to pi_ref
               (Eq. 2), a value head, GAE and a clipped ratio; reward: the guides' contrastive
               sequence reward sum_t log pi_w(y_t) - log pi_l(y_t) (no reward model)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn

from iq_lightning.config import ObjectiveSpec
from iq_lightning.data import EncodedPrompt, Prompt
from iq_lightning.errors import ConfigError, UserError
from iq_lightning.forward import float32_head, head_inputs, response_logits, response_logprobs, to_device
from iq_lightning.guides import GuideScorer, PrincipleGuide
from iq_lightning.logprobs import token_logprobs
from iq_lightning.losses import (
    DIVERGENCES,
    contrastive_sequence_reward,
    distill_loss,
    dpo_loss,
    gae,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
    whiten,
)
from iq_lightning.objective import estimated_optimal_logprobs, inverse_q_loss
from iq_lightning.rollouts import CHOSEN, REJECTED, ROLE_CODES, Rollout, collate


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
    winner_logprobs: the guides also store log pi_w(y_t) per token (one more log-softmax over
        the vocabulary per token when scoring).
    """

    on_policy: bool = True
    principle_in_prompt: bool = False
    pairs: bool = False
    winner_logprobs: bool = False

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
    head_lr: float | None = None  # the lr of make_heads' parameters (None: the policy's)

    @classmethod
    def from_spec(cls, spec: ObjectiveSpec, alpha: float, reduction: str) -> "Objective":
        return cls(reduction)

    @classmethod
    def check(cls, spec: ObjectiveSpec, run) -> None:
        """Raise ConfigError for a value of the objective group (or a setting of the run, a
        RunConfig) this objective cannot use."""

    @abstractmethod
    def step(self, policy, batch: dict, guide: GuideScorer) -> StepLoss:
        """The loss on one micro-batch of rollouts (collate's batch, on the policy's device)."""

    def make_heads(self, policy) -> nn.Module | None:
        """Trainable parameters of the objective's own beside the policy (PPO's value head), built
        once the policy exists. The LightningModule owns them: trained, checkpointed, synced."""
        return None

    def prepare_epoch(
        self, policy, rollouts: Sequence[Rollout], pad_id: int, micro_batch_size: int, context: AbstractContextManager | None = None
    ) -> tuple[list[dict[str, torch.Tensor]] | None, dict[str, float]]:
        """Per-token values the steps of this epoch need beyond the rollouts (one dict of (n,)
        tensors per rollout; collate pads them into the batch), computed once before the epoch's
        first step, and epoch figures; `context` is the trainer's precision context."""
        return None, {}


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




class ValueHead(nn.Linear):
    """V(x, y_<t) = w . h_t + b on the policy's last hidden state h_t (the output projection's
    input at the position predicting y_t), in float32 outside autocast. Zero-initialised, so
    V = 0 before training whatever the seed."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return super().forward(hidden.to(self.weight.dtype)).squeeze(-1).float()


class PPO(Objective):
    """Token-level PPO with a per-token KL penalty to pi_ref (the paper's Eq. 2, Ouyang et al.
    2022), as TRL's PPO: a value head on the policy's trunk, GAE, clipped ratio and value loss,
    `passes_per_epoch` PPO epochs over each epoch's rollouts.

    Reward R(x, y) = sum_t log pi_w(y_t) - log pi_l(y_t) (log pi_w stored by the guides), at the
    last token; per token r_t = -kl_coef (log pi_old(y_t) - log pi_ref(y_t)) + [t = T] R. With
    kl_coef = 1/alpha the KL-regularised optimum pi_ref exp(R / kl_coef) is pi_w^alpha
    pi_l^(1-alpha), pi_hat normalised over whole responses instead of per token: the same target
    as Inverse-Q*, reached by RL instead of regression.

    Before the epoch's first step (prepare_epoch, no grad): log pi_old and V_old of every rollout
    from the policy and value head as they are then (the weights that drew the samples: sampling
    runs at the start of the epoch, and a resumed epoch restarts from that checkpoint), the
    rewards, GAE advantages (whitened over the rank's epoch) and returns. The sampler's own
    log-probs are not used: they are of the tempered / top-p distribution, and come from another
    forward (vLLM, KV cache); recomputing makes the first step's ratio exactly 1."""

    name = "ppo"
    plan = SamplePlan(winner_logprobs=True)

    @classmethod
    def check(cls, spec: ObjectiveSpec, run) -> None:
        from iq_lightning.strategies import SHARDINGS

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(
            not run.strategy.strategy.startswith(tuple(SHARDINGS)),
            f"objective=ppo does not run under strategy={run.strategy.name}: its value head lives beside the policy, outside "
            "the sharded model; use strategy=ddp (or cpu)",
        )
        if spec.kl_coef is None:
            need(run.train.alpha > 0, "objective.kl_coef=null means 1/alpha, and alpha is 0: set objective.kl_coef")
        else:
            need(spec.kl_coef >= 0, f"objective.kl_coef must be >= 0, got {spec.kl_coef}")
        need(spec.clip_range > 0, f"objective.clip_range must be > 0, got {spec.clip_range}")
        need(spec.value_clip_range > 0, f"objective.value_clip_range must be > 0, got {spec.value_clip_range}")
        need(spec.vf_coef >= 0, f"objective.vf_coef must be >= 0, got {spec.vf_coef}")
        need(0 <= spec.gamma <= 1, f"objective.gamma must be in [0, 1], got {spec.gamma}")
        need(0 <= spec.lam <= 1, f"objective.lam must be in [0, 1], got {spec.lam}")
        need(spec.value_lr is None or spec.value_lr > 0, f"objective.value_lr must be > 0, got {spec.value_lr}")

    @classmethod
    def from_spec(cls, spec: ObjectiveSpec, alpha: float, reduction: str) -> "PPO":
        kl_coef = spec.kl_coef if spec.kl_coef is not None else 1.0 / alpha
        return cls(kl_coef, spec.clip_range, spec.value_clip_range, spec.vf_coef, spec.gamma, spec.lam, spec.value_lr, reduction)

    def __init__(
        self,
        kl_coef: float,
        clip_range: float = 0.2,
        value_clip_range: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        value_lr: float | None = None,
        reduction: str = "token_mean",
    ):
        self.kl_coef, self.clip_range, self.value_clip_range, self.vf_coef = kl_coef, clip_range, value_clip_range, vf_coef
        self.gamma, self.lam, self.head_lr, self.reduction = gamma, lam, value_lr, reduction
        self.value_head: ValueHead | None = None

    def make_heads(self, policy) -> ValueHead:
        self.value_head = ValueHead(policy.get_output_embeddings().in_features)
        return self.value_head

    def evaluate(self, policy, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi_theta(y_t), V(x, y_<t)), each (B, T), from one forward of the policy."""
        with head_inputs(policy) as hidden:
            logprobs = response_logprobs(policy, batch, float32_logits=True)
        steps = batch["response_ids"].shape[1]
        return logprobs, self.value_head(hidden[-1][:, -(steps + 1) : -1])

    def step(self, policy, batch, guide) -> StepLoss:
        logprobs, values = self.evaluate(policy, batch)
        mask = batch["response_mask"]
        policy_loss, clip_fraction, approx_kl = ppo_policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask, self.clip_range, self.reduction
        )
        value_loss, value_clip_fraction = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, self.value_clip_range, self.reduction)
        figures = {
            "ppo_policy_loss": policy_loss.detach(),
            "ppo_value_loss": value_loss.detach(),
            "ppo_clip_fraction": clip_fraction,
            "ppo_approx_kl": approx_kl,
            "ppo_value_clip_fraction": value_clip_fraction,
        }
        return StepLoss(policy_loss + self.vf_coef * value_loss, logprobs, figures)

    @torch.no_grad()
    def prepare_epoch(self, policy, rollouts, pad_id, micro_batch_size, context=None):
        lacking = [r.prompt_id for r in rollouts if not r.has_winner_logprobs]
        if lacking:
            raise UserError(
                f"objective=ppo needs log pi_w(y_t) in the rollouts; {len(lacking)} lack it (e.g. {lacking[0]}): "
                "rollouts written by another objective? start a new run directory"
            )
        device = next(policy.parameters()).device
        was_training = policy.training
        policy.train()  # the mode of the training steps: their first ratio is then exactly 1
        rows: list[dict[str, torch.Tensor]] = []
        rewards, kl_sum, gap_sum, tokens = [], 0.0, 0.0, 0
        try:
            with context or nullcontext():
                for start in range(0, len(rollouts), micro_batch_size):
                    chunk = rollouts[start : start + micro_batch_size]
                    batch = to_device(collate(chunk, pad_id), device)
                    old_logprobs, old_values = self.evaluate(policy, batch)
                    mask, ref = batch["response_mask"], batch["ref_logprobs"]
                    reward = contrastive_sequence_reward(batch["winner_logprobs"], ref, mask)
                    per_token = kl_penalized_rewards(reward, old_logprobs, ref, mask, self.kl_coef)
                    advantages, returns = gae(per_token, old_values, mask, self.gamma, self.lam)
                    for i, r in enumerate(chunk):
                        n = len(r.response_ids)
                        rows.append({
                            "old_logprobs": old_logprobs[i, :n].float().cpu(),
                            "old_values": old_values[i, :n].float().cpu(),
                            "advantages": advantages[i, :n].float().cpu(),
                            "returns": returns[i, :n].float().cpu(),
                        })
                        gap_sum += (old_logprobs[i, :n].cpu() - torch.tensor(r.sampling_logprobs)).abs().sum().item()
                    rewards.append(reward.cpu())
                    kl_sum += ((old_logprobs - ref) * mask).sum().item()
                    tokens += int(mask.sum().item())
        finally:
            policy.train(was_training)
        whiten_advantages(rows)
        figures = {
            "ppo/contrastive_reward": torch.cat(rewards).mean().item() if rewards else 0.0,
            "ppo/kl_to_ref": kl_sum / max(tokens, 1),  # k1, per token, of the sampling policy
            # |log pi_old - sampler's log-prob| per token: 0 up to rounding at temperature 1, top_p 1
            "ppo/sampler_logprob_gap": gap_sum / max(tokens, 1),
        }
        return rows, figures


def whiten_advantages(rows: list[dict[str, torch.Tensor]]) -> None:
    """Advantages whitened over all tokens of the rank's epoch (TRL whitens over its batch of rollouts)."""
    if not rows:
        return
    flat = torch.cat([row["advantages"] for row in rows])
    white = whiten(flat, torch.ones_like(flat))
    for row, part in zip(rows, torch.split(white, [row["advantages"].shape[0] for row in rows])):
        row["advantages"] = part


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (InverseQ, Distill, SFT, DPO, PPO)}


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
