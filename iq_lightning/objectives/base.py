"""The objective interface: how an objective's samples are drawn (SamplePlan), its loss on a
micro-batch (StepLoss), and helpers the objectives share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn

from iq_lightning.config import ObjectiveSpec
from iq_lightning.data import EncodedPrompt, Prompt
from iq_lightning.errors import ConfigError
from iq_lightning.guides import GuideScorer, PrincipleGuide
from iq_lightning.rollouts import CHOSEN, REJECTED, Rollout


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
    given_pairs: with `pairs`, the pair is the data's own (each prompt's chosen and rejected
        replies, Prompt.chosen / .rejected), tokenized instead of sampled; the guides still score
        them (ref_logprobs: log pi_ref(y_t | x)). Nothing is drawn from x_w.
    """

    on_policy: bool = True
    principle_in_prompt: bool = False
    pairs: bool = False
    winner_logprobs: bool = False
    given_pairs: bool = False

    def __post_init__(self) -> None:
        if self.given_pairs and (not self.pairs or self.on_policy or self.principle_in_prompt):
            raise ValueError("given_pairs: the data's pairs, read once (pairs=True, on_policy=False, principle_in_prompt=False)")

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
    plan: SamplePlan = SamplePlan()  # an objective whose plan depends on its settings sets its own
    # Whether the guides run inside the training step (whole teacher distributions), which the
    # memory plan counts in the training phase.
    guides_in_step: ClassVar[bool] = False
    head_lr: float | None = None  # the lr of make_heads' parameters (None: the policy's)

    @classmethod
    def from_spec(cls, spec: ObjectiveSpec, alpha: float, reduction: str) -> "Objective":
        return cls(reduction)

    @classmethod
    def resolve(cls, spec: ObjectiveSpec, run) -> ObjectiveSpec:
        """`spec` with defaults that depend on the rest of the run (a RunConfig) filled in; once,
        when the config is built."""
        return spec

    @classmethod
    def check(cls, spec: ObjectiveSpec, run) -> None:
        """Raise ConfigError for a value of the objective group (or a setting of the run, a
        RunConfig) this objective cannot use."""

    def load_models(self, tokenizer, device) -> None:
        """Frozen models of the objective's own (PPO's reward model), loaded per rank when the
        trainer starts, beside the guides and on their device; `tokenizer` is the policy's."""

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
