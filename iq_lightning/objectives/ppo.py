"""The paper's PPO baseline: token-level PPO with a per-token KL penalty, a value head and GAE; the
sequence reward from the guides' contrast, or from a reward model (objective.reward_model)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from iq_lightning.config import ObjectiveSpec
from iq_lightning.errors import ConfigError, UserError
from iq_lightning.forward import head_inputs, response_logprobs, to_device
from iq_lightning.losses import contrastive_sequence_reward, gae, kl_penalized_rewards, ppo_policy_loss, ppo_value_loss, whiten
from iq_lightning.objectives.base import Objective, SamplePlan, StepLoss
from iq_lightning.reward_model import SequenceReward, check_num_labels, local_num_labels
from iq_lightning.rollouts import collate


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

    Reward R(x, y) = sum_t log pi_w(y_t) - log pi_l(y_t) (log pi_w stored by the guides), or, with
    `reward_model`, a sequence-classification reward model's score of x + y (reward_model.py, the
    paper's own PPO setting; loaded per rank in load_models), at the last token; per token r_t = -kl_coef (log pi_old(y_t) - log pi_ref(y_t)) + [t = T] R. With
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
        if spec.reward_model is not None:
            need(bool(str(spec.reward_model).strip()), "objective.reward_model is empty (null: the guides' contrastive reward)")
            check_num_labels(spec.reward_model, local_num_labels(spec.reward_model))

    @classmethod
    def from_spec(cls, spec: ObjectiveSpec, alpha: float, reduction: str) -> "PPO":
        kl_coef = spec.kl_coef if spec.kl_coef is not None else 1.0 / alpha
        return cls(
            kl_coef, spec.clip_range, spec.value_clip_range, spec.vf_coef, spec.gamma, spec.lam, spec.value_lr, reduction, spec.reward_model
        )

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
        reward_model: str | None = None,
    ):
        self.kl_coef, self.clip_range, self.value_clip_range, self.vf_coef = kl_coef, clip_range, value_clip_range, vf_coef
        self.gamma, self.lam, self.head_lr, self.reduction = gamma, lam, value_lr, reduction
        self.value_head: ValueHead | None = None
        self.reward_model = reward_model
        self.reward: SequenceReward | None = None  # loaded per rank (load_models)
        # The contrastive reward needs log pi_w(y_t) from the guides; a reward model does not.
        self.plan = SamplePlan(winner_logprobs=reward_model is None)

    def load_models(self, tokenizer, device) -> None:
        if self.reward_model is not None and self.reward is None:
            self.reward = SequenceReward.load(self.reward_model, tokenizer, device)

    @property
    def reward_figure(self) -> str:
        """The epoch figure of the mean reward, named for where it comes from."""
        return "ppo/contrastive_reward" if self.reward_model is None else "ppo/reward_model_score"

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
        if self.reward_model is not None and self.reward is None:
            raise UserError(f"objective.reward_model={self.reward_model} is not loaded (load_models runs when the trainer starts)")
        lacking = [r.prompt_id for r in rollouts if not r.has_winner_logprobs] if self.reward is None else []
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
                    if self.reward is None:
                        reward = contrastive_sequence_reward(batch["winner_logprobs"], ref, mask)
                    else:
                        reward = self.reward.score(chunk).to(device)
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
            self.reward_figure: torch.cat(rewards).mean().item() if rewards else 0.0,
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
