"""Guide scoring: the per-token targets log pi_hat(y_t) and the reference log pi_ref(y_t) of
sampled responses, computed once per sample without gradients (METHOD.md, Algorithm 1).

pi_l is the frozen SFT model (the initial policy) given the plain prompt x; it is also pi_ref.
pi_w is either that same model with a principle in the prompt (`PrincipleGuide`, both guides in
one forward pass) or a separate aligned model given x (`AlignedModelGuide`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from iq_lightning.data import EncodedPrompt, Messages, encode_prompt
from iq_lightning.forward import pack, response_logits, to_device
from iq_lightning.logprobs import token_logprobs
from iq_lightning.objective import sampled_token_targets


@dataclass(frozen=True)
class GuideScores:
    """One float per response token: the target log pi_hat(y_t) and log pi_ref(y_t) (= log pi_l(y_t)),
    and, where asked for (`score(winner=True)`), log pi_w(y_t); else empty."""

    target_logprobs: list[float]
    ref_logprobs: list[float]
    winner_logprobs: list[float] = field(default_factory=list)


def with_principle(messages: Messages, principle: str, placement: str) -> Messages:
    """x_w: the prompt with the principle as (or appended to) the system message, or prepended
    to the last user turn. Small models follow the two placements differently."""
    messages = [dict(m) for m in messages]
    if placement == "system":
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{principle}"
        else:
            messages.insert(0, {"role": "system", "content": principle})
    elif placement == "user":
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = f"{principle}\n\n{messages[last_user]['content']}"
    else:
        raise ValueError(f"placement must be 'system' or 'user', got {placement!r}")
    return tuple(messages)


class GuideScorer(ABC):
    """Scores sampled responses with the frozen guides. Not an nn.Module on purpose: training
    strategies (DDP, FSDP, ZeRO-3) must neither wrap, shard nor checkpoint the guides."""

    def __init__(self, alpha: float, pad_id: int, batch_size: int, show_progress: bool = True, share_prefix: bool = True):
        self.alpha = alpha
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.show_progress = show_progress
        # Off for guides sharded over ranks: their forward calls are collectives, and running the
        # shared prefix apart would make the number of calls depend on each rank's prompts.
        self.share_prefix = share_prefix

    @property
    @abstractmethod
    def models(self) -> Sequence[PreTrainedModel]: ...

    @abstractmethod
    def _guide_logits(
        self, prompts: Sequence[EncodedPrompt], responses: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits_w, logits_l, response_ids), each response-aligned (B, T, V) / (B, T)."""

    def to(self, device: torch.device | str) -> "GuideScorer":
        for model in self.models:
            model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    # no_grad, not inference_mode: FSDP and ZeRO-3 re-shard guides in place after each forward,
    # which inference tensors forbid.
    @torch.no_grad()
    def score(
        self, prompts: Sequence[EncodedPrompt], responses: Sequence[Sequence[int]], desc: str = "scoring", winner: bool = False
    ) -> list[GuideScores]:
        """Per response token: log pi_hat(y_t), log pi_ref(y_t) and, with `winner` (PPO's
        contrastive reward), log pi_w(y_t): one more log-softmax over the vocabulary per token."""
        scores: list[GuideScores] = []
        starts = range(0, len(prompts), self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not self.show_progress, leave=False):
            chunk_prompts = prompts[start : start + self.batch_size]
            chunk_responses = responses[start : start + self.batch_size]
            logits_w, logits_l, response_ids = self._guide_logits(chunk_prompts, chunk_responses)
            targets = sampled_token_targets(logits_w, logits_l, response_ids, self.alpha)
            ref = token_logprobs(logits_l, response_ids)
            won = token_logprobs(logits_w, response_ids) if winner else None
            for row, response in enumerate(chunk_responses):
                n = len(response)
                scores.append(GuideScores(targets[row, :n].tolist(), ref[row, :n].tolist(), won[row, :n].tolist() if winner else []))
        return scores


class PrincipleGuide(GuideScorer):
    """pi_w = SFT model given x_w (principle inserted), pi_l = the same model given x.

    One forward pass per guide, not one over the stacked [x_w + y ; x + y] batch: x_w and x
    differ in length and in their common prefix (the principle replaces SmolLM2's default system
    prompt), so apart each pass shares its own prefix and pads no row to the other's length."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        principle: str,
        placement: str,
        alpha: float,
        batch_size: int = 16,
        show_progress: bool = True,
        share_prefix: bool = True,
    ):
        super().__init__(alpha, tokenizer.pad_token_id, batch_size, show_progress, share_prefix)
        self.model = model
        self.tokenizer = tokenizer
        self.principle = principle
        self.placement = placement
        self._winner_ids: dict[tuple, tuple[int, ...]] = {}

    @property
    def models(self) -> Sequence[PreTrainedModel]:
        return (self.model,)

    def winner_prompt_ids(self, prompt: EncodedPrompt) -> tuple[int, ...]:
        key = tuple(tuple(sorted(m.items())) for m in prompt.prompt.messages)
        if key not in self._winner_ids:
            messages = with_principle(prompt.prompt.messages, self.principle, self.placement)
            self._winner_ids[key] = tuple(encode_prompt(self.tokenizer, messages))
        return self._winner_ids[key]

    def _guide_logits(self, prompts, responses):
        share = self.share_prefix
        winner = to_device(pack([self.winner_prompt_ids(p) for p in prompts], responses, self.pad_id, share), self.device)
        lesser = to_device(pack([p.input_ids for p in prompts], responses, self.pad_id, share), self.device)
        return response_logits(self.model, winner), response_logits(self.model, lesser), lesser["response_ids"]


class AlignedModelGuide(GuideScorer):
    """pi_w = a separate aligned model, pi_l = the SFT model; both given the plain prompt x
    (paper: Zephyr-7B-beta vs Zephyr-7B-SFT). Two models, so two forward passes."""

    def __init__(
        self,
        winner: PreTrainedModel,
        lesser: PreTrainedModel,
        pad_id: int,
        alpha: float,
        batch_size: int = 16,
        show_progress: bool = True,
        share_prefix: bool = True,
    ):
        super().__init__(alpha, pad_id, batch_size, show_progress, share_prefix)
        self.winner = winner
        self.lesser = lesser

    @property
    def models(self) -> Sequence[PreTrainedModel]:
        return (self.winner, self.lesser)

    def _guide_logits(self, prompts, responses):
        batch = to_device(pack([p.input_ids for p in prompts], responses, self.pad_id, self.share_prefix), self.device)
        logits_w = response_logits(self.winner, batch)
        logits_l = response_logits(self.lesser, batch)
        return logits_w, logits_l, batch["response_ids"]
