"""Guide scoring: the per-token targets log pi_hat(y_t) and the reference log pi_ref(y_t) of
sampled responses, computed once per sample without gradients (docs/method.md, Algorithm 1).

pi_l is the frozen SFT model (the initial policy) given the plain prompt x; it is also pi_ref.
pi_w is either that same model with a principle in the prompt (`PrincipleGuide`, both guides in
one forward pass) or a separate aligned model given x (`AlignedModelGuide`).

Several principles (guide.principles, PrincipleGuide with K principles and K alphas): one winner
pi_w,k per principle, the same model given x with principle k, and
pi_hat ∝ prod_k pi_w,k^alpha_k * pi_l^(1 - sum_k alpha_k) (objective.estimated_optimal_logprobs),
exact over the whole vocabulary: K + 1 guide forward passes per response instead of 2, and on
the one-head path K + 1 final hidden states mixed into one before the same two head products.

Cost per response token, beyond the two guides' forward passes (V: vocabulary, H: hidden size):

- General path (any guides): both guides' logits z_w, z_l (two LM-head products, H x V each);
  log pi_hat(y_t) = log_softmax(alpha z_w + (1 - alpha) z_l)[y_t], one logsumexp over V (the
  guides' own normalisers cancel, objective.estimated_optimal_logprobs); log pi_ref(y_t) =
  log_softmax(z_l)[y_t], a second one. With `winner` (PPO), log pi_w(y_t): a third.
- One-head path (PrincipleGuide whose model passes forward.mixable_head: one model for both
  guides, logits a bias-free linear map W h of the final hidden states): alpha z_w +
  (1 - alpha) z_l = W (alpha h_w + (1 - alpha) h_l), so the target takes one head product over
  the mixed hidden state and one logsumexp, and only one (B, T, V) logits tensor is alive at a
  time instead of two. log pi_ref still needs z_l's own normaliser, hence z_l = W h_l: a second
  head product and logsumexp: with the reference, both paths take two head products and two
  logsumexps per token (before the normalisers cancelled: three log-softmaxes and a logsumexp),
  and the one-head path saves the float32 mix of two logits rows and half the peak logits
  memory. Not with `winner` (log pi_w needs z_w in full too: the general
  path's two products are then the fewer), nor for sharded or LoRA-base guides (see mixable_head).

log pi_ref is computed for every token, whatever the objective: DPO's sequence sums and PPO's KL
penalty read every token of it, and so do the credit figures of every objective (the module's
train/credit_mean on every step, the credit maps' colour scale fixed from all of epoch 0's
tokens, the rollout table, the credit maps, notebooks/inspect_run over the stored rollouts).
Its cost on the one-head path is that second head product and logsumexp: H x V multiply-adds per
token, about 10% of the two guide passes' per-token work for SmolLM2-135M (V = 49152, H = 576:
28M of about 270M), about 1% for a 7B model (V = 32000, H = 4096: 131M of about 14B). Skipping it
would save that, but the figures would have to go or be computed on a subset of rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from iq_lightning.config import GuideSpec, principle_placements, principle_weights
from iq_lightning.data import EncodedPrompt, Messages, encode_prompt
from iq_lightning.errors import ConfigError
from iq_lightning.forward import mixable_head, pack, response_hidden, response_logits, to_device
from iq_lightning.logprobs import token_logprobs
from iq_lightning.models import frozen_reference, load_model, output_vocab_size, same_tokenizer
from iq_lightning.objective import Alphas, mixed_logits, sampled_token_targets


@dataclass(frozen=True)
class GuideScores:
    """One float per response token: the target log pi_hat(y_t) and log pi_ref(y_t) (= log pi_l(y_t)),
    and, where asked for (`score(winner=True)`), log pi_w(y_t); else empty."""

    target_logprobs: list[float]
    ref_logprobs: list[float]
    winner_logprobs: list[float] = field(default_factory=list)


def with_principle(messages: Messages, principle: str, placement: str) -> Messages:
    """x_w: the prompt with the principle as (or appended to) the system message, or prepended
    to the last user turn. Small models follow the two placements differently."""
    messages = [dict(m) for m in messages]
    if placement == "system":
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{principle}"
        else:
            messages.insert(0, {"role": "system", "content": principle})
    elif placement == "user":
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = f"{principle}\n\n{messages[last_user]['content']}"
    else:
        raise ValueError(f"placement must be 'system' or 'user', got {placement!r}")
    return tuple(messages)


class GuideScorer(ABC):
    """Scores sampled responses with the frozen guides. Not an nn.Module on purpose: training
    strategies (DDP, FSDP, ZeRO-3) must neither wrap, shard nor checkpoint the guides."""

    def __init__(self, alpha: Alphas, pad_id: int, batch_size: int, show_progress: bool = True, share_prefix: bool = True):
        self.alpha = alpha  # one float, or one per principle (PrincipleGuide with several)
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.show_progress = show_progress
        # Off for guides sharded over ranks: their forward calls are collectives, and running the
        # shared prefix apart would make the number of calls depend on each rank's prompts.
        self.share_prefix = share_prefix

    @property
    @abstractmethod
    def models(self) -> Sequence[PreTrainedModel]: ...

    @abstractmethod
    def _guide_logits(
        self, prompts: Sequence[EncodedPrompt], responses: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """(logits_w, logits_l, response_ids), each response-aligned (B, T, V) / (B, T); logits_w a
        tuple of K tensors where there are K > 1 winners (several principles)."""

    def to(self, device: torch.device | str) -> "GuideScorer":
        for model in self.models:
            model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    # no_grad, not inference_mode: FSDP and ZeRO-3 re-shard guides in place after each forward,
    # which inference tensors forbid.
    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[EncodedPrompt],
        responses: Sequence[Sequence[int]],
        desc: str = "scoring",
        winner: bool = False,
        alpha: Alphas | None = None,
    ) -> list[GuideScores]:
        """Per response token: log pi_hat(y_t), log pi_ref(y_t) and, with `winner` (PPO's
        contrastive reward), log pi_w(y_t): one more log-softmax over the vocabulary per token.
        `alpha`: this call's weights (the epoch's, under train.alpha_warmup_epochs) in place of
        the guide's own, one per principle."""
        alpha = self.alpha if alpha is None else alpha
        scores: list[GuideScores] = []
        starts = range(0, len(prompts), self.batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", disable=not self.show_progress, leave=False):
            chunk_prompts = prompts[start : start + self.batch_size]
            chunk_responses = responses[start : start + self.batch_size]
            targets, ref, won = self._score_batch(chunk_prompts, chunk_responses, winner, alpha)
            for row, response in enumerate(chunk_responses):
                n = len(response)
                scores.append(GuideScores(targets[row, :n].tolist(), ref[row, :n].tolist(), won[row, :n].tolist() if winner else []))
        return scores

    def _score_batch(
        self, prompts: Sequence[EncodedPrompt], responses: Sequence[Sequence[int]], winner: bool, alpha: Alphas
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log pi_hat(y_t), log pi_ref(y_t), log pi_w(y_t) or None), each (B, T), from both
        guides' logits: the general path (module docstring)."""
        logits_w, logits_l, response_ids = self._guide_logits(prompts, responses)
        targets = sampled_token_targets(logits_w, logits_l, response_ids, alpha)
        ref = token_logprobs(logits_l, response_ids)
        won = token_logprobs(logits_w, response_ids) if winner else None
        return targets, ref, won


class PrincipleGuide(GuideScorer):
    """pi_w = SFT model given x_w (principle inserted), pi_l = the same model given x.

    One forward pass per guide, not one over the stacked [x_w + y ; x + y] batch: x_w and x
    differ in length and in their common prefix (the principle replaces SmolLM2's default system
    prompt), so apart each pass shares its own prefix and pads no row to the other's length.

    `principle` and `alpha` may be K principles and their K weights (module docstring), and
    `placement` one for all or one each: one pass per principle. `principle` (and winner_prompt_ids, validation's teacher, the prompt that
    objectives sampling from x_w use) is then the first."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        principle: str | Sequence[str],
        placement: str | Sequence[str],
        alpha: Alphas,
        batch_size: int = 16,
        show_progress: bool = True,
        share_prefix: bool = True,
    ):
        super().__init__(alpha, tokenizer.pad_token_id, batch_size, show_progress, share_prefix)
        self.model = model
        self.tokenizer = tokenizer
        self.principles = (principle,) if isinstance(principle, str) else tuple(principle)
        alphas = (alpha,) if isinstance(alpha, (int, float)) else tuple(alpha)
        if not self.principles or len(alphas) != len(self.principles):
            raise ValueError(f"{len(self.principles)} principles need as many alphas, got {alpha!r}")
        self.placements = (placement,) * len(self.principles) if isinstance(placement, str) else tuple(placement)
        if len(self.placements) != len(self.principles):
            raise ValueError(f"{len(self.principles)} principles need as many placements, got {placement!r}")
        self.principle = self.principles[0]
        self.placement = self.placements[0]
        self._winner_ids: dict[tuple, tuple[int, ...]] = {}
        self._one_head: bool | None = None

    @property
    def models(self) -> Sequence[PreTrainedModel]:
        return (self.model,)

    @property
    def one_head(self) -> bool:
        """Whether scoring takes the one-head path (module docstring): forward.mixable_head of
        the model, asked once, at the first scoring."""
        if self._one_head is None:
            self._one_head = mixable_head(self.model)
        return self._one_head

    def winner_prompt_ids(self, prompt: EncodedPrompt, k: int = 0) -> tuple[int, ...]:
        """x_w of principle k (the first by default)."""
        key = (k, tuple(tuple(sorted(m.items())) for m in prompt.prompt.messages))
        if key not in self._winner_ids:
            messages = with_principle(prompt.prompt.messages, self.principles[k], self.placements[k])
            self._winner_ids[key] = tuple(encode_prompt(self.tokenizer, messages))
        return self._winner_ids[key]

    def _batches(self, prompts, responses) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Each pi_w,k's inputs (x_w,k + y) and pi_l's (x + y), on the model's device."""
        share = self.share_prefix
        winners = [
            to_device(pack([self.winner_prompt_ids(p, k) for p in prompts], responses, self.pad_id, share), self.device)
            for k in range(len(self.principles))
        ]
        lesser = to_device(pack([p.input_ids for p in prompts], responses, self.pad_id, share), self.device)
        return winners, lesser

    def _guide_logits(self, prompts, responses):
        winners, lesser = self._batches(prompts, responses)
        logits_w = tuple(response_logits(self.model, w) for w in winners)
        return logits_w[0] if len(logits_w) == 1 else logits_w, response_logits(self.model, lesser), lesser["response_ids"]

    def _score_batch(self, prompts, responses, winner, alpha):
        if winner or not self.one_head:
            return super()._score_batch(prompts, responses, winner, alpha)
        winner_batches, lesser = self._batches(prompts, responses)
        hidden_w = tuple(response_hidden(self.model, w).float() for w in winner_batches)
        hidden_l = response_hidden(self.model, lesser)
        head, response_ids = self.model.get_output_embeddings(), lesser["response_ids"]
        # Mixed in float32, then projected at the head's own dtype as the model projects h_l.
        mixed = mixed_logits(hidden_w[0] if len(hidden_w) == 1 else hidden_w, hidden_l.float(), alpha).to(hidden_l.dtype)
        del hidden_w
        targets = token_logprobs(head(mixed), response_ids)
        del mixed
        return targets, token_logprobs(head(hidden_l), response_ids), None


class AlignedModelGuide(GuideScorer):
    """pi_w = a separate aligned model, pi_l = the SFT model; both given the plain prompt x
    (paper: Zephyr-7B-beta vs Zephyr-7B-SFT). Two models, so two forward passes."""

    def __init__(
        self,
        winner: PreTrainedModel,
        lesser: PreTrainedModel,
        pad_id: int,
        alpha: float,
        batch_size: int = 16,
        show_progress: bool = True,
        share_prefix: bool = True,
    ):
        super().__init__(alpha, pad_id, batch_size, show_progress, share_prefix)
        self.winner = winner
        self.lesser = lesser

    @property
    def models(self) -> Sequence[PreTrainedModel]:
        return (self.winner, self.lesser)

    def _guide_logits(self, prompts, responses):
        batch = to_device(pack([p.input_ids for p in prompts], responses, self.pad_id, self.share_prefix), self.device)
        logits_w = response_logits(self.winner, batch)
        logits_l = response_logits(self.lesser, batch)
        return logits_w, logits_l, batch["response_ids"]


def build_guide(
    g: GuideSpec, alpha: float, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, show_progress: bool, policy_name: str | None = None
) -> GuideScorer:
    """pi_l (and pi_ref) is the frozen initial policy (with LoRA: its adapter-disabled base);
    pi_w per guide.kind."""
    lesser = frozen_reference(policy)
    if g.kind == "principle":
        texts, alphas = principle_weights(g, alpha)
        return PrincipleGuide(lesser, tokenizer, texts, principle_placements(g), alphas, g.batch_size, show_progress)
    winner, winner_tokenizer = load_model(g.model)
    if not same_tokenizer(tokenizer, winner_tokenizer) or output_vocab_size(winner) != output_vocab_size(policy):
        raise ConfigError(
            f"guide.model {g.model.name_or_path!r} has a different tokenizer from the policy "
            f"{policy_name!r}; pi_hat mixes log-probs per token id, so both must share one vocabulary"
        )
    winner.eval().requires_grad_(False)
    return AlignedModelGuide(winner, lesser, tokenizer.pad_token_id, alpha, g.batch_size, show_progress)
