"""Reward-model scores of answers, and their per-epoch increments (paper Fig. 6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from iq_lightning.data import Messages
from iq_lightning.errors import ModelLoadError, first_line
from iq_lightning.reward_model import conversation_ids, conversation_text


class RewardModel:
    """Any sequence-classification reward model: the score is its first output logit (or the
    `score` field that models such as ArmoRM return) for the conversation with the answer."""

    def __init__(self, name_or_path: str, batch_size: int = 8, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).eval()
        except (OSError, ValueError) as exc:
            first = first_line(exc)
            raise ModelLoadError(f"cannot load reward model {name_or_path!r}: {first}") from None
        if torch.cuda.is_available():
            self.model.to("cuda")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.batch_size = batch_size

    @torch.inference_mode()
    def score(self, items: Sequence[tuple[Messages, str]], desc: str = "reward") -> list[float]:
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in tqdm(range(0, len(items), self.batch_size), desc=desc, unit="batch", leave=False):
            rows = [conversation_ids(self.tokenizer, m, a)[: self.tokenizer.model_max_length] for m, a in items[start : start + self.batch_size]]
            ids = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(rows):  # padded on the right, as the tokenizer is set up above
                ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row, dtype=torch.long), 1
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device))
            values = out.score if getattr(out, "score", None) is not None else out.logits[:, 0]
            scores.extend(values.float().flatten().tolist())
        return scores


@dataclass(frozen=True)
class RewardCurve:
    epochs: list[int]  # 0 is the initial model
    mean: list[float]  # mean reward per epoch
    increment: list[float]  # (mean_e - mean_0) / std_0


def reward_curve(scores_by_epoch: dict[int, Sequence[float]]) -> RewardCurve:
    """Normalised increments: (mean reward at epoch e - mean at epoch 0) / std of epoch 0's
    rewards over prompts, so reward models of different scales read alike."""
    epochs = sorted(scores_by_epoch)
    initial = np.asarray(scores_by_epoch[epochs[0]], dtype=np.float64)
    std = initial.std(ddof=1) if len(initial) > 1 else 0.0
    std = std if std > 0 else 1.0
    means = [float(np.mean(scores_by_epoch[e])) for e in epochs]
    return RewardCurve(epochs, means, [(m - means[0]) / std for m in means])
