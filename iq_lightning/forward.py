"""Prompt + response forward passes with responses aligned by position *within the response*.

Layout: prompts are left-padded to a common length P, responses right-padded to T, so response
token t sits at column P + t for every row whatever its prompt length. The guide with the
principle in its prompt (x_w longer than x) and the plain guide therefore line up token by token.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedModel

from iq_lightning.logprobs import token_logprobs


def pack(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Left-padded prompts + right-padded responses -> model inputs and the response mask."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prompt_len = max(len(p) for p in prompts)
    response_len = max(1, max(len(r) for r in responses))
    batch = len(prompts)
    input_ids = torch.full((batch, prompt_len + response_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_ids = torch.full((batch, response_len), pad_id, dtype=torch.long)
    response_mask = torch.zeros((batch, response_len), dtype=torch.float32)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        start = prompt_len - len(prompt)
        input_ids[i, start:prompt_len] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[i, start : prompt_len + len(response)] = 1
        if len(response):
            input_ids[i, prompt_len : prompt_len + len(response)] = torch.as_tensor(response, dtype=torch.long)
            response_ids[i, : len(response)] = torch.as_tensor(response, dtype=torch.long)
            response_mask[i, : len(response)] = 1.0
    # Positions count real tokens only, so left padding does not shift the rotary positions.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_ids": response_ids,
        "response_mask": response_mask,
    }


def response_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, T, V) predicting each response token; only the last T+1 positions are projected
    onto the vocabulary (`logits_to_keep`), never the prompt's."""
    response_len = batch["response_ids"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=response_len + 1,
        use_cache=False,
    )
    # Sliced explicitly: a model that ignores logits_to_keep still lines up.
    return out.logits[:, -(response_len + 1) : -1]


def response_logprobs(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi(y_t | x, y_<t) for every response position, (B, T); padding positions are junk."""
    return token_logprobs(response_logits(model, batch), batch["response_ids"])


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
