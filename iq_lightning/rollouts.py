"""Rollouts: each sampled response with its per-token targets, stored per epoch as JSONL, and
collated into length-grouped micro-batches for training."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler as TorchSampler

from iq_lightning.errors import UserError
from iq_lightning.files import write_atomically
from iq_lightning.forward import pack


@dataclass
class Rollout:
    """One on-policy sample: prompt x, response y and one float per response token for each of
    the sampler's log-prob, the target log pi_hat(y_t) and the reference log pi_ref(y_t)."""

    epoch: int
    prompt_id: str
    category: str | None
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    finished: bool
    sampling_logprobs: list[float]
    target_logprobs: list[float]
    ref_logprobs: list[float]

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if not (len(self.sampling_logprobs) == len(self.target_logprobs) == len(self.ref_logprobs) == n):
            raise ValueError(f"rollout {self.prompt_id}: per-token lists differ in length from the response ({n})")


def write_rollouts(path: Path, rollouts: Sequence[Rollout]) -> None:
    """Atomic and synced: a crash mid-write never leaves a truncated file that a resume would trust."""
    write_atomically(path, "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rollouts))


class TornRolloutsError(UserError):
    """A rollout file that does not parse (cut short outside this program, or edited)."""


def read_rollouts(path: Path) -> list[Rollout]:
    rollouts = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rollouts.append(Rollout(**json.loads(line.decode("utf-8"))))
            except (ValueError, TypeError) as exc:
                raise TornRolloutsError(f"{path}:{number}: not a rollout ({str(exc).splitlines()[0]})") from None
    return rollouts


def collate(rollouts: Sequence[Rollout], pad_id: int) -> dict:
    """Model inputs (left-padded prompts, right-padded responses) plus (B, T) targets.

    The prompts' common prefix stays in every row: at micro-batch 4 running it once saves no
    time with gradients (1.92 s vs 1.98 s per SmolLM2 step), unlike the no-grad guide passes."""
    batch = pack([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], pad_id, share_prefix=False)
    width = batch["response_ids"].shape[1]
    for key in ("target_logprobs", "ref_logprobs"):
        values = torch.zeros((len(rollouts), width), dtype=torch.float32)
        for i, r in enumerate(rollouts):
            values[i, : len(r.response_ids)] = torch.as_tensor(getattr(r, key), dtype=torch.float32)
        batch[key] = values
    # The prompts themselves, for objectives whose guides run in the training step (distill).
    batch["prompts"] = [{"id": r.prompt_id, "messages": r.messages, "category": r.category, "input_ids": r.prompt_ids} for r in rollouts]
    return batch


class LengthGroupedBatches(TorchSampler[list[int]]):
    """Micro-batches of similar total length (little padding), in a seeded random order.

    `passes` repeats the epoch's samples (METHOD.md: one pass by default)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, passes: int = 1, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.passes = passes
        self.seed = seed

    def _batches(self) -> list[list[int]]:
        order = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i])
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed)
        for _ in range(self.passes):
            batches = self._batches()
            rng.shuffle(batches)
            yield from batches

    def __len__(self) -> int:
        return self.passes * len(self._batches())
