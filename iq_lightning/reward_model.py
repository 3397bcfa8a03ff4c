"""PPO's reward from a sequence-classification reward model: R(x, y) = its single output on the
conversation x with the answer y (the paper's PPO baseline, Ouyang et al. 2022), frozen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from iq_lightning.data import Messages, chat_ids
from iq_lightning.errors import ConfigError, ModelLoadError, first_line
from iq_lightning.models import same_tokenizer
from iq_lightning.rollouts import Rollout

KEY = "objective.reward_model"


def conversation_ids(tokenizer, messages: Messages, answer: str) -> list[int]:
    """conversation_text as token ids, its contents (prompt and answer) as text: a special token
    inside them stays text (data.chat_ids)."""
    chat = [*map(dict, messages), {"role": "assistant", "content": answer}]
    if tokenizer.chat_template:
        return chat_ids(tokenizer, chat, generation_prompt=False)
    return list(tokenizer(conversation_text(tokenizer, messages, answer), add_special_tokens=False, split_special_tokens=True)["input_ids"])


def conversation_text(tokenizer, messages: Messages, answer: str) -> str:
    """The conversation with the answer as a reward model reads it: its own chat template, else
    'Role: content' turns (reward models often have another tokenizer than the policy)."""
    chat = [*map(dict, messages), {"role": "assistant", "content": answer}]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(chat, tokenize=False)
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in chat)


def _looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id (owner/name): absolute, relative with ./ or ../, ~, or existing."""
    return name_or_path.startswith(("/", "./", "../", "~")) or Path(name_or_path).exists()


def local_num_labels(name_or_path: str) -> int | None:
    """The number of outputs in a local model's config.json (transformers stores id2label); None
    for a hub id, which is checked once loaded. A local path that is not a model is a ConfigError."""
    if not _looks_local(name_or_path):
        return None
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"{KEY}={name_or_path}: no such model directory (no config.json there)")
    config = json.loads((path / "config.json").read_text())
    return len(config["id2label"]) if "id2label" in config else int(config.get("num_labels", 2))


def check_num_labels(name_or_path: str, num_labels: int | None) -> None:
    if num_labels is not None and num_labels != 1:
        raise ConfigError(
            f"{KEY}={name_or_path} has num_labels={num_labels}; PPO needs a scalar reward model (AutoModelForSequenceClassification, num_labels=1)"
        )


class SequenceReward:
    """Scores rollouts with a frozen reward model. When it shares the policy's tokenizer it reads
    the rollout's token ids (prompt + response) directly; otherwise the conversation and the
    decoded response are rendered with its own chat template and tokenizer
    (conversation_text). Rows are right-padded with the reward model's pad
    token, where transformers' pooling takes the last non-pad token's score."""

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, policy_tokenizer: PreTrainedTokenizerBase):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.same_ids = same_tokenizer(tokenizer, policy_tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = pad  # the pooling finds each row's last token by it

    @classmethod
    def load(cls, name_or_path: str, policy_tokenizer: PreTrainedTokenizerBase, device) -> "SequenceReward":
        """In the checkpoint's own dtype, on `device` (the guides')."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_num_labels(name_or_path, local_num_labels(name_or_path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, torch_dtype="auto")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load {KEY}={name_or_path}: {first_line(exc)}") from None
        check_num_labels(name_or_path, model.config.num_labels)
        return cls(model.to(device), tokenizer, policy_tokenizer)

    def input_ids(self, rollout: Rollout) -> list[int]:
        """x + y as the reward model reads them."""
        if self.same_ids:
            return list(rollout.prompt_ids) + list(rollout.response_ids)
        # Contents as text: a special token inside a prompt or answer must not become a turn.
        return conversation_ids(self.tokenizer, rollout.messages, rollout.response_text)

    @torch.no_grad()
    def score(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        """R(x, y) per rollout, float32 (B,), on the reward model's device; one batch."""
        rows = [self.input_ids(r) for r in rollouts]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        device = next(self.model.parameters()).device
        out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device))
        values = out.score if getattr(out, "score", None) is not None else out.logits[:, 0]
        return values.float().flatten()
