"""The training recipe: build every component from a RunConfig, fit, export `final/`.

Reads top to bottom: load models -> guides -> prompts -> sampler -> module, datamodule,
trainer -> fit (resuming after the last completed epoch) -> export.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import random
import typing
from typing import Sequence
import uuid
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import transformers
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from transformers import PreTrainedTokenizerBase

from iq_lightning.callbacks import CreditMaps, EpochCheckpoint, EpochPolicyExport, epoch_checkpoints
from iq_lightning.callbacks import last_checkpoint as last_checkpoint_in
from iq_lightning.config import LoggerSpec, RunConfig, as_plain, build_run_config, principle_placements, principle_weights
from iq_lightning.data import encode_prompt, fit_context, keep_pairs, prepare_prompts
from iq_lightning.datamodule import OnPolicyDataModule
from iq_lightning.epoch_summary import EpochSummary
from iq_lightning.errors import ConfigError, Stopped, UserError
from iq_lightning.guides import build_guide, with_principle
from iq_lightning.memory_plan import MemoryPlan, architecture_of, device_capacity, plan_memory, world_size_of
from iq_lightning.models import FINAL_DIR, export_policy, generation_eos, load_tokenizer
from iq_lightning.callbacks import resumable_checkpoint
from iq_lightning.module import InverseQModule
from iq_lightning.objectives import build_objective, resolve_and_check
from iq_lightning.out_of_memory import StopOnOutOfMemory, budgets_from_plan
from iq_lightning.principle_check import build_check
from iq_lightning.rank_models import RankModels
from iq_lightning.files import RUN_CONFIG_FILE, RunDirectoryLock, write_atomically
from iq_lightning.samplers import SamplingParams, build_sampler, eos_ids
from iq_lightning.strategies import refuse_host_guides, sharding_for, trainer_kwargs
from iq_lightning.throughput import ModelFlops
from iq_lightning.tracking import RunTracking, wandb_init_kwargs
from iq_lightning.validation import Validation
from iq_lightning.validation_cache import AnswerCache, device_identity, weights_identity

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
ROLLOUT_DIR = "rollouts"


@dataclass
class TrainResult:
    run_dir: Path
    module: InverseQModule
    datamodule: OnPolicyDataModule
    trainer: L.Trainer
    final_dir: Path | None


def check_principle_prompt(tokenizer: PreTrainedTokenizerBase, principle: str, placement: str, prompt) -> None:
    """Render one x_w now: a chat template that rejects the placement fails here, not after an
    epoch of sampling."""
    try:
        encode_prompt(tokenizer, with_principle(prompt.prompt.messages, principle, placement))
    except Exception as exc:
        raise ConfigError(
            f"the chat template cannot render the principle with guide.placement={placement} ({exc}); "
            f"try guide.placement={'user' if placement == 'system' else 'system'}"
        ) from None


def context_limits(run: RunConfig) -> dict[str, int]:
    """The token limits a prompt plus its response must fit, by name: the policy's positions, an
    aligned guide's, and with sampler=vllm (the engine answers training's and validation's prompts)
    vLLM's max_model_len.
    Read from the config alone, as the memory plan does: weights load later, per rank."""
    from iq_lightning.memory_plan import architecture_of
    from iq_lightning.samplers.vllm import max_model_len

    positions = architecture_of(run.model).max_position_embeddings
    limits = {"model max_position_embeddings": positions}
    if run.guide.kind == "aligned_model":
        limits["guide.model max_position_embeddings"] = architecture_of(run.guide.model, "guide.model").max_position_embeddings
    if run.sampler.backend == "vllm":
        limits["vLLM max_model_len"] = max_model_len(run.sampler.options, positions)
    return limits


def principle_prompt_length(run: RunConfig, tokenizer: PreTrainedTokenizerBase):
    """len(x_w) of a prompt, as PrincipleGuide encodes it (the longest of several principles');
    None where the guide reads the plain prompt."""
    g = run.guide
    if g.kind != "principle":
        return None
    placed = list(zip(principle_weights(g, run.train.alpha)[0], principle_placements(g)))
    return lambda p: max(len(encode_prompt(tokenizer, with_principle(p.prompt.messages, text, where))) for text, where in placed)


def build_loggers(spec: LoggerSpec, run_dir: Path, wandb_init: dict | None = None) -> list:
    """csv: metrics.csv in the run directory; wandb: W&B (offline by default) plus that CSV."""
    from iq_lightning.logging_csv import ResumableCSVLogger

    if spec.kind == "none":
        return []
    csv_logger = ResumableCSVLogger(save_dir=str(run_dir))
    loggers = [csv_logger]
    if spec.kind == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("logger=wandb needs wandb: pip install wandb (or use logger=csv)")
        from iq_lightning.logging_csv import logged_max_step
        from iq_lightning.tracking import WandbLogger

        # One W&B run per run directory: a resumed run continues the same W&B run.
        id_file = run_dir / "wandb_run_id"
        if not id_file.exists():
            write_atomically(id_file, uuid.uuid4().hex[:12])
        loggers.insert(
            0,
            WandbLogger(
                resume_step=logged_max_step(csv_logger.metrics_file),
                project=spec.project,
                name=spec.name or run_dir.name,
                entity=spec.entity,
                save_dir=str(run_dir),
                offline=spec.mode == "offline",
                mode=spec.mode,
                id=id_file.read_text().strip(),
                resume="allow",
                **(wandb_init or {}),
            ),
        )
    return loggers


def drop_checkpoints(run_dir: Path) -> None:
    """keep_checkpoint=false: once final/ is written the checkpoint (weights plus optimizer state,
    about 3x final/) is only needed to extend the run, so it goes."""
    import shutil

    directory = run_dir / CHECKPOINT_DIR
    doomed = run_dir / f"{CHECKPOINT_DIR}.deleted"
    if directory.is_dir():
        # One rename first: a kill during the (long, sharded: many files) deletion leaves no half
        # checkpoint under the name a restart reads.
        os.replace(directory, doomed)
        log.info("deleted %s (keep_checkpoint=false): this run can no longer be extended", directory)
    if doomed.is_dir():
        shutil.rmtree(doomed)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of the run (a file, or a directory for the sharded strategies)."""
    return last_checkpoint_in(run_dir / CHECKPOINT_DIR)


FINGERPRINT_FILE = "run_fingerprint.json"

# The restart check compares the whole resolved config (keys as on the command line: `lr`, not
# `train.lr`) except these, which may change when a run is continued. Everything else shapes the
# samples, the targets, the weights or the optimizer state a checkpoint holds, and a restart with
# another value would silently mix two runs (or die on a state_dict mismatch).
RESTART_MAY_CHANGE = (
    "epochs",  # continue a finished run for more epochs
    "dry_run",
    "save_final",  # what is written, not what is trained
    "keep_checkpoint",
    "save_epoch_policies",
    "credit_maps_per_epoch",
    "rollout_table_rows",
    "logger.*",  # where metrics go, and how progress is shown
    "val.table_rows",
    "val.batch_size",  # speed and memory only
    "val.cache",
    "val.cache_dir",
    "sampler.batch_size",
    # the vLLM engine's memory and speed; not max_model_len (which prompts fit), dtype or engine_kwargs
    "sampler.options.gpu_memory_utilization",
    "sampler.options.kv_cache_gib",
    "sampler.options.enable_sleep_mode",
    "sampler.options.enforce_eager",
    "sampler.options.max_num_batched_tokens",
    "guide.batch_size",
    "guide.device",
    "model.gradient_checkpointing",
    "model.gguf_cache",  # where the converted GGUF is kept: the same weights either way
    "model.architecture.*",  # the memory plan's sizes, when config.json is not local
    "model.lora.merge_on_export",
    "strategy.device_memory_gib",
    "nonfinite_skips",  # an allowance: raising it lets a stopped run continue
    "numerics",  # which CPU kernels round the floats: the same run, continued elsewhere (numerics.json says)
)


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def restart_settings(run: RunConfig) -> dict:
    """The resolved config, flat and JSON-plain, less `run_dir` and the keys that may change."""
    plain = as_plain(run)
    plain.pop("run_dir")
    plain.update(plain.pop("train"))  # train keys are top-level on the command line
    return {key: value for key, value in _flat(plain).items() if not _may_change(key)}


def _may_change(key: str) -> bool:
    for pattern in RESTART_MAY_CHANGE:
        group = pattern.removesuffix(".*")
        if key == group or (group != pattern and key.startswith(group + ".")):
            return True
    return False


def _legacy_fingerprint(run: RunConfig) -> dict:
    """The fingerprint of runs started before the whole config was compared."""
    return {
        "model": run.model.name_or_path,
        "lora": run.model.lora.enabled,
        "alpha": run.train.alpha,
        "guide": [run.guide.kind, run.guide.principle, run.guide.placement],
        "sampler": [run.sampler.max_new_tokens, run.sampler.temperature, run.sampler.top_p],
        "samples_per_epoch": run.train.samples_per_epoch,
        "seed": run.train.seed,
        "data": [run.data.source, run.data.path, run.data.split],
    }


def declared_default(key: str):
    """The default a RunConfig field declares for a flat restart key (train keys are top-level),
    or a sentinel when it declares none. A key added to the config after a run started is absent
    from that run's record; the run behaved as that default, so it may resume with it."""
    none = object()
    if key.startswith("sampler.options."):  # compared since the vLLM engine's defaults were named
        from iq_lightning.samplers.vllm import DEFAULT_OPTIONS

        return DEFAULT_OPTIONS.get(key.removeprefix("sampler.options."), none)
    parts = key.split(".")
    cls = RunConfig
    if parts[0] not in {f.name for f in dataclasses.fields(RunConfig)}:
        parts = ["train", *parts]
    for i, name in enumerate(parts):
        field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
        if field is None:
            return none
        hint = typing.get_type_hints(cls)[name]
        if dataclasses.is_dataclass(hint) and i + 1 < len(parts):
            cls = hint
            continue
        if i + 1 < len(parts):
            return none
        if field.default is not dataclasses.MISSING:
            return json.loads(json.dumps(field.default, default=str))
        return none
    return none


def check_resumable(run: RunConfig) -> None:
    """A restart in an existing run directory must continue the same run: refuse one whose
    settings changed, naming every key with its old and new value, rather than silently training
    on targets computed for other settings. Nothing is written here: `RunStarted` records the
    settings once the run has really started, so a run that stopped on a mistake (a malformed
    data file, a model that did not load) accepts the corrected command."""
    path = run.run_dir / FINGERPRINT_FILE
    if not path.exists():
        return
    try:
        stored = json.loads(path.read_text())
    except ValueError:
        log.warning("%s does not parse (cut short?): the run's settings are recorded again", path)
        return
    if "settings" in stored:
        old, new = stored["settings"], restart_settings(run)
    else:
        old, new = stored, json.loads(json.dumps(_legacy_fingerprint(run)))
    missing = object()
    changed = sorted(
        k for k in set(old) | set(new)
        if old.get(k, missing) != new.get(k, missing) and not (k not in old and new[k] == declared_default(k))
    )
    if changed:
        def show(settings, key):
            return json.dumps(settings[key]) if key in settings else "(unset)"

        differences = "; ".join(f"{k}: {show(old, k)} -> {show(new, k)}" for k in changed)
        raise ConfigError(
            f"{run.run_dir} holds a run with other settings ({differences}); rerun with the old values to resume, "
            "or start a new run directory (hydra.run.dir=...)"
        )
    found = epoch_checkpoints(run.run_dir / CHECKPOINT_DIR)
    done = found[-1][0] + 1 if found else 0
    if run.train.epochs < done:
        raise ConfigError(f"{run.run_dir} holds a run with {done} epochs done; epochs must be >= {done} (got epochs={run.train.epochs})")


def settings_record(run: RunConfig) -> str:
    """The resolved config as YAML, keys as on the command line (`alpha`, not `train.alpha`)."""
    from omegaconf import OmegaConf

    plain = as_plain(run)
    plain.pop("run_dir")  # the directory may be moved; the record stays true
    plain.update(plain.pop("train"))
    return OmegaConf.to_yaml(plain)


class RunStarted(Callback):
    """Writes the run's records once models are loaded and before the first sample: the restart
    settings, and config.yaml, what evaluation reads back. Only a run the restart check accepted
    gets here, so neither ever holds a refused command's values (Hydra's own `.hydra/`, written
    before any check, is switched off in conf/train.yaml)."""

    def __init__(self, run: RunConfig, overrides: Sequence[str] | None = None):
        self.path = run.run_dir / FINGERPRINT_FILE
        self.config_path = run.run_dir / RUN_CONFIG_FILE
        self.settings = restart_settings(run)
        self.record = settings_record(run)
        # The command line's overrides (one sweep job's own): what set this run apart.
        self.overrides = None if overrides is None else "".join(f"- {json.dumps(o)}\n" for o in overrides) or "[]\n"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            write_atomically(self.path, json.dumps({"settings": self.settings}, indent=1))
            write_atomically(self.config_path, self.record)
            if self.overrides is not None:
                write_atomically(self.path.parent / OVERRIDES_FILE, self.overrides)
            record_numerics(self.path.parent / NUMERICS_FILE)


NUMERICS_FILE = "numerics.json"
OVERRIDES_FILE = "overrides.yaml"


def record_numerics(path: Path) -> None:
    """The kernels the run started with (numerics.identity), written once; a restart whose kernels
    differ continues the same run, but not bit for bit what the first machine would have given."""
    from iq_lightning.numerics import identity

    now = identity()
    if path.exists():
        started = json.loads(path.read_text())
        changed = {k: (started.get(k), v) for k, v in now.items() if started.get(k) != v and k != "threads"}
        if changed:
            log.warning(
                "this run started with other CPU kernels (%s): it continues, but its results are no longer bitwise those of "
                "an uninterrupted run on the first machine (numerics=portable makes x86-64 machines agree)",
                ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()),
            )
        return
    write_atomically(path, json.dumps(now, indent=1))


