"""Selective log-softmax: the log-probability of given tokens without a kept (B, T, V) copy."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens], shape tokens.shape; logits are (..., V).

    log p(y) = logit_y - logsumexp(logits). Rows go one sequence at a time so the float32
    temporaries of logsumexp stay at (T, V) while autograd keeps only the logits.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if logits.dim() < 3:
        gathered = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).to(dtype)
        return gathered - torch.logsumexp(logits.to(dtype), dim=-1)
    rows = [token_logprobs(row_logits, row_tokens) for row_logits, row_tokens in zip(logits, tokens)]
    return torch.stack(rows)
