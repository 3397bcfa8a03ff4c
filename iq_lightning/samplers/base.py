"""The sampler interface: on-policy generation with the *current* policy weights."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedModel


@dataclass(frozen=True)
class SamplingParams:
    """Identical meaning in every backend. temperature 0 is greedy; top_k is never applied."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    """A response y (ending in EOS when `finished`) and the sampler's own log-prob of each token.

    `sampling_logprobs` are for inspection only: training always recomputes log-probs with the
    trainer's forward pass, since engines differ slightly from it."""

    response_ids: list[int]
    sampling_logprobs: list[float]
    finished: bool


class Sampler(ABC):
    """Generates responses for tokenized prompts with the policy's current weights."""

    def update_weights(self, policy: PreTrainedModel) -> None:
        """Make the next `generate` use `policy`'s current weights. Called after every optimizer
        phase; a backend that reads the policy directly has nothing to do."""

    @abstractmethod
    def generate(
        self, policy: PreTrainedModel, prompts: Sequence[Sequence[int]], params: SamplingParams, desc: str = "sampling"
    ) -> list[Generation]: ...

    def sleep(self) -> None:
        """Release sampling memory while the policy trains (a backend with an engine may)."""

    def close(self) -> None:
        """Release engine resources at the end of a run."""


def cut_at_eos(tokens: Sequence[int], eos_ids: set[int]) -> tuple[int, bool]:
    """Length of the response up to and including the first EOS, and whether there was one."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return i + 1, True
    return len(tokens), False
