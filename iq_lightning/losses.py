"""The baselines' losses (issue 12): on-policy distillation, DPO, PPO, SFT. Pure tensor functions
beside objective.inverse_q_loss, no models. Inputs are (..., T) per-token tensors (or (..., T, V)
logits) with `mask` 1 on response tokens (EOS included) and 0 on prompt and padding; reductions
are the ones of inverse_q_loss (see masked_reduce).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from iq_lightning.objective import masked_reduce

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")

# Positions of one sequence per chunk in distill_loss. Each chunk holds about six float32
# (rows, V) temporaries (two log-softmaxes, the mixture and its two-row stack, the pointwise
# terms), and the same again while its backward recomputes it; nothing (..., T, V) is kept.
_DISTILL_CHUNK_ROWS = 128


def _row_divergence(student: torch.Tensor, teacher: torch.Tensor, divergence: str, beta: float, temperature: float):
    """Per-row divergence (rows,) from (rows, V) logits; see distill_loss for the definitions."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_s = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
    log_t = torch.log_softmax(teacher.to(dtype) / temperature, dim=-1)
    if divergence == "forward_kl":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if divergence == "reverse_kl":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    b = torch.tensor(beta, dtype=dtype, device=log_s.device)
    log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-b), log_t + torch.log(b)]), dim=0)
    kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
    return beta * kl_t + (1.0 - beta) * kl_s


def _kept_rows_divergence(student, teacher, keep, divergence, beta, temperature):
    """_row_divergence of the rows `keep` of a chunk; selected inside the checkpointed region so
    that autograd saves only views of the caller's logits, never copies of them."""
    return _row_divergence(student.index_select(0, keep), teacher.index_select(0, keep), divergence, beta, temperature)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    divergence: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "token_mean",
) -> torch.Tensor:
    """On-policy distillation over the full vocabulary per token (GKD, Agarwal et al. 2024, Eq. 1).

    With p_s = softmax(student_logits / temperature), p_t = softmax(teacher_logits / temperature):
      - "forward_kl": KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)   (supervised KD direction)
      - "reverse_kl": KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)   (mode seeking)
      - "jsd": generalized JSD(beta) = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m),
               m = beta * p_t + (1 - beta) * p_s.
    This is TRL's GKDTrainer.generalized_jsd_loss (and SDFT's compute_divergence with alpha=beta)
    exactly, including its convention at the ends: "jsd" with beta=0 *is* forward KL and beta=1
    *is* reverse KL (the literal JSD(0) and JSD(1) are 0). No temperature**2 factor, as in TRL.
    Logits are (..., T, V), mask (..., T); the per-token divergence is reduced by masked_reduce
    (TRL's "batchmean" with labels is "token_mean"). Rows go through in chunks, each under
    activation checkpointing when grads are needed, so no float32 (..., T, V) copy is kept.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != mask.shape:
        raise ValueError(
            f"shapes differ: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    if divergence == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd needs 0 <= beta <= 1, got {beta}")
        if beta == 0.0:
            divergence = "forward_kl"
        elif beta == 1.0:
            divergence = "reverse_kl"
    steps, vocab = student_logits.shape[-2:]
    # (rows, T, V) views: a slice along T of model logits stays a view (flattening T would copy it)
    seq_s, seq_t = student_logits.reshape(-1, steps, vocab), teacher_logits.reshape(-1, steps, vocab)
    seq_mask = mask.reshape(-1, steps).bool()
    needs_grad = torch.is_grad_enabled() and (student_logits.requires_grad or teacher_logits.requires_grad)
    out_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    pieces = []
    for row in range(seq_s.shape[0]):
        for start in range(0, steps, _DISTILL_CHUNK_ROWS):
            span = slice(start, start + _DISTILL_CHUNK_ROWS)
            keep = seq_mask[row, span].nonzero().squeeze(-1)
            piece = torch.zeros(seq_mask[row, span].shape[0], dtype=out_dtype, device=student_logits.device)
            if keep.numel():
                args = (seq_s[row, span], seq_t[row, span], keep, divergence, beta, temperature)
                if needs_grad:
                    div = checkpoint(_kept_rows_divergence, *args, use_reentrant=False)
                else:
                    div = _kept_rows_divergence(*args)
                piece = piece.index_copy(0, keep, div)
            pieces.append(piece)
    per_token = torch.cat(pieces).view(mask.shape)
    return masked_reduce(per_token, mask, reduction)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's sigmoid loss (Rafailov et al. 2023, Eq. 7) from summed response log-probs, shape (N,).

        r_c = beta * (log pi(y_c) - log pi_ref(y_c)),  r_r likewise for y_r
        loss = mean_i -log sigmoid(r_c - r_r)
    Returns (loss, chosen_rewards, rejected_rewards), the rewards detached, as TRL's DPOTrainer
    with loss_type="sigmoid", f_divergence_type="reverse_kl" and no label smoothing.
    """
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    loss = -torch.nn.functional.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sft_loss(policy_logprobs: torch.Tensor, mask: torch.Tensor, reduction: str = "token_mean") -> torch.Tensor:
    """Supervised fine-tuning: the negative log-likelihood -log pi_theta(y_t), reduced over the mask."""
    return masked_reduce(-policy_logprobs, mask, reduction)


