"""Responses of any model (or a run's `final/`) for a prompt set, written to JSONL: the raw
material for comparing models (before/after training, Prompting baseline, alpha sweeps)."""

from __future__ import annotations

import json
import logging

import torch
from dataclasses import asdict, dataclass
from pathlib import Path

from iq_lightning.config import DataSpec, DecodingSpec, ModelSpec, SamplerSpec, validate_decoding
from iq_lightning.data import EncodedPrompt, encode_prompt, fit_context, prepare_prompts
from iq_lightning.errors import ConfigError
from iq_lightning.guides import with_principle
from iq_lightning.models import FINAL_DIR, load_model
from iq_lightning.samplers import SamplingParams, build_sampler, eos_ids
from iq_lightning.text_quality import decode_whole

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateSpec:
    model: ModelSpec
    data: DataSpec
    sampler: SamplerSpec
    output: Path
    seed: int = 0
    principle: str | None = None
    placement: str = "system"
    name: str | None = None
    decoding: DecodingSpec = DecodingSpec()  # num_beams > 1: beam search (samplers/beam.py) instead of the sampler


def model_spec_for(run_dir: str | None, model_path: str | None, fallback: ModelSpec) -> ModelSpec:
    """`run_dir` (its final/) or `model_path` (any save_pretrained directory) or the model group."""
    if run_dir and model_path:
        raise ConfigError("give run_dir or model_path, not both")
    if run_dir:
        final = Path(run_dir) / FINAL_DIR
        # A LoRA run's final/ holds the adapter; its merged model sits in final/merged.
        for candidate in (final, final / "merged"):
            if (candidate / "config.json").is_file():
                return ModelSpec(source="pretrained", name_or_path=str(candidate), dtype=fallback.dtype)
        hint = " (a LoRA run without model.lora.merge_on_export?)" if (final / "adapter_config.json").exists() else " (did the run finish?)"
        raise ConfigError(f"run_dir={run_dir} has no loadable model at {final}{hint}")
    if model_path:
        if not Path(model_path).exists():
            raise ConfigError(f"model_path={model_path}: no such directory")
        return ModelSpec(source="pretrained", name_or_path=str(model_path), dtype=fallback.dtype)
    return fallback


def validate_generate(spec: GenerateSpec) -> GenerateSpec:
    """The same checks as training's, for the parts generation uses."""
    from iq_lightning.config import MODEL_SOURCES, PLACEMENTS

    if spec.model.source not in MODEL_SOURCES:
        raise ConfigError(f"model.source must be one of {', '.join(MODEL_SOURCES)}, got {spec.model.source!r}")
    if spec.placement not in PLACEMENTS:
        raise ConfigError(f"placement must be system or user, got {spec.placement!r}")
    d: DataSpec = spec.data
    if d.source == "local" and not (d.path and Path(d.path).is_file()):
        raise ConfigError(f"data.path={d.path}: no such file")
    validate_decoding(spec.decoding, spec.sampler.backend)
    return spec


def build_decoder(spec: GenerateSpec, tokenizer, eos: list[int], show_progress: bool):
    """The sampler of `spec.sampler`, or beam search when `spec.decoding.num_beams` > 1."""
    if spec.decoding.beam_search:
        from iq_lightning.samplers.beam import BeamSearch

        return BeamSearch(spec.decoding, spec.sampler.batch_size, eos, tokenizer.pad_token_id, show_progress=show_progress)
    return build_sampler(spec.sampler, tokenizer, eos, show_progress=show_progress, model_spec=spec.model, seed=spec.seed)


def generate_responses(spec: GenerateSpec, show_progress: bool = True) -> Path:
    validate_generate(spec)
    model, tokenizer = load_model(spec.model)
    if torch.cuda.is_available():
        model.to("cuda")
    prompts, stats = prepare_prompts(spec.data, tokenizer)
    if spec.principle:
        # The Prompting baseline: the principle in the prompt at inference time.
        prompts = [
            EncodedPrompt(p.prompt, tuple(encode_prompt(tokenizer, with_principle(p.prompt.messages, spec.principle, spec.placement))))
            for p in prompts
        ]
    positions = getattr(model.config, "max_position_embeddings", None) or 2048
    limits = {"model max_position_embeddings": positions}
    if spec.sampler.backend == "vllm":
        from iq_lightning.samplers.vllm import max_model_len

        limits["vLLM max_model_len"] = max_model_len(spec.sampler.options, positions)
    prompts = fit_context(prompts, limits, spec.sampler.max_new_tokens, stats)
    log.info("prompts: %s", stats.describe())
    eos = eos_ids(tokenizer, model.generation_config.eos_token_id)
    sampler = build_decoder(spec, tokenizer, eos, show_progress)
    params = SamplingParams(spec.sampler.max_new_tokens, spec.sampler.temperature, spec.sampler.top_p, spec.seed)
    desc = f"beam search ({spec.decoding.num_beams} beams)" if spec.decoding.beam_search else "generating"
    try:
        generations = sampler.generate(model, [p.input_ids for p in prompts], params, desc=desc)
    finally:
        sampler.close()
    spec.output.parent.mkdir(parents=True, exist_ok=True)
    name = spec.name or spec.model.name_or_path
    with spec.output.open("w", encoding="utf-8") as handle:
        for p, g in zip(prompts, generations):
            row = {
                "id": p.prompt.id,
                "category": p.prompt.category,
                "messages": list(p.prompt.messages),
                "model": name,
                "principle": spec.principle,
                "response": decode_whole(tokenizer, g.response_ids),
                "finished": g.finished,
                "num_tokens": len(g.response_ids),
            }
            if spec.decoding.beam_search:  # (rows of the default decoding stay as they were)
                row["decoding"] = asdict(spec.decoding)
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    log.debug("wrote %d responses to %s", len(generations), spec.output)  # callers name the final file
    return spec.output
