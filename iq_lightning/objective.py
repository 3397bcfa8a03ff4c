"""The Inverse-Q* math: pure tensor functions, no models (docs/method.md, "The estimated optimal
policy" and "The loss"). Everything here is differentiable where it should be and works on any leading shape.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("sum", "token_mean", "sequence_mean")

# Rows of (V,) logits processed at once by sampled_token_targets: bounds the float32 temporaries
# to about chunk * V * 4 bytes * 3 (the two upcast logits and their mix) instead of (..., T, V).
_TARGET_CHUNK_ROWS = 256


def estimated_optimal_logprobs(
    logits_w: torch.Tensor, logits_l: torch.Tensor, alpha: float
) -> torch.Tensor:
    """log pi_hat over the vocabulary, same shape as the inputs (..., V).

        z_t(v)        = alpha * log pi_w(v) + (1 - alpha) * log pi_l(v)
        log pi_hat(v) = z_t(v) - logsumexp_v' z_t(v')

    log pi_w and log pi_l differ from their logits by one constant per row (their normalisers),
    which the final normalisation removes: log pi_hat = log_softmax(alpha * logits_w +
    (1 - alpha) * logits_l), one log-softmax instead of three, exactly. Computed in float32 (or
    float64 if given) whatever the logits' dtype.
    """
    if logits_w.shape != logits_l.shape:
        raise ValueError(f"guide logits differ in shape: {tuple(logits_w.shape)} vs {tuple(logits_l.shape)}")
    dtype = torch.promote_types(logits_w.dtype, torch.float32)
    return torch.log_softmax(mixed_logits(logits_w.to(dtype), logits_l.to(dtype), alpha), dim=-1)


def mixed_logits(logits_w: torch.Tensor, logits_l: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * logits_w + (1 - alpha) * logits_l: unnormalised log pi_hat (estimated_optimal_logprobs).
    The same mix of two final hidden states, projected by one bias-free linear head, gives the
    same logits (guides.PrincipleGuide's one-head path)."""
    return alpha * logits_w + (1.0 - alpha) * logits_l


def sampled_token_targets(
    logits_w: torch.Tensor, logits_l: torch.Tensor, tokens: torch.Tensor, alpha: float
) -> torch.Tensor:
    """log pi_hat(y_t) of the given tokens, shape (..., T), from guide logits (..., T, V).

    The training target of Algorithm 1: the mixed logits at y_t less their logsumexp (one
    normaliser per token, see estimated_optimal_logprobs). Rows are processed in chunks so no
    float32 (..., T, V) copy is kept beyond the inputs themselves; only one float per token is
    returned.
    """
    if logits_w.shape != logits_l.shape:
        raise ValueError(f"guide logits differ in shape: {tuple(logits_w.shape)} vs {tuple(logits_l.shape)}")
    vocab = logits_w.shape[-1]
    flat_w = logits_w.reshape(-1, vocab)
    flat_l = logits_l.reshape(-1, vocab)
    flat_tokens = tokens.reshape(-1, 1)
    if flat_tokens.shape[0] != flat_w.shape[0]:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match logits {tuple(logits_w.shape)}")
    out_dtype = torch.promote_types(logits_w.dtype, torch.float32)
    out = torch.empty(flat_tokens.shape[0], dtype=out_dtype, device=logits_w.device)
    for start in range(0, flat_w.shape[0], _TARGET_CHUNK_ROWS):
        end = start + _TARGET_CHUNK_ROWS
        z = mixed_logits(flat_w[start:end].to(out_dtype), flat_l[start:end].to(out_dtype), alpha)
        out[start:end] = z.gather(-1, flat_tokens[start:end]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return out.view(tokens.shape)


def masked_reduce(values: torch.Tensor, mask: torch.Tensor, reduction: str = "token_mean") -> torch.Tensor:
    """Reduce per-token `values` (..., T) over the tokens where `mask` is 1: the
    reductions of inverse_q_loss and of every loss in losses.py.

      - "sum": sum over masked tokens;
      - "token_mean": that sum over the number of masked tokens (1 if none);
      - "sequence_mean": each sequence's token mean, averaged over sequences with >= 1 token.
    Entries outside the mask are dropped (torch.where): a NaN or inf there does not reach the
    value, though its gradient may still be NaN.
    """
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    mask = mask.to(values.dtype)
    if reduction == "sum":
        return masked.sum()
    if reduction == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if reduction == "sequence_mean":
        tokens_per_seq = mask.sum(dim=-1)
        per_seq = masked.sum(dim=-1) / tokens_per_seq.clamp(min=1.0)
        has_tokens = (tokens_per_seq > 0).to(per_seq.dtype)
        return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")


def inverse_q_loss(
    policy_logprobs: torch.Tensor,
    target_logprobs: torch.Tensor,
    mask: torch.Tensor,
    reduction: str = "token_mean",
) -> torch.Tensor:
    """L(theta) = sum_{i,t} m_t * (log pi_hat(y_t) - log pi_theta(y_t))^2  (Algorithm 1).

    Inputs are (B, T); `mask` is 1 on response tokens (EOS included) and 0 on padding.
    reduction:
      - "sum": the paper's sum over all masked tokens;
      - "token_mean": that sum divided by the number of masked tokens in the batch;
      - "sequence_mean": each sequence's token mean, averaged over sequences with >= 1 token.
    """
    return masked_reduce((target_logprobs.to(policy_logprobs.dtype) - policy_logprobs) ** 2, mask, reduction)


def token_credit(
    target_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token credit, credit_t = beta * (log pi_hat(y_t) - log pi_ref(y_t))  (the paper's Fig. 8;
    docs/method.md, "Token credit").

    Summed over a prefix it is that prefix's implicit value (Eq. 6 of the paper).
    """
    return beta * (target_logprobs - ref_logprobs)


__all__ = [
    "REDUCTIONS",
    "estimated_optimal_logprobs",
    "inverse_q_loss",
    "mixed_logits",
    "sampled_token_targets",
    "token_credit",
]
