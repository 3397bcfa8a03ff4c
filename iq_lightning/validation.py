"""Held-out validation: has the policy learned the principle, on prompts it never trained on and
without the principle in its prompt, and is it still fluent?

Before training (epoch -1: the base policy) and after every `val.every_n_epochs` epochs, the
policy answers the held-out prompts x (greedy by default), and each answer y is measured:

- `kl_pi_hat_exact_heldout`: the exact per-token KL(pi_theta || pi_hat) over the whole
  vocabulary along y, with pi_hat = softmax(alpha log pi_w + (1 - alpha) log pi_l). Training's
  `train/kl_pi_hat_est_rollouts` estimates the same KL on the epoch's own samples, the very
  rollouts each step fits; on held-out prompts, along greedy answers that change as the policy
  moves, the two need not fall together;
- `kl_pi_w`: KL(pi_theta || pi_w), the distance to the principle-prompted teacher itself;
- `nll_w`: mean NLL per token of y under pi_w (how plausible the answer is to the teacher);
- `repetition` (share of repeated word 3-grams), `length` (tokens), `truncated` (share of
  answers cut off at max_new_tokens: a length or format principle cannot be judged on them), and
  `principle_rate`: the share of answers that pass the principle check (principle_check.py),
  absent, as the log and the plot say, when no check applies to the principle. With several
  principles (guide.principles) pi_hat is their product, and pi_w, the teacher and the check are
  the first principle's.

The teacher (pi_w: the base given the principle, or the aligned model) answers the same prompts
once, and its figures are the reference lines (`val_teacher/*`); epoch -1 is the base line. Both
answer the same way in every run of a model, principle, prompts and decoding: their answers are
decoded once and kept (validation_cache.py, `val.cache`), and each run recomputes their figures
from them, alpha's included, by one guide forward pass.

A Callback rather than Lightning's validation_step: epoch -1 must run before the first training
step, and Lightning's sanity check (the only validation before training) discards what it logs.
The teacher's answers come from HF generate. The policy's come from the run's engine where it has
one (sampler=vllm: the engine that samples the rollouts, given the current weights here, as the
next epoch's sampling would give them anyway), else from HF generate too; greedy decoding makes
the two agree up to kernel differences (tests/test_validation_cache.py measures how far). Each rank answers an equal share (its
shards' forward calls are collectives); rank 0 gathers the rows, writes
`validation/epoch_NNN.jsonl` and `validation/summary.jsonl`, and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from transformers import PreTrainedTokenizerBase

from iq_lightning.data import EncodedPrompt
from iq_lightning.files import read_jsonl, write_jsonl_atomic
from iq_lightning.forward import pack, response_logits, to_device
from iq_lightning.guides import GuideScorer, PrincipleGuide
from iq_lightning.logprobs import token_logprobs
from iq_lightning.models import AdapterDisabled
from iq_lightning.objective import estimated_optimal_logprobs
from iq_lightning.out_of_memory import VALIDATION
from iq_lightning.out_of_memory import phase as oom_phase
from iq_lightning.principle_check import PrincipleCheck
from iq_lightning.samplers.base import Generation, Sampler, SamplingParams
from iq_lightning.samplers.hf import HFSampler
from iq_lightning.text_quality import decode_whole, per_token_kl, repetition
from iq_lightning.validation_cache import AnswerCache, FrozenAnswer

log = logging.getLogger(__name__)

NO_CHECK_NOTE = "no check applies to this principle (set one: val.check={kind: regex, pattern: ...}; README, Principle checks)"
VALIDATION_DIR = "validation"
FIGURES = ("kl_pi_hat_exact_heldout", "kl_pi_w", "nll_w", "repetition", "length", "truncated", "principle_rate")
LEGACY_NAMES = {"kl_pi_hat": "kl_pi_hat_exact_heldout"}  # summary.jsonl of runs before the rename


@dataclass(frozen=True)
class AnswerFigures:
    """One answer and its figures; token figures are means over the answer's tokens."""

    prompt_id: str
    prompt: str
    answer: str
    tokens: int
    kl_pi_hat: float
    kl_pi_w: float
    nll_w: float
    repetition: float
    passes: bool | None
    truncated: bool = False  # cut off at max_new_tokens, without an end-of-sequence token


