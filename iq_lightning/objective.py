"""The Inverse-Q* math: pure tensor functions, no models (docs/method.md, "The estimated optimal
policy" and "The loss"). Everything here is differentiable where it should be and works on any leading shape.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

REDUCTIONS = ("sum", "token_mean", "sequence_mean")
PENALTIES = ("squared", "huber")

# Rows of (V,) logits processed at once by sampled_token_targets: bounds the float32 temporaries
# to about chunk * V * 4 bytes * 3 (the two upcast logits and their mix) instead of (..., T, V).
_TARGET_CHUNK_ROWS = 256


Logits = torch.Tensor | Sequence[torch.Tensor]
Alphas = float | Sequence[float]


def winners_and_alphas(logits_w: Logits, alpha: Alphas) -> tuple[tuple[torch.Tensor, ...], tuple[float, ...]]:
    """The K winner guides' logits and their weights alpha_k: one tensor and one float (the single
    principle of docs/method.md), or K of each (several principles, guide.principles); a float and a
    one-item sequence are the same weight."""
    winners = (logits_w,) if isinstance(logits_w, torch.Tensor) else tuple(logits_w)
    alphas = (float(alpha),) if isinstance(alpha, (int, float)) else tuple(float(a) for a in alpha)
    if not winners or len(winners) != len(alphas):
        raise ValueError(f"{len(winners)} winner guides but {len(alphas)} alphas")
    return winners, alphas


def estimated_optimal_logprobs(logits_w: Logits, logits_l: torch.Tensor, alpha: Alphas) -> torch.Tensor:
    """log pi_hat over the vocabulary, same shape as logits_l (..., V).

        z_t(v)        = sum_k alpha_k * log pi_w,k(v) + (1 - sum_k alpha_k) * log pi_l(v)
        log pi_hat(v) = z_t(v) - logsumexp_v' z_t(v')

    i.e. pi_hat ∝ prod_k pi_w,k^alpha_k * pi_l^(1 - sum_k alpha_k); with one winner (a tensor and a
    float) docs/method.md's alpha * log pi_w + (1 - alpha) * log pi_l. Each log pi differs from its
    logits by one constant per row (its normaliser), which the final normalisation removes:
    log pi_hat = log_softmax(mixed_logits(...)), one log-softmax instead of K + 2, exactly.
    Computed in float32 (or float64 if given) whatever the logits' dtype.
    """
    winners, alphas = winners_and_alphas(logits_w, alpha)
    _same_shapes(winners, logits_l)
    dtype = torch.promote_types(logits_l.dtype, torch.float32)
    return torch.log_softmax(mixed_logits(tuple(w.to(dtype) for w in winners), logits_l.to(dtype), alphas), dim=-1)


def mixed_logits(logits_w: Logits, logits_l: torch.Tensor, alpha: Alphas) -> torch.Tensor:
    """sum_k alpha_k * logits_w,k + (1 - sum_k alpha_k) * logits_l: unnormalised log pi_hat
    (estimated_optimal_logprobs); one winner: alpha * logits_w + (1 - alpha) * logits_l. The same
    mix of final hidden states, projected by one bias-free linear head, gives the same logits
    (guides.PrincipleGuide's one-head path)."""
    winners, alphas = winners_and_alphas(logits_w, alpha)
    if len(winners) == 1:
        return alphas[0] * winners[0] + (1.0 - alphas[0]) * logits_l
    mixed = (1.0 - sum(alphas)) * logits_l
    for a, w in zip(alphas, winners):
        mixed = mixed + a * w
    return mixed


def _same_shapes(winners: Sequence[torch.Tensor], logits_l: torch.Tensor) -> None:
    for w in winners:
        if w.shape != logits_l.shape:
            raise ValueError(f"guide logits differ in shape: {tuple(w.shape)} vs {tuple(logits_l.shape)}")


def sampled_token_targets(logits_w: Logits, logits_l: torch.Tensor, tokens: torch.Tensor, alpha: Alphas) -> torch.Tensor:
    """log pi_hat(y_t) of the given tokens, shape (..., T), from guide logits (..., T, V); one
    winner's logits and alpha, or K of each (estimated_optimal_logprobs).

    The training target of Algorithm 1: the mixed logits at y_t less their logsumexp (one
    normaliser per token, see estimated_optimal_logprobs). Rows are processed in chunks so no
    float32 (..., T, V) copy is kept beyond the inputs themselves; only one float per token is
    returned.
    """
    winners, alphas = winners_and_alphas(logits_w, alpha)
    _same_shapes(winners, logits_l)
    vocab = logits_l.shape[-1]
    flat_w = [w.reshape(-1, vocab) for w in winners]
    flat_l = logits_l.reshape(-1, vocab)
    flat_tokens = tokens.reshape(-1, 1)
    if flat_tokens.shape[0] != flat_l.shape[0]:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match logits {tuple(logits_l.shape)}")
    out_dtype = torch.promote_types(logits_l.dtype, torch.float32)
    out = torch.empty(flat_tokens.shape[0], dtype=out_dtype, device=logits_l.device)
    for start in range(0, flat_l.shape[0], _TARGET_CHUNK_ROWS):
        end = start + _TARGET_CHUNK_ROWS
        rows_w = tuple(w[start:end].to(out_dtype) for w in flat_w)
        z = mixed_logits(rows_w, flat_l[start:end].to(out_dtype), alphas)
        out[start:end] = z.gather(-1, flat_tokens[start:end]).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return out.view(tokens.shape)


def scheduled_alpha(alpha: float, epoch: int, warmup_epochs: int) -> float:
    """The epoch's alpha under a linear warm-up (train.alpha_warmup_epochs = N; 0: off):

        alpha_e = 1 + (alpha - 1) * min(e / N, 1),   e = 0, 1, ... (0-based epoch)

    Epoch 0 regresses onto pi_w itself (alpha_0 = 1: no extrapolation past the teacher yet), epoch
    N and later onto the configured alpha. Not in the paper (docs/method.md's open choices): it lets the
    policy move towards the teacher before the targets extrapolate past it."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return float(alpha)
    return 1.0 + (float(alpha) - 1.0) * epoch / warmup_epochs


def scheduled_alphas(alphas: Alphas, epoch: int, warmup_epochs: int) -> Alphas:
    """scheduled_alpha for K principles: their sum S = sum_k alpha_k follows the warm-up (from 1
    to S) and each keeps its share, alpha_k,e = alpha_k * scheduled_alpha(S, e, N) / S. One
    principle: scheduled_alpha itself (a float for a float)."""
    if isinstance(alphas, (int, float)):
        return scheduled_alpha(alphas, epoch, warmup_epochs)
    alphas = tuple(float(a) for a in alphas)
    total = sum(alphas)
    if len(alphas) == 1:
        return (scheduled_alpha(alphas[0], epoch, warmup_epochs),)
    if total == 0.0:
        return alphas
    scale = scheduled_alpha(total, epoch, warmup_epochs) / total
    return tuple(a * scale for a in alphas)


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
    penalty: str = "squared",
    huber_delta: float = 1.0,
) -> torch.Tensor:
    """L(theta) = sum_{i,t} m_t * rho(log pi_hat(y_t) - log pi_theta(y_t))  (Algorithm 1: rho(r) = r^2).

    Inputs are (B, T); `mask` is 1 on response tokens (EOS included) and 0 on padding.
    reduction:
      - "sum": the paper's sum over all masked tokens;
      - "token_mean": that sum divided by the number of masked tokens in the batch;
      - "sequence_mean": each sequence's token mean, averaged over sequences with >= 1 token.
    penalty, huber_delta: rho, see residual_penalty ("squared" is the paper's).
    """
    residuals = target_logprobs.to(policy_logprobs.dtype) - policy_logprobs
    return masked_reduce(residual_penalty(residuals, penalty, huber_delta), mask, reduction)


def residual_penalty(residuals: torch.Tensor, penalty: str = "squared", delta: float = 1.0) -> torch.Tensor:
    """rho(r_t) of the residuals r_t = log pi_hat(y_t) - log pi_theta(y_t), elementwise:

      - "squared": r^2, Algorithm 1's;
      - "huber":   r^2 for |r| <= delta, 2 * delta * |r| - delta^2 beyond (Huber 1964, times 2 so
                   that it is r^2 inside): a token whose target is far from the policy pulls with
                   a gradient of at most 2 * delta instead of 2 * |r| (objective.penalty=huber).
    Not in the paper: an open choice of docs/method.md ("clipping of extreme log-ratios").
    """
    if penalty == "squared":
        return residuals**2
    if penalty == "huber":
        return 2.0 * F.huber_loss(residuals, torch.zeros_like(residuals), reduction="none", delta=delta)
    raise ValueError(f"unknown penalty {penalty!r}; choose one of {', '.join(PENALTIES)}")


def clipped_targets(target_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clip: float) -> torch.Tensor:
    """log pi_ref(y_t) + clamp(log pi_hat(y_t) - log pi_ref(y_t), -clip, clip): each target at
    most `clip` nats from the reference's log-prob of the token (objective.target_clip).

    The clamped log-ratio is the token's credit / beta (token_credit): clipping it bounds how far
    one epoch's targets ask the policy to move any token from the initial model, however far
    alpha > 1 extrapolates pi_hat past pi_w. Not in the paper: docs/method.md's open choice
    "clipping of extreme log-ratios".
    """
    return ref_logprobs + (target_logprobs - ref_logprobs).clamp(-clip, clip)


def token_credit(
    target_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token credit, credit_t = beta * (log pi_hat(y_t) - log pi_ref(y_t))  (the paper's Fig. 8;
    docs/method.md, "Token credit").

    Summed over a prefix it is that prefix's implicit value (Eq. 6 of the paper).
    """
    return beta * (target_logprobs - ref_logprobs)


__all__ = [
    "PENALTIES",
    "REDUCTIONS",
    "clipped_targets",
    "estimated_optimal_logprobs",
    "inverse_q_loss",
    "mixed_logits",
    "residual_penalty",
    "sampled_token_targets",
    "scheduled_alpha",
    "scheduled_alphas",
    "token_credit",
    "winners_and_alphas",
]