def held_out_prompts(run: RunConfig, tokenizer: PreTrainedTokenizerBase, training: list) -> tuple[list, list]:
    """(`val.prompts` held-out prompts in a seeded order, the training prompts left).

    The data's `val.split` when it has one apart from training; a source without splits (local
    rows with no `split` column) gives the training prompts back, and then `val.prompts` of them
    are held out of training instead, as the log says."""
    spec = dataclasses.replace(run.data, split=run.val.split, limit=None)
    try:
        prompts, _ = prepare_prompts(spec, tokenizer)
    except UserError as exc:
        raise ConfigError(f"val: no held-out prompts in split {run.val.split!r} ({exc}); set val.split, or val.every_n_epochs=0") from None
    trained = {p.prompt.id for p in training}
    overlap = {p.prompt.id for p in prompts} & trained
    random.Random(run.train.seed).shuffle(prompts)
    if not overlap:
        return prompts[: run.val.prompts], training
    # A small file gives up at most half its prompts: 2 rows train on one and validate on the other.
    count = min(run.val.prompts, len(training) // 2)
    if overlap != trained or count < 1:
        raise ConfigError(
            f"val: {len(overlap)} of the prompts in split {run.val.split!r} are also training prompts; give the "
            "data a split column (train/test), set val.split, or val.every_n_epochs=0"
        )
    held = {p.prompt.id for p in prompts[:count]}
    fewer = f" (val.prompts={run.val.prompts}: at most half the prompts are held out)" if count < run.val.prompts else ""
    log.warning("data has no %r split apart from training: %d of its %d prompts held out of training for validation%s", run.val.split, len(held), len(training), fewer)
    return [p for p in prompts if p.prompt.id in held], [p for p in training if p.prompt.id not in held]


def build_validation(
    run: RunConfig, tokenizer, held_out: list, eos: list[int], sharded: bool, gather_whole_up_to: int = 0, show_progress: bool = False, engine=None
) -> Validation:
    """`engine`: the run's sampler where it is an engine holding the policy's weights (vLLM)."""
    v = run.val
    return Validation(
        run.run_dir,
        held_out,
        tokenizer,
        build_check(v.check, principle_weights(run.guide, run.train.alpha)[0][0]),
        alpha=principle_weights(run.guide, run.train.alpha)[1],
        every_n_epochs=v.every_n_epochs,
        max_new_tokens=v.max_new_tokens or run.sampler.max_new_tokens,
        temperature=v.temperature,
        top_p=v.top_p,
        batch_size=v.batch_size,
        eos_ids=eos,
        seed=run.train.seed,
        sharded=sharded,
        table_rows=v.table_rows,
        gather_whole_up_to=gather_whole_up_to,
        show_progress=show_progress,
        cache=AnswerCache(v.cache_dir, answer_context(run)) if v.cache else None,
        answerers=frozen_answerers(run),
        engine=engine,
    )


def answer_context(run: RunConfig) -> dict:
    """What decides every validation answer's arithmetic besides the model and the prompts."""
    s = run.strategy
    on_gpu = s.accelerator in ("gpu", "cuda") or (s.accelerator == "auto" and torch.cuda.is_available())
    return {
        "precision": str(run.train.precision),
        "strategy": s.strategy,
        **device_identity(on_gpu),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def frozen_answerers(run: RunConfig) -> dict[str, dict]:
    """The weights of validation's frozen answerers: the untrained policy, and the teacher (the
    base given the principle in the guides' dtype, or the aligned model)."""
    g = run.guide
    teacher = g.model if g.kind == "aligned_model" and g.model is not None else run.model
    return {
        "policy": weights_identity(run.model),
        "teacher": {**weights_identity(teacher), "guide_dtype": g.dtype, "guide_device": g.device},
    }


def memory_plan(run: RunConfig) -> MemoryPlan:
    """The per-device memory plan of `run`, from its config alone (memory_plan.py)."""
    world = world_size_of(run.strategy)
    capacity = device_capacity(run.strategy.accelerator, max(1, world // run.strategy.num_nodes), run.strategy.device_memory_gib)
    return plan_memory(run, world, capacity, run.strategy.accelerator)


def whole_gather_budget(plan: MemoryPlan, phase: str) -> int:
    """Bytes a sharded model gathered whole for generate may take during `phase`: the plan's
    headroom there (0, never, when the device's memory is unknown). See sharded.ready_for_generate."""
    if plan.capacity_bytes is None:
        return 0
    return max(plan.capacity_bytes - plan.phase_bytes(phase), 0)


def describe(run: RunConfig) -> str:
    """The resolved, validated config as YAML."""
    from omegaconf import OmegaConf

    plain = as_plain(run)
    return OmegaConf.to_yaml(plain)


def configure(cfg, run_dir: str | Path) -> RunConfig:
    """The RunConfig a run trains with, from the Hydra config: config.py's checks of everything but
    the objective, then the objective's own (objectives.resolve_and_check: its defaults filled in,
    its options checked). Every mistake is one ConfigError line."""
    return resolve_and_check(build_run_config(cfg, run_dir))


def train(run: RunConfig, show_progress: bool = True, rank: str = "0", overrides: Sequence[str] | None = None) -> TrainResult | None:
    """Fit, export final/; with dry_run only print the config and the memory plan (returns None).

    The run directory is locked for the whole run (one lock per `rank`, the launch's process id
    from cli.launch_rank: a DDP launcher's ranks are processes of their own), and the restart
    check comes first: a refused or concurrent command writes nothing into the directory."""
    run = resolve_and_check(run)  # the objective's defaults and checks (config.py checked the rest)
    refuse_host_guides(run.strategy, run.guide.device)
    plan = memory_plan(run)
    if run.train.dry_run:
        print(describe(run) + "\n" + plan.render())
        return None
    from iq_lightning.numerics import check as check_numerics

    problem = check_numerics(run.train.numerics)
    if problem:
        raise ConfigError(problem)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with RunDirectoryLock(run.run_dir, rank):
        check_resumable(run)
        return _train(run, plan, show_progress, overrides)


def _train(run: RunConfig, plan: MemoryPlan, show_progress: bool, overrides: Sequence[str] | None) -> TrainResult:
    plan.check()  # before anything loads: a run that cannot fit stops now, with the fix
    log.info("memory plan: %.2f GiB per device at the %s peak", plan.total / 2**30, plan.peak_phase())
    run_dir = run.run_dir
    sharding = sharding_for(run.strategy, run.train.precision)
    trainer_args = trainer_kwargs(run.strategy, sharding, run.train.micro_batch_size)
    loggers = build_loggers(run.logger, run_dir, wandb_init_kwargs(run))
    L.seed_everything(run.train.seed, workers=True, verbose=False)

    # Weights are loaded inside fit, per rank (rank_models.py); here only what every rank needs first.
    tokenizer = load_tokenizer(run.model)
    t = run.train
    objective = build_objective(run.objective, t.alpha, t.reduction)
    prompts, stats = prepare_prompts(run.data, tokenizer)
    if objective.plan.given_pairs:
        prompts = keep_pairs(prompts, stats, run.data.source)  # DPO on the data's pairs: only prompts that have one
    if run.guide.kind == "principle":
        for text, where in zip(principle_weights(run.guide, t.alpha)[0], principle_placements(run.guide)):
            check_principle_prompt(tokenizer, text, where, prompts[0])
    winner_length = principle_prompt_length(run, tokenizer)
    prompts = fit_context(prompts, context_limits(run), run.sampler.max_new_tokens, stats, winner_length)
    log.info("prompts (%s): %s", run.data.source, stats.describe())
    held_out = []
    if run.val.every_n_epochs:
        held_out, prompts = held_out_prompts(run, tokenizer, prompts)
        val_new_tokens, key = (run.val.max_new_tokens, "val.max_new_tokens") if run.val.max_new_tokens else (run.sampler.max_new_tokens, "sampler.max_new_tokens")
        held_out = fit_context(held_out, context_limits(run), val_new_tokens, None, winner_length, key, "held-out prompts")
    eos = eos_ids(tokenizer, generation_eos(run.model))
    sampler = build_sampler(
        run.sampler, tokenizer, eos, show_progress=show_progress, model_spec=run.model, seed=run.train.seed, synced_gpus=sharding.sharded,
        gather_whole_up_to=whole_gather_budget(plan, "sampling"),
    )
    models = RankModels(run.model, run.guide, run.train.alpha, tokenizer, sharding, show_progress)
    # After every completed epoch (only the newest is kept): what a restart resumes from.
    checkpoint = EpochCheckpoint(run_dir / CHECKPOINT_DIR)

    module = InverseQModule(
        None,
        None,
        lr=t.lr,
        beta=t.beta,
        reduction=t.reduction,
        weight_decay=t.weight_decay,
        guide_device=run.guide.device,
        models=models,
        nonfinite_skips=t.nonfinite_skips,
        objective=objective,
        flops=ModelFlops.of(architecture_of(run.model)),
    )
    datamodule = OnPolicyDataModule(
        prompts,
        sampler,
        tokenizer,
        rollout_dir=run_dir / ROLLOUT_DIR,
        samples_per_epoch=t.samples_per_epoch,
        micro_batch_size=t.micro_batch_size,
        sampling=SamplingParams(run.sampler.max_new_tokens, run.sampler.temperature, run.sampler.top_p, t.seed),
        passes_per_epoch=t.passes_per_epoch,
        seed=t.seed,
        plan=objective.plan,
        alpha_warmup_epochs=t.alpha_warmup_epochs,
        before_epoch=checkpoint.commit,
    )
    callbacks = [RunStarted(run, overrides), checkpoint, RunTracking(run, datamodule.rollout_path, tokenizer, t.rollout_table_rows)]
    if run.val.every_n_epochs:
        engine = sampler if run.sampler.backend == "vllm" else None
        callbacks.append(build_validation(run, tokenizer, held_out, eos, sharding.sharded, whole_gather_budget(plan, "validation"), show_progress, engine))
    if t.credit_maps_per_epoch:
        callbacks.append(CreditMaps(run_dir, datamodule.rollout_path, tokenizer, t.credit_maps_per_epoch, t.beta, alpha=t.alpha if run.guide.principles is None else None))
    if t.save_epoch_policies:
        callbacks.append(EpochPolicyExport(run_dir, tokenizer))
    # Last: it ends the run (raises) on an out-of-memory error, after the others' on_exception.
    callbacks.append(StopOnOutOfMemory(budgets_from_plan(plan), plan.capacity_bytes / 2**30 if plan.capacity_bytes else None))
    trainer = L.Trainer(
        **trainer_args,
        precision=t.precision,
        max_epochs=t.epochs,
        logger=[*loggers, EpochSummary(t.epochs)],  # one log line per epoch, whatever else logs
        callbacks=callbacks,
        reload_dataloaders_every_n_epochs=1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.max_grad_norm,
        default_root_dir=str(run_dir),
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
        use_distributed_sampler=False,
        enable_model_summary=False,
        enable_progress_bar=show_progress,
    )
    resume = resumable_checkpoint(run_dir / CHECKPOINT_DIR)
    if resume is None and (run_dir / FINAL_DIR).exists():
        raise ConfigError(
            f"{run_dir} holds a finished run whose checkpoint was deleted (keep_checkpoint=false): it cannot be extended; "
            "start a new run directory (hydra.run.dir=...), or train from its final/ policy"
        )
    if resume is not None:
        log.info("resuming from %s", resume)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    except SIGTERMException:  # Lightning's own SystemExit, without a code: exit 0 before
        found = epoch_checkpoints(run_dir / CHECKPOINT_DIR)
        done = found[-1][0] + 1 if found else 0
        raise Stopped(
            f"stopped by SIGTERM with {done} of {t.epochs} epochs done, before final/ was written; "
            + (f"{found[-1][1].name} is kept" if found else "no epoch had finished")
            + ", and the same command resumes from there"
        ) from None

    if trainer.is_global_zero:
        from iq_lightning.validation_plots import plot_training, plot_validation

        for what, plot in (("training", plot_training(run_dir)), ("validation", plot_validation(run_dir) if run.val.every_n_epochs else None)):
            if plot is not None:
                log.info("%s curves: %s", what, plot)
    final_dir = None
    if t.save_final:
        # Every rank takes part: a sharded policy is gathered collectively; rank zero writes.
        out = export_policy(
            module.policy, tokenizer, run_dir / FINAL_DIR, merge=run.model.lora.merge_on_export, is_writer=trainer.is_global_zero
        )
        if trainer.is_global_zero:
            final_dir = out
            log.info("exported the trained policy to %s", final_dir)
            if not t.keep_checkpoint:
                drop_checkpoints(run_dir)
    for logger in loggers:
        if hasattr(logger, "experiment") and type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()
    return TrainResult(run_dir, module, datamodule, trainer, final_dir)