def summarize(rows: Sequence[AnswerFigures]) -> dict[str, float]:
    """Epoch figures: KL and NLL averaged over all answer tokens (the objective's own weighting);
    repetition, length and principle rate over answers. Empty answers have no tokens to average."""
    tokens = sum(r.tokens for r in rows)
    per_token = lambda key: sum(getattr(r, key) * r.tokens for r in rows if r.tokens) / tokens if tokens else math.nan  # noqa: E731
    checked = [r.passes for r in rows if r.passes is not None]
    figures = {
        "kl_pi_hat_exact_heldout": per_token("kl_pi_hat"),
        "kl_pi_w": per_token("kl_pi_w"),
        "nll_w": per_token("nll_w"),
        "repetition": sum(r.repetition for r in rows) / len(rows),
        "length": tokens / len(rows),
        "truncated": sum(r.truncated for r in rows) / len(rows),
        "answers": len(rows),  # n of the principle rate's interval
    }
    if checked and len(checked) == len(rows):
        figures["principle_rate"] = sum(checked) / len(checked)
    return figures


def answer_figures(
    answer_logits: torch.Tensor, logits_w, logits_l: torch.Tensor, response_ids: torch.Tensor, mask: torch.Tensor, alpha
) -> dict[str, torch.Tensor]:
    """Per-answer token means (B,) of KL(answerer || pi_hat), KL(answerer || pi_w) and the NLL
    under pi_w, from response-aligned logits (B, T, V) of the answering model and both guides
    (logits_w and alpha: K of each for several principles, pi_w then the first's)."""
    log_pi_hat = estimated_optimal_logprobs(logits_w, logits_l, alpha)
    logits_w = first_winner(logits_w)
    count = mask.sum(-1).clamp(min=1.0)
    mean = lambda values: (values * mask).sum(-1) / count  # noqa: E731
    return {
        "kl_pi_hat": mean(per_token_kl(answer_logits, log_pi_hat)),
        "kl_pi_w": mean(per_token_kl(answer_logits, logits_w)),
        "nll_w": mean(-token_logprobs(logits_w, response_ids)),
    }


def first_winner(logits_w):
    """pi_w's logits: the one winner's, or the first principle's of several."""
    return logits_w if isinstance(logits_w, torch.Tensor) else logits_w[0]


