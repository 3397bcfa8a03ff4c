"""Prompt + response forward passes with responses aligned by position *within the response*.

Layout: prompts are left-padded to a common length P, responses right-padded to T, so response
token t sits at column P + t for every row whatever its prompt length. The guide with the
principle in its prompt (x_w longer than x) and the plain guide therefore line up token by token.

The tokens every prompt of a batch starts with (a chat template's system prompt, the principle)
are kept apart as `prefix_ids` and run through the model once, their keys and values shared by
all rows; the rows hold only the rest of each prompt. Same attention, same positions, so the same
logits as running the prefix in every row, for B - 1 prefix copies fewer.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from iq_lightning.logprobs import token_logprobs


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Leading tokens common to every prompt, leaving each at least its last token: that
    position predicts the first response token and must be among the row's own inputs."""
    if len(prompts) < 2:
        return 0
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def pack(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, share_prefix: bool = True
) -> dict[str, torch.Tensor]:
    """Shared prefix + per row [left-padded rest of prompt, right-padded response] -> model inputs
    and the response mask. attention_mask covers prefix and row (K + P + T columns)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prefix_len = shared_prefix_length(prompts) if share_prefix else 0
    prefix_ids = torch.as_tensor(list(prompts[0][:prefix_len]) if prompts else [], dtype=torch.long)
    prompts = [p[prefix_len:] for p in prompts]
    prompt_len = max(len(p) for p in prompts)
    response_len = max(1, max(len(r) for r in responses))
    batch = len(prompts)
    input_ids = torch.full((batch, prompt_len + response_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, prefix_len + prompt_len + response_len), dtype=torch.long)
    attention_mask[:, :prefix_len] = 1
    response_ids = torch.full((batch, response_len), pad_id, dtype=torch.long)
    response_mask = torch.zeros((batch, response_len), dtype=torch.float32)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        start = prompt_len - len(prompt)
        input_ids[i, start:prompt_len] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[i, prefix_len + start : prefix_len + prompt_len + len(response)] = 1
        if len(response):
            input_ids[i, prompt_len : prompt_len + len(response)] = torch.as_tensor(response, dtype=torch.long)
            response_ids[i, : len(response)] = torch.as_tensor(response, dtype=torch.long)
            response_mask[i, : len(response)] = 1.0
    # Positions count real tokens only, so left padding does not shift the rotary positions.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]
    return {
        "prefix_ids": prefix_ids,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_ids": response_ids,
        "response_mask": response_mask,
    }


def can_share_prefix(model: PreTrainedModel) -> bool:
    """Gradient-checkpointed layers drop a passed cache while training, so there the prefix is
    run in every row instead. (A LoRA policy's adapter-disabled base is no nn.Module: it runs in
    eval mode.)"""
    return not (getattr(model, "training", False) and getattr(model, "is_gradient_checkpointing", False))


def response_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor], share_prefix: bool = True) -> torch.Tensor:
    """Logits (B, T, V) predicting each response token; only the last T+1 positions are projected
    onto the vocabulary (`logits_to_keep`), never the prompt's.

    With `share_prefix` the prefix runs once (batch 1) and its keys and values, repeated over the
    batch, are the cache the rows attend to; gradients flow back through them. Otherwise the prefix
    is prepended to every row: the same computation, B times over."""
    prefix = batch["prefix_ids"]
    rows, response_len = batch["input_ids"].shape[0], batch["response_ids"].shape[1]
    inputs = {"attention_mask": batch["attention_mask"], "logits_to_keep": response_len + 1}
    if prefix.numel() and share_prefix and can_share_prefix(model):
        cache = model(input_ids=prefix[None], logits_to_keep=1, use_cache=True).past_key_values
        cache.batch_repeat_interleave(rows)
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], past_key_values=cache, use_cache=True, **inputs)
    else:
        prefix_positions = torch.arange(prefix.numel(), device=prefix.device)
        out = model(
            input_ids=torch.cat([prefix.expand(rows, -1), batch["input_ids"]], dim=1),
            position_ids=torch.cat([prefix_positions.expand(rows, -1), batch["position_ids"]], dim=1),
            use_cache=False,
            **inputs,
        )
    # Sliced explicitly: a model that ignores logits_to_keep still lines up.
    return out.logits[:, -(response_len + 1) : -1]


def response_logprobs(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], share_prefix: bool = True, float32_logits: bool = False
) -> torch.Tensor:
    """log pi(y_t | x, y_<t) for every response position, (B, T); padding positions are junk.

    log pi(y_t) = (W h_t)[y_t] - logsumexp_v (W h_t)[v], always reduced in float32. With
    `float32_logits` (the policy's log pi_theta, regressed onto float32 targets log pi_hat) the LM
    head W h_t is computed in float32 too, under autocast (bf16-mixed) or on bf16 weights
    (DeepSpeed's bf16): bf16 logits of magnitude 16-32 are rounded to steps of 0.125, an error
    in log pi_theta of the order of the training signal (0.011 nats mean, 0.05 max on SmolLM2)."""
    device_type = batch["input_ids"].device.type
    if not float32_logits:
        return token_logprobs(response_logits(model, batch, share_prefix), batch["response_ids"])
    with float32_head(model, device_type):
        logits = response_logits(model, batch, share_prefix)
    with torch.autocast(device_type, enabled=False):
        return token_logprobs(logits, batch["response_ids"])


@contextmanager
def float32_head(model: PreTrainedModel, device_type: str) -> Iterator[None]:
    """Run `model`'s output projection (an nn.Linear in every causal LM of transformers) in
    float32, outside autocast, on its input upcast to float32; a no-op where it already is
    (float32 weights, no autocast) or where the head is no plain nn.Linear or has a forward of
    its own (accelerate's offloading hooks), which are left alone.

    The head's forward is replaced on the instance for the duration only: the module tree, its
    state_dict keys and its hooks (ZeRO-3 gathers the weight in a pre-forward hook, FSDP while the
    enclosing unit runs) stay as they are, so the weight seen here is the whole, gathered one."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or "forward" in head.__dict__:
        yield
        return
    if head.weight.dtype == torch.float32 and not torch.is_autocast_enabled(device_type):
        yield
        return

    def forward32(self: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return nn.functional.linear(hidden.float(), self.weight.float(), bias)

    head.forward = MethodType(forward32, head)
    try:
        yield
    finally:
        del head.forward


@contextmanager
def head_inputs(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """The hidden states entering `model`'s output projection in each forward call while open:
    the last layer's (normed) hidden state, at the positions projected (`logits_to_keep`), with
    their graph. A pre-hook on the head, so no output_hidden_states copy of every layer; it fires
    under float32_head too (the hook runs in the module's __call__, before its forward)."""
    captured: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def projection_skipped(model: PreTrainedModel) -> Iterator[list[torch.Tensor]]:
    """While open, `model`'s output projection records its input (the final, normed hidden states
    at the positions it would project) and projects nothing: it returns zero-width logits
    (..., 0). Replaced on the instance, as in float32_head, so its hooks still run."""
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def record(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        captured.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)

    head.forward = MethodType(record, head)
    try:
        yield captured
    finally:
        del head.forward


def response_hidden(model: PreTrainedModel, batch: dict[str, torch.Tensor], share_prefix: bool = True) -> torch.Tensor:
    """The hidden states (B, T, H) that `model`'s output projection maps onto response_logits:
    the same forward pass (shared prefix and all), the projection itself skipped."""
    with projection_skipped(model) as captured:
        response_logits(model, batch, share_prefix)
    response_len = batch["response_ids"].shape[1]
    return captured[-1][:, -(response_len + 1) : -1]


def mixable_head(model) -> bool:
    """Whether `model`'s logits are exactly a bias-free linear map W h of its final hidden states,
    so that alpha * logits(h_w) + (1 - alpha) * logits(h_l) = W (alpha h_w + (1 - alpha) h_l): the
    head a plain, whole nn.Linear without bias (tied to the embeddings or not), and the model
    returning the head's output as its logits, untouched.

    The last is asked of the model itself, once, by one no-grad forward of one token: causal LMs
    of transformers post-process logits in many ways (Gemma's final_logit_softcapping, Cohere's
    logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier, Chameleon's masked
    image tokens, ...) and a list of them would miss the next. False without a forward for
    anything else: a wrapper (FSDP, a LoRA policy's adapter-disabled base), a head partitioned by
    ZeRO-3 or on the meta device, one with a forward of its own (accelerate's offloading hooks)."""
    if not isinstance(model, PreTrainedModel):
        return False
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or "forward" in head.__dict__:
        return False
    weight = head.weight
    if hasattr(weight, "ds_id") or weight.is_meta or weight.shape != (head.out_features, head.in_features):
        return False
    outputs: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=weight.device), use_cache=False).logits
    finally:
        handle.remove()
    return len(outputs) == 1 and logits is outputs[0]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
