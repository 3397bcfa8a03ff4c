"""The on-policy DataModule: every epoch it draws prompts, samples responses with the *current*
policy, scores them with the frozen guides, stores the rollouts and serves micro-batches."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from iq_lightning.data import EncodedPrompt
from iq_lightning.device_memory import PhasePeaks
from iq_lightning.errors import UserError
from iq_lightning.guides import GuideScorer
from iq_lightning.objective import scheduled_alphas
from iq_lightning.objectives import SamplePlan, sampling_prompt_ids
from iq_lightning.out_of_memory import SAMPLING, SCORING
from iq_lightning.out_of_memory import phase as oom_phase
from iq_lightning.rollouts import LengthGroupedBatches, Rollout, TornRolloutsError, collate, read_rollouts, write_rollouts
from iq_lightning.samplers import Sampler, SamplingParams
from iq_lightning.samplers.base import Generation

log = logging.getLogger(__name__)


def draw_prompts(prompts: Sequence[EncodedPrompt], count: int, seed: int) -> list[EncodedPrompt]:
    """`count` prompts without replacement; cycles through reshuffled copies when count > len."""
    rng = random.Random(seed)
    drawn: list[EncodedPrompt] = []
    while len(drawn) < count:
        pool = list(prompts)
        rng.shuffle(pool)
        drawn.extend(pool[: count - len(drawn)])
    return drawn


def given_replies(prompts: Sequence[EncodedPrompt], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> list[Generation]:
    """Each prompt's chosen then rejected reply from the data (SamplePlan.given_pairs), as the
    policy would generate it: the reply's tokens then EOS (the chat template's end of turn for
    ChatML / Zephyr-style templates), like a finished sample. A reply longer than max_new_tokens
    is cut there (finished=False), as a sample would be: the context and the memory plan assume
    responses of at most max_new_tokens."""
    generations = []
    for p in prompts:
        for reply in (p.prompt.chosen, p.prompt.rejected):
            ids = list(tokenizer(reply.strip(), add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
            finished = len(ids) <= max_new_tokens
            ids = ids[:max_new_tokens]
            generations.append(Generation(response_ids=ids, sampling_logprobs=[0.0] * len(ids), finished=finished))
    return generations


class OnPolicyDataModule(L.LightningDataModule):
    """Algorithm 1's outer loop body, run by Lightning at the start of each epoch
    (the Trainer must reload dataloaders every epoch)."""

    def __init__(
        self,
        prompts: Sequence[EncodedPrompt],
        sampler: Sampler,
        tokenizer: PreTrainedTokenizerBase,
        rollout_dir: str | Path,
        samples_per_epoch: int,
        micro_batch_size: int,
        sampling: SamplingParams,
        passes_per_epoch: int = 1,
        seed: int = 0,
        plan: SamplePlan = SamplePlan(),
        alpha_warmup_epochs: int = 0,
        before_epoch: Callable[[], None] | None = None,
    ):
        """`before_epoch`: called on every rank before an epoch's samples are read or drawn (the
        recipe puts the previous epoch's checkpoint into place there: Lightning reloads the data
        before any callback hook of the new epoch)."""
        super().__init__()
        self.before_epoch = before_epoch
        self.prompts = list(prompts)
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.rollout_dir = Path(rollout_dir)
        self.samples_per_epoch = samples_per_epoch
        self.micro_batch_size = micro_batch_size
        self.sampling = sampling
        self.passes_per_epoch = passes_per_epoch
        self.seed = seed
        self.plan = plan
        self.alpha_warmup_epochs = alpha_warmup_epochs  # objective.scheduled_alpha: each epoch's alpha
        self.epoch_stats: dict[str, float] = {}

    def rollout_path(self, epoch: int) -> Path:
        rank, world = self._rank_world()
        suffix = f".rank{rank}" if world > 1 else ""
        return self.rollout_dir / f"epoch_{epoch:03d}{suffix}.jsonl"

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _epoch_seed(self, epoch: int) -> int:
        # Bounded: engines seed 64-bit generators with derived values.
        return (self.seed * 1_000_003 + epoch) % 2**31

    def collect(self, policy, guide: GuideScorer, epoch: int) -> list[Rollout]:
        """Sample this rank's share of the epoch's prompts with the current policy and score them."""
        rank, world = self._rank_world()
        # A plan may sample each drawn prompt more than once (a preference pair): `draws` says how.
        draws = self.plan.draws
        k = len(draws)
        # Every rank gets the same number of samples (rounded up), or ranks would run different
        # numbers of optimizer steps and the gradient all-reduce would hang.
        per_rank = -(-self.samples_per_epoch // (k * world))
        prompts = draw_prompts(self.prompts, per_rank * world, self._epoch_seed(epoch))[rank::world]
        started = time.perf_counter()
        peaks = PhasePeaks()
        if self.plan.given_pairs:
            # The data's own pairs: nothing is sampled, so the sampler (an engine) never starts.
            generations = given_replies(prompts, self.tokenizer, self.sampling.max_new_tokens)
            synced = started
        else:
            with oom_phase(SAMPLING):
                self.sampler.update_weights(policy)  # an engine's first call also starts it
                synced = time.perf_counter()
                generations = self._sample(policy, guide, prompts, epoch, rank, world)
        # Stored prompt by prompt, a prompt's samples adjacent (a pair: chosen, then rejected).
        prompts = [p for p in prompts for _ in draws]
        roles = [role for _ in range(len(generations) // k) for role, _ in draws]
        sampled = time.perf_counter()
        peaks.mark("sample")
        alpha = scheduled_alphas(guide.alpha, epoch, self.alpha_warmup_epochs)
        with oom_phase(SCORING):
            scores = guide.score(
                prompts, [g.response_ids for g in generations], desc=f"epoch {epoch} scoring", winner=self.plan.winner_logprobs, alpha=alpha
            )
        scored = time.perf_counter()
        peaks.mark("score")
        tokens = sum(len(g.response_ids) for g in generations)
        scored_tokens = tokens + sum(len(p.input_ids) for p in prompts)  # x + y of each rollout, read by both guides
        self.epoch_stats = {
            "time/weight_sync_s": synced - started,
            "time/sample_s": sampled - synced,
            "time/score_s": scored - sampled,
            "throughput/sample_tokens_per_s": tokens / max(sampled - synced, 1e-9),
            "throughput/score_tokens_per_s": scored_tokens / max(scored - sampled, 1e-9),
            **peaks.figures,
        }
        if self.alpha_warmup_epochs:
            self.epoch_stats["train/alpha"] = alpha if isinstance(alpha, float) else sum(alpha)
        return [
            Rollout(
                epoch=epoch,
                prompt_id=p.prompt.id,
                category=p.prompt.category,
                messages=[dict(m) for m in p.prompt.messages],
                prompt_ids=list(p.input_ids),
                response_ids=g.response_ids,
                response_text=self.tokenizer.decode(g.response_ids, skip_special_tokens=True),
                finished=g.finished,
                # Given replies were not sampled: the initial policy's log-probs stand in.
                sampling_logprobs=s.ref_logprobs if self.plan.given_pairs else g.sampling_logprobs,
                target_logprobs=s.target_logprobs,
                ref_logprobs=s.ref_logprobs,
                role=role,
                winner_logprobs=s.winner_logprobs,
            )
            for p, g, s, role in zip(prompts, generations, scores, roles)
        ]

    def _sample(self, policy, guide: GuideScorer, prompts: list[EncodedPrompt], epoch: int, rank: int, world: int) -> list[Generation]:
        """The plan's draws for each prompt, in stored order (a prompt's samples adjacent)."""
        draws = self.plan.draws
        k = len(draws)
        per_draw = []
        for j, (role, principle_in_prompt) in enumerate(draws):
            # Each sample's random stream follows its index in the epoch's draw (prompt i's j-th
            # sample is sample k * i + j), so the samples are the same whatever the world size or
            # the sampler's batch size.
            params = SamplingParams(
                max_new_tokens=self.sampling.max_new_tokens,
                temperature=self.sampling.temperature,
                top_p=self.sampling.top_p,
                seed=self._epoch_seed(epoch),
                first_index=k * rank + j,
                index_step=k * world,
            )
            sampled_from = [sampling_prompt_ids(principle_in_prompt, guide, p) for p in prompts]
            desc = f"epoch {epoch} sampling" + (f" ({role})" if role else "")
            per_draw.append(self.sampler.generate(policy, sampled_from, params, desc=desc))
        return [g for row in zip(*per_draw) for g in row]

    def _finished(self, epoch: int) -> bool:
        """Whether `epoch` is already trained: Lightning, restoring an end-of-epoch checkpoint,
        asks for the checkpoint's own epoch once before it moves on to the next one; that epoch is
        then counted processed (the checkpoint was saved at its end) but not yet completed."""
        progress = self.trainer.fit_loop.epoch_progress.current
        return progress.processed > progress.completed and epoch == progress.completed

    def train_dataloader(self) -> DataLoader:
        if self.before_epoch is not None:
            self.before_epoch()
        epoch = self.trainer.current_epoch
        if self._finished(epoch):
            # Never iterated (Lightning reloads for the next epoch first), but it must not be
            # empty, or fit stops: one placeholder batch, and no sampling with the wrong weights.
            return DataLoader([None], batch_size=1, collate_fn=list)
        path = self.rollout_path(epoch)
        rollouts = self._stored(epoch, path)
        # Reuse is decided over all ranks: a kill between two ranks' writes leaves some files
        # missing, and a rank that skipped `collect` would leave the others in its collectives.
        if not self.trainer.strategy.reduce_boolean_decision(rollouts is not None, all=True):
            if rollouts is not None:
                log.info("epoch %d: another rank has no stored rollouts; every rank samples the epoch again", epoch)
            rollouts = None
        elif rollouts is not None:
            self.epoch_stats = {"time/sample_s": 0.0, "time/score_s": 0.0}
            log.info("epoch %d: reusing %d rollouts from %s", epoch, len(rollouts), path)
        if rollouts is None and not self.plan.on_policy and epoch > 0:
            rollouts = self._first_epoch_samples(epoch)
            write_rollouts(path, rollouts)
        if rollouts is None:
            module = self.trainer.lightning_module
            rollouts = self.collect(module.policy, module.guide, epoch)
            write_rollouts(path, rollouts)
            self.sampler.sleep()
        lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
        batches = LengthGroupedBatches(
            lengths, self.micro_batch_size, self.passes_per_epoch, seed=self._epoch_seed(epoch), group=len(self.plan.draws)
        )
        per_token = self._prepare(rollouts)
        if per_token is None:
            return DataLoader(rollouts, batch_sampler=batches, collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id))
        return DataLoader(
            list(zip(rollouts, per_token)), batch_sampler=batches, collate_fn=partial(_collate_prepared, pad_id=self.tokenizer.pad_token_id)
        )

    def _stored(self, epoch: int, path: Path) -> list[Rollout] | None:
        """This rank's stored rollouts of `epoch`, or None when missing or torn. A resumed run
        restarts the epoch from the checkpoint these samples were drawn with, so they are still
        on-policy."""
        if not path.exists():
            return None
        try:
            return read_rollouts(path)
        except TornRolloutsError as exc:
            log.warning("epoch %d: %s; sampling the epoch again", epoch, exc)
            return None

    def _prepare(self, rollouts: list[Rollout]):
        """The objective's per-token values for this epoch's steps (PPO: old log-probs, values,
        advantages), from the policy as it is before the epoch's first step."""
        module = self.trainer.lightning_module
        started = time.perf_counter()
        per_token, figures = module.objective.prepare_epoch(
            module.policy, rollouts, self.tokenizer.pad_token_id, self.micro_batch_size, self.trainer.precision_plugin.forward_context()
        )
        if per_token is not None:
            self.epoch_stats = {**self.epoch_stats, **figures, "time/prepare_s": time.perf_counter() - started}
        return per_token

    def _first_epoch_samples(self, epoch: int) -> list[Rollout]:
        """An objective that samples once (its samples come from the initial policy) trains every
        epoch on epoch 0's samples; stored again under this epoch so every reader finds them."""
        first = self.rollout_path(0)
        if not first.exists():
            raise UserError(f"{first} is missing: this objective draws its samples once, at epoch 0, from the initial policy; start a new run")
        self.epoch_stats = {"time/sample_s": 0.0, "time/score_s": 0.0}
        log.info("epoch %d: training on epoch 0's samples again (drawn once)", epoch)
        return [dataclasses.replace(r, epoch=epoch) for r in read_rollouts(first)]

    def teardown(self, stage: str) -> None:
        self.sampler.close()


def _collate_prepared(items: list[tuple[Rollout, dict]], pad_id: int) -> dict:
    rollouts, per_token = zip(*items)
    return collate(list(rollouts), pad_id, list(per_token))
