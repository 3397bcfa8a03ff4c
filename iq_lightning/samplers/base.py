"""The sampler interface: on-policy generation with the *current* policy weights."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from transformers import PreTrainedModel

from iq_lightning.errors import NonFiniteError


class NonFiniteSampling(NonFiniteError):
    """The policy's next-token distribution holds NaN or inf (diverged weights): sampling from it
    would silently pick an arbitrary token, so sampling stops instead."""


@dataclass(frozen=True)
class SamplingParams:
    """Identical meaning in every backend. temperature 0 is greedy; top_k is never applied.

    Every prompt of a `generate` call has its own random stream, seeded by `request_seed(seed,
    index)`: its samples do not depend on the batch it was drawn in or on the other prompts. The
    index of the i-th prompt of a call is `first_index + i * index_step`: a data-parallel rank that
    samples prompts[rank::world] of a list passes first_index=rank, index_step=world, and the
    same seed on every rank, so each sample keeps its global index whatever the world size."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    first_index: int = 0
    index_step: int = 1

    def sample_index(self, i: int) -> int:
        """The index of the i-th prompt of a call (see the class docstring)."""
        return self.first_index + i * self.index_step

    def sample_seed(self, i: int) -> int:
        """The seed of the i-th prompt's random stream."""
        return request_seed(self.seed, self.sample_index(i))


def request_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a call made with `seed`, the same derivation in every backend
    (vLLM seeds each request with it; the HF sampler seeds one generator per row with it)."""
    return (seed * 100_003 + index) % 2**63


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

    def identity(self) -> dict:
        """What decides this backend's answers besides the model, the prompts and SamplingParams
        (validation_cache.py keys kept answers by it)."""
        return {"backend": type(self).__name__}


def cut_at_eos(tokens: Sequence[int], eos_ids: set[int]) -> tuple[int, bool]:
    """Length of the response up to and including the first EOS, and whether there was one."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return i + 1, True
    return len(tokens), False
