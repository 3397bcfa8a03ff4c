"""Contestants' answers for the evaluation prompts, cached on disk: judging again, or with more
contestants, costs no generation. A cache file is named by a hash of everything that decides
its answers (model weights' identity, principle, prompts, sampling, decoding), so a changed setting
writes a new file instead of silently reusing a stale one. The answers are also kept in the
machine's answer cache (`answer_cache_dir`, validation_cache.py, shared with training's
validation), with the torch and transformers versions and the device in the key, so another
evaluation, in another out_dir, decodes none of the answers this one has."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers

from iq_lightning.analysis import safe_filename
from iq_lightning.config import ModelSpec
from iq_lightning.errors import ConfigError
from iq_lightning.files import fsync_file, read_jsonl, run_config_path, write_jsonl_atomic
from iq_lightning.evaluation.spec import ContestantSpec, EvalSpec
from iq_lightning.evaluation.trained import FINGERPRINT_FILE, read_trained
from iq_lightning.generation import GenerateSpec, generate_responses, model_spec_for
from iq_lightning.validation_cache import AnswerCache, device_identity, weights_identity

log = logging.getLogger(__name__)


def sweep_contestants(sweep_dir: str | Path) -> list[ContestantSpec]:
    """Every finished run of a Hydra multirun directory, named and ordered by the alpha it was
    trained with: read from the run's own record (trained.py), never from .hydra/config.yaml,
    which a refused restart rewrites with the alpha it was refused for."""
    found = []
    for run in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
        if not (run / "final").is_dir():
            continue
        record = read_trained(run)
        if record is None:
            log.warning("sweep_dir: %s has final/ but no %s, so its alpha is unknown: left out", run, FINGERPRINT_FILE)
            continue
        found.append(ContestantSpec(name=f"alpha={record.alpha:g}", run_dir=str(run), alpha=record.alpha))
    if not found:
        raise ConfigError(f"sweep_dir={sweep_dir} holds no finished runs (subdirectories with {FINGERPRINT_FILE} and final/)")
    names = [c.name for c in found]
    if len(set(names)) != len(names):  # a sweep over more than alpha: keep the runs apart
        found = [replace(c, name=f"{c.name} ({Path(c.run_dir).name})") for c in found]
    return sorted(found, key=lambda c: (c.alpha, c.name))


def beam_sweep_contestants(spec: EvalSpec) -> list[ContestantSpec]:
    """`beam_sweep`'s contestant decoded with each of its numbers of beams, in increasing order:
    the contestant itself for its own num_beams, else a copy named <name>@beams=k (every other
    setting, the length penalty included, kept). [] without a beam sweep."""
    sweep = spec.beam_sweep
    if sweep.contestant is None:
        return []
    base = next(c for c in spec.contestants if c.name == sweep.contestant)
    return [
        base if k == base.decoding.num_beams else replace(base, name=f"{base.name}@beams={k}", decoding=replace(base.decoding, num_beams=k))
        for k in sorted(sweep.num_beams)
    ]


def contestant_model(contestant: ContestantSpec, base: ModelSpec) -> ModelSpec:
    return model_spec_for(contestant.run_dir, contestant.model_path, base)


def generation_material(spec: EvalSpec, contestant: ContestantSpec) -> dict:
    """Everything that decides a contestant's answers (generation_key hashes it)."""
    model = contestant_model(contestant, spec.model)
    decided_by = {
        **weights_identity(model),
        "principle": contestant.principle,
        "placement": contestant.placement if contestant.principle else None,
        "data": asdict(spec.data),
        "sampler": {k: v for k, v in asdict(spec.sampler).items() if k != "batch_size"},
        "seed": spec.seed,
    }
    if contestant.decoding.beam_search:  # the default decoding leaves the key (and the caches) as they were
        decided_by["decoding"] = asdict(contestant.decoding)
    return decided_by


def generation_key(spec: EvalSpec, contestant: ContestantSpec) -> str:
    return hashlib.sha256(json.dumps(generation_material(spec, contestant), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _machine_wide(spec: EvalSpec) -> dict:
    """What the out_dir's own key could leave out and a machine-wide one cannot: the batch size
    (left padding moves greedy answers) and a local data file's content (edited in place)."""
    extra: dict = {"batch_size": spec.sampler.batch_size}
    path = Path(spec.data.path) if spec.data.path else None
    if path is not None and path.is_file():
        extra["data_file"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return extra


def machine_cache(spec: EvalSpec) -> AnswerCache | None:
    """The answer cache shared across evaluations and runs (None: answer_cache_dir=null)."""
    if not spec.answer_cache_dir:
        return None
    context = {"torch": torch.__version__, "transformers": transformers.__version__, **device_identity(on_gpu=True), "of": "evaluation"}
    return AnswerCache(spec.answer_cache_dir, context)


def answers(spec: EvalSpec, contestant: ContestantSpec, show_progress: bool = True) -> tuple[str, dict[str, dict]]:
    """(cache key, prompt id -> answer row) for one contestant, generating only on a cache miss."""
    key = generation_key(spec, contestant)
    path = spec.out_dir / "generations" / f"{safe_filename(contestant.name)}-{key}.jsonl"
    shared = machine_cache(spec)
    material = shared.material(generation=generation_material(spec, contestant), **_machine_wide(spec)) if shared else None
    shared_key = shared.key_of(material) if shared else None
    kept = shared.load_rows(shared_key) if shared and not path.is_file() else None
    if path.is_file():
        log.info("%s: cached answers %s", contestant.name, path)
    elif kept is not None:
        write_jsonl_atomic(path, [{**row, "model": contestant.name} for row in kept])
        log.info("%s: answers from the machine's answer cache %s (not decoded again)", contestant.name, shared.path(shared_key))
    else:
        partial = path.with_suffix(".partial")  # an interrupted generation is never taken for a cache hit
        generate_responses(
            GenerateSpec(
                model=contestant_model(contestant, spec.model),
                data=spec.data,
                sampler=spec.sampler,
                output=partial,
                seed=spec.seed,
                principle=contestant.principle,
                placement=contestant.placement,
                name=contestant.name,
                decoding=contestant.decoding,
            ),
            show_progress=show_progress,
        )
        fsync_file(partial)  # on disk before it is named a cache hit
        partial.replace(path)
        log.info("%s: answers written to %s", contestant.name, path)
        if shared:
            shared.store_rows(shared_key, read_jsonl(path), material)
    rows = read_jsonl(path)
    return key, {row["id"]: row for row in rows}
