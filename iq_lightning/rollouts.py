"""Rollouts: each sampled response with its per-token targets, stored per epoch as JSONL, and
collated into length-grouped micro-batches for training."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler as TorchSampler

from iq_lightning.errors import UserError
from iq_lightning.forward import pack


@dataclass
class Rollout:
    """One on-policy sample: prompt x, response y and one float per response token for each of
    the sampler's log-prob, the target log pi_hat(y_t) and the reference log pi_ref(y_t)
    (= log pi_l(y_t)); `winner_logprobs`, log pi_w(y_t), only for objectives that ask the guides
    for it (PPO's contrastive reward), else empty (and absent from the file, as in older files)."""

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
    winner_logprobs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if not (len(self.sampling_logprobs) == len(self.target_logprobs) == len(self.ref_logprobs) == n):
            raise ValueError(f"rollout {self.prompt_id}: per-token lists differ in length from the response ({n})")
        if self.winner_logprobs and len(self.winner_logprobs) != n:
            raise ValueError(f"rollout {self.prompt_id}: winner_logprobs differ in length from the response ({n})")

    @property
    def has_winner_logprobs(self) -> bool:
        return len(self.winner_logprobs) == len(self.response_ids)

    def record(self) -> dict:
        """The stored JSON object; an empty winner_logprobs is left out (the files of objectives
        that do not ask for it stay as they were)."""
        record = asdict(self)
        if not record["winner_logprobs"]:
            del record["winner_logprobs"]
        return record


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` so that a kill or a full disk leaves either the old file or the new
    one, never a torn one: a temporary file, synced, renamed over `path`. An OSError (disk full)
    is one line naming the file; the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write {path} ({exc.strerror or exc}); nothing half-written was kept: free space and rerun the same command to resume"
        ) from None
    fsync_dir(path.parent)


def write_rollouts(path: Path, rollouts: Sequence[Rollout]) -> None:
    """Atomic and synced: a crash mid-write never leaves a truncated file that a resume would trust."""
    write_atomically(path, "".join(json.dumps(r.record(), ensure_ascii=False) + "\n" for r in rollouts))


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


def collate(rollouts: Sequence[Rollout], pad_id: int, per_token: Sequence[dict[str, torch.Tensor]] | None = None) -> dict:
    """Model inputs (left-padded prompts, right-padded responses) plus (B, T) targets, log pi_w
    where every rollout holds it, and an objective's own per-token values (`per_token`, one
    dict of (n,) tensors per rollout: PPO's old log-probs, values, advantages), 0-padded.

    The prompts' common prefix stays in every row: at micro-batch 4 running it once saves no
    time with gradients (1.92 s vs 1.98 s per SmolLM2 step), unlike the no-grad guide passes."""
    batch = pack([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], pad_id, share_prefix=False)
    width = batch["response_ids"].shape[1]
    keys = ["target_logprobs", "ref_logprobs"]
    if rollouts and all(r.has_winner_logprobs for r in rollouts):
        keys.append("winner_logprobs")
    for key in keys:
        values = torch.zeros((len(rollouts), width), dtype=torch.float32)
        for i, r in enumerate(rollouts):
            values[i, : len(r.response_ids)] = torch.as_tensor(getattr(r, key), dtype=torch.float32)
        batch[key] = values
    for key in per_token[0] if per_token else ():
        values = torch.zeros((len(rollouts), width), dtype=torch.float32)
        for i, extra in enumerate(per_token):
            values[i, : extra[key].shape[0]] = extra[key]
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
