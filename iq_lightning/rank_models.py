"""The policy and the frozen guides of one rank, built when the trainer is ready for them.

Models are not loaded before `Trainer.fit`: under ZeRO-3 and FSDP they are built sharded, which
needs the process group that Lightning starts inside `fit`. The LightningModule asks for them in
two hooks, in this order:

- `guide(...)`, from `setup`: rank 0 (every rank when replicated) loads the whole initial weights,
  the source everything else is filled from; the frozen guides are built from it (and, for
  `guide=aligned_model`, from the aligned model's own source) outside any strategy context.
- `policy()`, from `configure_model`: inside the strategy's context (deepspeed.zero.Init for
  ZeRO-3), the policy is built and filled from the same source, which is then released.

pi_l and pi_ref are the initial policy's weights (a LoRA policy's adapter-disabled base, shared
with it); pi_w is the same weights given the principle, or the aligned model.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from iq_lightning.config import GuideSpec, LoraSpec, ModelSpec, principle_placements, principle_weights
from iq_lightning.errors import ConfigError
from iq_lightning.guides import AlignedModelGuide, GuideScorer, PrincipleGuide
from iq_lightning.models import DTYPES, AdapterDisabled, frozen_copy, load_tokenizer, load_weights, same_tokenizer, skeleton
from iq_lightning.strategies import Sharding

log = logging.getLogger(__name__)


def _broadcast(obj, rank: int):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class RankModels:
    def __init__(
        self,
        model: ModelSpec,
        guide: GuideSpec,
        alpha: float,
        tokenizer: PreTrainedTokenizerBase,
        sharding: Sharding,
        show_progress: bool = True,
    ):
        self.model_spec = model
        self.guide_spec = guide
        self.alpha = alpha
        self.tokenizer = tokenizer
        self.sharding = sharding
        self.show_progress = show_progress
        self._source: PreTrainedModel | None = None
        self._config = None
        self._rank = 0

    @property
    def guides_sharded(self) -> bool:
        """Guides sharded like the policy: under ZeRO-3 / FSDP unless guide.device keeps them whole."""
        return self.sharding.sharded and self.guide_spec.device is None

    def _load_source(self, spec: ModelSpec, every_rank: bool):
        """(whole model on the ranks that load one, else None; its config on every rank)."""
        loads = every_rank or self.sharding.loads_whole_weights(self._rank)
        source = load_weights(spec) if loads else None
        config = _broadcast(source.config if source is not None else None, self._rank)
        return source, config

    def _frozen(self, spec: ModelSpec, source: PreTrainedModel | None, config, dtype: str) -> nn.Module:
        """A frozen, gradient-free model of `source`'s weights in `dtype`, placed per the strategy."""
        if not self.guides_sharded:
            return frozen_copy(source).to(DTYPES[dtype])
        plain = dataclasses.replace(spec, lora=LoraSpec(enabled=False), gradient_checkpointing=False)
        model = self.sharding.materialize(lambda: skeleton(plain, config, dtype), source, frozen_dtype=DTYPES[dtype])
        model.eval().requires_grad_(False)
        return self.sharding.prepare_frozen(model)

    def guide(self, rank: int, policy: Callable[[], nn.Module]) -> GuideScorer:
        """pi_l (and pi_ref), pi_w per guide.kind; `policy` returns the (possibly wrapped) policy
        module once it exists, for a LoRA policy's adapter-disabled base."""
        self._rank = rank
        g, spec = self.guide_spec, self.model_spec
        # Whole frozen copies of the initial policy (guide.device set) need it on every rank.
        self._source, self._config = self._load_source(spec, every_rank=not spec.lora.enabled and not self.guides_sharded)
        dtype = g.dtype or spec.dtype
        lesser = AdapterDisabled(policy) if spec.lora.enabled else self._frozen(spec, self._source, self._config, dtype)
        # Sharded guides gather their shards in every forward call: the ranks must make the
        # same calls, whatever prefix their prompts happen to share.
        share_prefix = not self.guides_sharded
        if g.kind == "principle":
            texts, alphas = principle_weights(g, self.alpha)
            return PrincipleGuide(
                lesser, self.tokenizer, texts, principle_placements(g), alphas, g.batch_size, self.show_progress, share_prefix=share_prefix
            )
        if not same_tokenizer(self.tokenizer, load_tokenizer(g.model)):
            raise ConfigError(
                f"guide.model {g.model.name_or_path!r} has a different tokenizer from the policy "
                f"{spec.name_or_path!r}; pi_hat mixes log-probs per token id, so both must share one vocabulary"
            )
        winner_source, winner_config = self._load_source(g.model, every_rank=not self.guides_sharded)
        if winner_config.vocab_size != self._config.vocab_size:
            raise ConfigError(
                f"guide.model {g.model.name_or_path!r} has {winner_config.vocab_size} output tokens, the policy "
                f"{self._config.vocab_size}; pi_hat mixes log-probs per token id, so both must share one vocabulary"
            )
        winner = self._frozen(g.model, winner_source, winner_config, g.dtype or g.model.dtype)
        return AlignedModelGuide(winner, lesser, self.tokenizer.pad_token_id, self.alpha, g.batch_size, self.show_progress, share_prefix=share_prefix)

    def policy(self) -> PreTrainedModel:
        """The trainable policy on this rank; releases the whole source weights."""
        spec = self.model_spec
        if not self.sharding.sharded:
            policy = self._source
        else:
            source = self._source if self.sharding.loads_whole_weights(self._rank) else None
            policy = self.sharding.materialize(lambda: skeleton(spec, self._config), source)
        self._source = None
        return policy
