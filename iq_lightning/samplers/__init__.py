"""Sampling backends behind one interface; `build_sampler` picks one by name."""

from __future__ import annotations

from typing import Callable

from transformers import PreTrainedTokenizerBase

from iq_lightning.config import SamplerSpec
from iq_lightning.samplers.base import Generation, NonFiniteSampling, Sampler, SamplingParams, cut_at_eos, request_seed


def eos_ids(tokenizer: PreTrainedTokenizerBase, generation_eos) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (which may list several)."""
    ids = {tokenizer.eos_token_id}
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(generation_eos)
    return sorted(i for i in ids if i is not None)


def _hf(spec: SamplerSpec, tokenizer, eos, show_progress, synced_gpus: bool = False, gather_whole_up_to: int = 0, **_) -> Sampler:
    from iq_lightning.samplers.hf import HFSampler

    return HFSampler(
        spec.batch_size, eos, tokenizer.pad_token_id, show_progress=show_progress, synced_gpus=synced_gpus, gather_whole_up_to=gather_whole_up_to
    )


def _vllm(spec: SamplerSpec, tokenizer, eos, show_progress, synced_gpus: bool = False, gather_whole_up_to: int = 0, **kwargs) -> Sampler:
    from iq_lightning.samplers.vllm import VLLMSampler

    return VLLMSampler.from_spec(spec, tokenizer=tokenizer, eos_token_ids=eos, show_progress=show_progress, **kwargs)


BACKENDS: dict[str, Callable[..., Sampler]] = {"hf": _hf, "vllm": _vllm}


def build_sampler(spec: SamplerSpec, tokenizer, eos: list[int], show_progress: bool = True, **kwargs) -> Sampler:
    return BACKENDS[spec.backend](spec, tokenizer, eos, show_progress, **kwargs)


__all__ = ["Generation", "NonFiniteSampling", "Sampler", "SamplingParams", "build_sampler", "cut_at_eos", "eos_ids", "request_seed"]