class Validation(Callback):
    def __init__(
        self,
        run_dir: Path,
        prompts: Sequence[EncodedPrompt],
        tokenizer: PreTrainedTokenizerBase,
        check: PrincipleCheck,
        alpha: float,
        every_n_epochs: int,
        max_new_tokens: int,
        temperature: float,
        batch_size: int,
        eos_ids: Sequence[int],
        seed: int,
        sharded: bool,
        table_rows: int = 16,
        gather_whole_up_to: int = 0,
        show_progress: bool = False,
        top_p: float = 1.0,
        cache: AnswerCache | None = None,
        answerers: Mapping[str, Mapping] | None = None,
        engine: Sampler | None = None,
    ):
        """`cache` keeps the frozen answerers' answers; `answerers` names their weights
        (validation_cache.weights_identity) as "policy" (the untrained one) and "teacher";
        `engine`: the run's sampler where it holds the policy's weights in an engine (vLLM),
        which then answers for the policy."""
        self.out = Path(run_dir) / VALIDATION_DIR
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.check = check
        self.alpha = alpha
        self.every_n_epochs = every_n_epochs
        self.params = SamplingParams(max_new_tokens, temperature, top_p, seed)
        self.batch_size = batch_size
        self.sharded = sharded
        self.table_rows = table_rows
        self.cache = cache if answerers else None
        self.answerers = dict(answerers or {})
        self.eos_ids = [int(i) for i in eos_ids]
        self.engine = engine
        self.sampler = HFSampler(
            batch_size, eos_ids, tokenizer.pad_token_id, show_progress=show_progress, synced_gpus=sharded, gather_whole_up_to=gather_whole_up_to
        )

    # --- when ------------------------------------------------------------------------------

    def _done(self, epoch: int) -> bool:
        """Whether the summary holds the epoch's rows: they are written last (`_report`)."""
        return any(row["epoch"] == epoch for row in read_summary(self.out.parent))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.strategy.broadcast(self._done(-1))
        if not done:  # not again on a resumed run
            self.validate(trainer, pl_module, epoch=-1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs == 0 or epoch + 1 == trainer.max_epochs:
            self.validate(trainer, pl_module, epoch)

    # --- what ------------------------------------------------------------------------------

    def _share(self, rank: int, world: int) -> list[tuple[EncodedPrompt, bool]]:
        """This rank's prompts, equal in number on every rank (the last ones repeated, not counted)."""
        per_rank = -(-len(self.prompts) // world)
        mine = [(p, True) for p in self.prompts[rank::world]]
        while len(mine) < per_rank:
            mine.append((self.prompts[0], False))
        return mine

    @torch.no_grad()
    def _measure(
        self,
        answerer,
        answer_prompts: list[Sequence[int]],
        guide: GuideScorer,
        share: list[tuple[EncodedPrompt, bool]],
        is_guide: str | None = None,
        frozen: str | None = None,
        strategy=None,
    ):
        """Figures of `answerer`'s answers to `answer_prompts` (x for the policy, x_w for a principle teacher).
        `is_guide` "w" or "l": the answerer, so prompted, computes exactly that guide's logits
        (the teacher; the untrained policy at epoch -1), so its own forward over the answers is
        not run again: a third of a validation's passes. `frozen` ("teacher", "policy") names an
        answerer whose answers the cache keeps."""
        generations = self._answers(answerer, answer_prompts, "teacher" if is_guide == "w" else "policy", frozen, strategy)
        rows: list[AnswerFigures] = []
        device = guide.device
        for start in range(0, len(share), self.batch_size):
            chunk = share[start : start + self.batch_size]
            answers = generations[start : start + self.batch_size]
            responses = [g.response_ids for g in answers]
            ids = answer_prompts[start : start + self.batch_size]
            logits_w, logits_l, response_ids = guide._guide_logits([p for p, _ in chunk], responses)
            batch = to_device(pack(ids, responses, guide.pad_id, guide.share_prefix), device)
            if is_guide is None:
                answer_logits = response_logits(answerer, batch, guide.share_prefix)
            else:
                answer_logits = first_winner(logits_w) if is_guide == "w" else logits_l
            figures = answer_figures(answer_logits, logits_w, logits_l, response_ids, batch["response_mask"], self.alpha)
            for i, ((prompt, counted), response) in enumerate(zip(chunk, responses)):
                if not counted:
                    continue
                text = decode_whole(self.tokenizer, response)
                rows.append(
                    AnswerFigures(
                        prompt_id=prompt.prompt.id,
                        prompt=prompt.prompt.messages[-1]["content"],
                        answer=text,
                        tokens=len(response),
                        kl_pi_hat=float(figures["kl_pi_hat"][i]) if response else 0.0,
                        kl_pi_w=float(figures["kl_pi_w"][i]) if response else 0.0,
                        nll_w=float(figures["nll_w"][i]) if response else 0.0,
                        repetition=repetition(text),
                        passes=self.check(text),
                        truncated=not answers[i].finished,
                    )
                )
        return rows

    def _decoding(self, who: str) -> dict:
        """What decides `who`'s answers besides the model and the prompts (the seed only where
        sampling; the engine's version and options where it answers)."""
        decoding = {**dataclasses.asdict(self.params), "batch_size": self.batch_size, "eos_ids": self.eos_ids}
        decoding["pad_id"] = self.tokenizer.pad_token_id
        engine = who == "policy" and self.engine is not None
        decoding["decoder"] = self.engine.identity() if engine else self.sampler.identity()
        if not self.params.temperature:
            decoding.pop("seed")
        return decoding

    def _answers(self, answerer, prompts: list[Sequence[int]], who: str, frozen: str | None, strategy) -> list[Generation]:
        """`answerer`'s answers to `prompts`: decoded, or the kept ones of a frozen answerer. Every
        rank decodes (a sharded generate is a collective) unless every rank found its share kept."""
        desc = f"validation: {who}"
        if self.cache is None or frozen is None:
            return self._decode(answerer, prompts, who, desc)
        # A hub model loaded without a pinned revision: the snapshot it came from.
        answerer_id = {**self.answerers[frozen], "commit": getattr(getattr(answerer, "config", None), "_commit_hash", None)}
        decided_by = self.cache.decided_by(answerer_id, prompts, self._decoding(who))
        key = self.cache.key_of(decided_by)
        kept = self.cache.load(key)
        if kept is not None and len(kept) != len(prompts):
            log.warning("validation: the answer cache's %s holds %d answers for %d prompts; decoding them again", self.cache.path(key), len(kept), len(prompts))
            kept = None
        found = kept is not None if strategy is None else strategy.reduce_boolean_decision(kept is not None, all=True)
        if found:
            if strategy is None or strategy.global_rank == 0:
                log.info("validation: the %s's held-out answers from the cache (%s): not decoded again; figures recomputed", who, self.cache.path(key))
            return [Generation(a.response_ids, [], a.finished) for a in kept]
        generations = self._decode(answerer, prompts, who, desc)
        self.cache.store(key, [FrozenAnswer(list(g.response_ids), g.finished) for g in generations], decided_by)
        return generations

    def _decode(self, answerer, prompts: list[Sequence[int]], who: str, desc: str) -> list[Generation]:
        if who == "policy" and self.engine is not None:
            self.engine.update_weights(answerer)  # collective on sharded ranks, as in sampling
            try:
                return self.engine.generate(answerer, prompts, self.params, desc=desc)
            finally:
                self.engine.sleep()  # as after sampling: training's memory plan counts it asleep
        return self.sampler.generate(answerer, prompts, self.params, desc=desc)

    @oom_phase(VALIDATION)
    def validate(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        started = time.perf_counter()
        rank, world = trainer.global_rank, trainer.world_size
        share = self._share(rank, world)
        guide, policy = pl_module.guide, pl_module.policy
        was_training = policy.training
        policy.eval()
        try:
            untrained = epoch == -1 and _is_lesser_guide(policy, guide.models[-1])
            strategy = trainer.strategy
            policy_frozen = "policy" if epoch == -1 else None
            rows = self._measure(policy, [p.input_ids for p, _ in share], guide, share, "l" if untrained else None, policy_frozen, strategy)
            teacher_rows = None
            if epoch == -1:
                # Computed at epoch -1 only, where a LoRA policy's adapter is still zero.
                with _teacher(guide, policy) as (teacher, prompts_of):
                    teacher_rows = self._measure(teacher, [prompts_of(p) for p, _ in share], guide, share, "w", "teacher", strategy)
        finally:
            policy.train(was_training)
        rows = _gather(rows, world)
        teacher_rows = _gather(teacher_rows, world) if teacher_rows is not None else None
        if rank == 0:
            self._report(trainer, epoch, rows, teacher_rows, time.perf_counter() - started)

    def _report(self, trainer, epoch: int, rows: list[AnswerFigures], teacher_rows: list[AnswerFigures] | None, seconds: float) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        figures = summarize(rows)
        metrics = {f"val/{k}": v for k, v in figures.items()}
        metrics["time/val_s"] = seconds
        lines = [{"epoch": epoch, "who": "policy", **figures}]
        if teacher_rows is not None:
            teacher = summarize(teacher_rows)
            metrics.update({f"val_teacher/{k}": v for k, v in teacher.items()})
            lines.append({"epoch": epoch, "who": "teacher", **teacher})
            write_jsonl_atomic(self.out / "teacher.jsonl", [r.__dict__ for r in teacher_rows])
        write_jsonl_atomic(self.out / f"epoch_{epoch:03d}.jsonl", [{"epoch": epoch, **r.__dict__} for r in rows])
        metrics["epoch"] = epoch
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger" and self.table_rows:
                self._wandb_table(logger, epoch, rows)
        # The summary last: it marks the validation done (epoch -1 is not redone on a resume). It
        # is rewritten whole with the epoch's rows replaced, so an epoch validated again after a
        # kill before its checkpoint leaves no repeated line.
        summary = self.out / "summary.jsonl"
        kept = [row for row in read_jsonl(summary) if row.get("epoch") != epoch]
        write_jsonl_atomic(summary, kept + lines)
        shown = ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.3f}" for k, v in figures.items())
        if "principle_rate" not in figures:
            shown += f", principle_rate: {NO_CHECK_NOTE}"
        log.info("validation after epoch %d: %s", epoch, shown)

    def _wandb_table(self, logger, epoch: int, rows: list[AnswerFigures]) -> None:
        import wandb

        columns = ["epoch", "prompt", "answer", "passes", "nll_w", "kl_pi_hat_exact", "repetition", "tokens", "truncated"]
        data = [[epoch, r.prompt, r.answer, r.passes, r.nll_w, r.kl_pi_hat, r.repetition, r.tokens, r.truncated] for r in rows[: self.table_rows]]
        logger.experiment.log({"validation/answers": wandb.Table(columns=columns, data=data)})


@contextlib.contextmanager
def _teacher(guide: GuideScorer, policy):
    """(pi_w as a model that can generate, how it is prompted): the base given the principle, or
    the aligned model given the plain prompt."""
    if isinstance(guide, PrincipleGuide):
        prompts_of = guide.winner_prompt_ids
        model = guide.model
    else:
        prompts_of = lambda p: p.input_ids  # noqa: E731
        model = guide.winner
    if isinstance(model, AdapterDisabled):  # LoRA: the policy's own base, adapter off
        peft_model = _peft_of(policy)
        with peft_model.disable_adapter():
            yield policy, prompts_of
    else:
        yield model, prompts_of


def _is_lesser_guide(policy, lesser) -> bool:
    """Whether the untrained policy computes pi_l's logits: a LoRA policy's base is pi_l itself
    (its adapter is zero before training); a frozen copy is, when it has the policy's dtype."""
    if isinstance(lesser, AdapterDisabled):
        return True
    return next(policy.parameters()).dtype == next(lesser.parameters()).dtype


def _peft_of(module):
    while not hasattr(module, "disable_adapter") and hasattr(module, "module"):
        module = module.module
    return module


def _gather(rows, world: int):
    if world == 1 or not dist.is_initialized():
        return rows
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def read_summary(run_dir: str | Path) -> list[dict]:
    """validation/summary.jsonl: one row per validation (epoch, who = policy | teacher, figures);
    a resumed run's repeated epoch keeps its last row."""
    path = Path(run_dir) / VALIDATION_DIR / "summary.jsonl"
    if not path.exists():
        return []
    rows: dict[tuple, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        for old, new in LEGACY_NAMES.items():
            if old in row:
                row.setdefault(new, row.pop(old))
        rows[(row["epoch"], row["who"])] = row
    for row in rows.values():
        if "answers" not in row:  # runs from before the count was written: count the answer files
            answers = path.parent / ("teacher.jsonl" if row["who"] == "teacher" else f"epoch_{row['epoch']:03d}.jsonl")
            if answers.exists():
                row["answers"] = sum(1 for line in answers.read_text(encoding="utf-8").splitlines() if line.strip())
    return sorted(rows.values(), key=lambda r: (r["epoch"], r["who"]))
