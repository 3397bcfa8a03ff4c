"""Judge-free figures of generated answers, shared by training's validation and by evaluate.py:
word counts, repetition, the exact per-token KL between two distributions, and the mean
negative log-likelihood of answers under a model (e.g. pi_w, the principle-prompted base).

Pure functions: text in, numbers out; or tensors in, tensors out. No I/O, no logging.

Words are maximal runs of letters and digits, lower-cased, an inner apostrophe kept
("l'archiduc" is one word); punctuation and whitespace separate them and are not words.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch

from iq_lightning.forward import pack, response_logprobs, to_device

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def decode_whole(tokenizer, ids: Sequence[int], max_trim: int = 3) -> str:
    """The text of token `ids` without a character cut in half at its end. Byte-level BPE spreads
    a multi-byte character (é, an emoji) over up to 4 tokens, so an answer cut off at
    max_new_tokens can stop inside one, which decoding writes as U+FFFD ("�"): the trailing
    tokens that make no whole character (at most `max_trim`) are left out. A U+FFFD inside the
    text, the model's own, stays."""
    ids = list(ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for cut in range(1, min(max_trim, len(ids)) + 1):
        if not text.endswith("\ufffd"):
            break
        text = tokenizer.decode(ids[:-cut], skip_special_tokens=True)
    return text


def words(text: str) -> list[str]:
    """The lower-cased words of `text` (see the module docstring)."""
    return _WORD.findall((text or "").lower())


def word_length(text: str) -> int:
    """Number of words in `text`: the length figure (tokenizer-independent, unlike token counts)."""
    return len(words(text))


def repetition(text: str) -> float:
    """Share of repeated word 3-grams: 1 - unique / total over the text's word 3-grams, in [0, 1).

    0 for a text without a repeated 3-gram, and for texts of fewer than 3 words (no 3-gram).
    A looped phrase scores high: "la première cause de la première cause de la première cause"
    (11 words, 9 3-grams, 4 distinct) gives 5/9. It answers "does the text loop", not "is it
    good": a fluent answer scores near 0 whatever its language, and so does word salad."""
    w = words(text)
    if len(w) < 3:
        return 0.0
    grams = list(zip(w, w[1:], w[2:]))
    return 1.0 - len(set(grams)) / len(grams)


def per_token_kl(logp_p: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) = sum_v p(v) (log p(v) - log q(v)) at every position: (..., V) -> (...).

    Computed in float32 (float64 inputs stay float64) after a log-softmax of both inputs, so
    logits work as well as log-probabilities (on log-probabilities it changes nothing beyond
    rounding). Vocabulary entries with p(v) = 0 contribute 0; q(v) = 0 where p(v) > 0 gives inf.
    Leading rows of a (B, T, V) input are done one at a time, so the float32 temporaries stay at
    (T, V)."""
    if logp_p.shape != logp_q.shape:
        raise ValueError(f"shapes differ: {tuple(logp_p.shape)} vs {tuple(logp_q.shape)}")
    if logp_p.dim() >= 3:
        return torch.stack([per_token_kl(p, q) for p, q in zip(logp_p, logp_q)])
    dtype = torch.promote_types(torch.promote_types(logp_p.dtype, logp_q.dtype), torch.float32)
    log_p = torch.log_softmax(logp_p.to(dtype), dim=-1)
    log_q = torch.log_softmax(logp_q.to(dtype), dim=-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=dtype, device=p.device))
    return terms.sum(-1)


def mean_nll(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per token of each sequence: (B, T), (B, T) -> (B,).

    -sum_t m_t log p(y_t) / sum_t m_t; NaN for a row without tokens (an empty answer has no
    likelihood). Values at masked positions are ignored, even when they are inf or NaN."""
    dtype = torch.promote_types(token_logprobs.dtype, torch.float32)
    mask = mask.to(dtype)
    logprobs = torch.where(mask > 0, token_logprobs.to(dtype), torch.zeros((), dtype=dtype, device=token_logprobs.device))
    count = mask.sum(-1)
    total = -(logprobs * mask).sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


@torch.inference_mode()
def answer_nll_under(
    model,
    tokenizer,
    prompt_ids_list: Sequence[Sequence[int]],
    response_ids_list: Sequence[Sequence[int]],
    batch_size: int = 8,
) -> list[float]:
    """Mean NLL per token (nats) of each response under `model` given its prompt (token ids,
    e.g. encoded with the principle inserted to score under pi_w); NaN for an empty response.

    Batches hold responses of similar length (sorted, results returned in the input order),
    packed with `forward.pack` and scored with `forward.response_logprobs` on the model's device."""
    if len(prompt_ids_list) != len(response_ids_list):
        raise ValueError(f"{len(prompt_ids_list)} prompts but {len(response_ids_list)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(response_ids_list)), key=lambda i: (len(response_ids_list[i]), len(prompt_ids_list[i])))
    found = [math.nan] * len(order)
    todo = [i for i in order if len(response_ids_list[i])]
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        batch = to_device(pack([prompt_ids_list[i] for i in rows], [response_ids_list[i] for i in rows], pad), device)
        nll = mean_nll(response_logprobs(model, batch), batch["response_mask"]).cpu().tolist()
        for i, value in zip(rows, nll):
            found[i] = float(value)
    return found