def contrastive_sequence_reward(logp_w: torch.Tensor, logp_l: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The guides' sequence reward sum_t m_t (log pi_w(y_t) - log pi_l(y_t)), shape (...,) from (..., T)."""
    return ((logp_w - logp_l) * mask.to(logp_w.dtype)).sum(dim=-1)


def kl_penalized_rewards(
    sequence_reward: torch.Tensor,
    policy_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """Per-token PPO rewards with a KL penalty to pi_ref (the paper's Eq. 2; Ouyang et al. 2022):

        r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t)) + [t = last response token] * R(x, y)
    Shapes: sequence_reward (...,), the rest (..., T); 0 outside the mask. The KL estimate is
    TRL's and OpenRLHF's default (k1). A row with no response token gets no reward at all.
    """
    maskf = mask.to(policy_logprobs.dtype)
    rewards = -kl_coef * (policy_logprobs - ref_logprobs) * maskf
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    last = (maskf * positions).argmax(dim=-1, keepdim=True)
    has_tokens = maskf.sum(dim=-1) > 0
    bonus = torch.where(has_tokens, sequence_reward.to(rewards.dtype), torch.zeros_like(rewards[..., 0]))
    return rewards.scatter_add(-1, last, bonus.unsqueeze(-1))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) by a reverse scan over T, as TRL's PPO.

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    `values[..., t]` is V of the prefix before y_t. Rewards and values are zeroed outside the mask
    first, so after the last response token the episode ends (V = 0); the mask should be a
    contiguous response span. Returns (advantages, returns = advantages + values), 0 outside the
    mask, unwhitened (see whiten), without grad.
    """
    maskf = mask.to(values.dtype)
    rewards, values = (rewards * maskf).detach(), (values * maskf).detach()
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[..., 0])
    next_adv = torch.zeros_like(values[..., 0])
    for t in reversed(range(values.shape[-1])):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        next_adv = delta + gamma * lam * next_adv
        advantages[..., t] = next_adv
        next_value = values[..., t]
    advantages = advantages * maskf
    return advantages, (advantages + values) * maskf


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (TRL's masked_whiten: unbiased variance).

    shift_mean=False adds the mean back (TRL's reward whitening). 0 outside the mask.
    """
    maskf = mask.to(x.dtype)
    n = maskf.sum()
    mean = (x * maskf).sum() / n.clamp(min=1.0)
    var = (((x - mean) ** 2) * maskf).sum() / (n - 1).clamp(min=1.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * maskf


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    reduction: str = "token_mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss to minimise:

        rho_t = exp(log pi(y_t) - log pi_old(y_t))
        l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - clip_range, 1 + clip_range))
    Returns (reduce(l), clip_fraction, approx_kl): the token means of [the clipped term is the
    larger] and of 0.5 * (log pi - log pi_old)^2 (TRL's approxkl, here masked), both detached.
    """
    diff = logprobs - old_logprobs
    ratio = torch.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_reduce(torch.maximum(unclipped, clipped), mask, reduction)
    clip_fraction = masked_reduce((clipped > unclipped).to(diff.dtype), mask).detach()
    approx_kl = masked_reduce(0.5 * diff.detach() ** 2, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
    reduction: str = "token_mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (TRL's PPO, OpenAI baselines):

        V_clip = old_V + clip(V - old_V, -clip_range_value, clip_range_value)
        l_t = 0.5 * max((V - G)^2, (V_clip - G)^2)
    Returns (reduce(l), clip_fraction), the fraction detached.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    loss = 0.5 * masked_reduce(torch.maximum(unclipped_sq, clipped_sq), mask, reduction)
    clip_fraction = masked_reduce((clipped_sq > unclipped_sq).to(values.dtype), mask).detach()
    return loss, clip_fraction


__all__ = [
    "DIVERGENCES",
    "contrastive_sequence_reward",
    "distill_loss",
    "dpo_loss",
    "gae",
    "kl_penalized_rewards",
    "masked_reduce",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sft_loss",
    "whiten",
]
