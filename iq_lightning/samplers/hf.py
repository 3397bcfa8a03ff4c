"""Sampling with transformers' `generate`: batched, left-padded, KV cache, seeded."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel

from iq_lightning.forward import shared_prefix_length
from iq_lightning.samplers.base import Generation, Sampler, SamplingParams, cut_at_eos


class HFSampler(Sampler):
    """Reads the policy module directly, so it always samples with the current weights."""

    def __init__(
        self,
        batch_size: int,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        show_progress: bool = True,
        synced_gpus: bool = False,
    ):
        self.batch_size = batch_size
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.show_progress = show_progress
        # ZeRO-3 / FSDP: every rank must run the same number of forward passes (its shards are
        # gathered collectively), so ranks keep stepping until all have finished.
        self.synced_gpus = synced_gpus

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        greedy = params.temperature == 0
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=0 if not greedy else None,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            return_dict_in_generate=True,
            output_scores=True,
        )

    @torch.inference_mode()
    def generate(self, policy: PreTrainedModel, prompts, params: SamplingParams, desc: str = "sampling") -> list[Generation]:
        config = self._generation_config(params)
        device = next(policy.parameters()).device
        was_training = policy.training
        policy.eval()
        # transformers fills every unset field of the passed config from the model's own
        # generation_config.json (repetition_penalty, min_p, no_repeat_ngram_size, ...), which would
        # sample from something other than pi_theta. Swap in a neutral one while generating.
        owner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy  # peft wraps it
        saved_config = owner.generation_config
        owner.generation_config = GenerationConfig(eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id)
        results: list[Generation] = []
        eos = set(self.eos_token_ids)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(params.seed)
                starts = range(0, len(prompts), self.batch_size)
                for start in tqdm(starts, desc=desc, unit="batch", disable=not self.show_progress, leave=False):
                    chunk = prompts[start : start + self.batch_size]
                    results.extend(self._generate_batch(policy, chunk, config, eos, device))
        finally:
            owner.generation_config = saved_config
            policy.train(was_training)
        return results

    def _generate_batch(self, policy, prompts, config, eos, device) -> list[Generation]:
        # Rows are [prefix shared by every prompt, left padding, rest of the prompt]. generate
        # prefills only what the passed cache does not hold, so the prefix (a chat template's
        # system prompt) is computed once, not once per row. ZeRO-3 / FSDP ranks must make the
        # same forward calls whatever their prompts, so there every row prefills it.
        prefix_len = 0 if self.synced_gpus else shared_prefix_length(prompts)
        width = prefix_len + max(len(p) - prefix_len for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, prompt in enumerate(prompts):
            start = width - len(prompt) + prefix_len
            input_ids[i, :prefix_len] = torch.as_tensor(prompt[:prefix_len], dtype=torch.long)
            input_ids[i, start:] = torch.as_tensor(prompt[prefix_len:], dtype=torch.long)
            attention_mask[i, :prefix_len] = 1
            attention_mask[i, start:] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        cache = None
        if prefix_len:
            cache = policy(input_ids=input_ids[:1, :prefix_len], use_cache=True, logits_to_keep=1).past_key_values
            cache.batch_repeat_interleave(len(prompts))
        out = policy.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            generation_config=config,
            synced_gpus=self.synced_gpus,
        )
        generated = out.sequences[:, width:]
        # scores are the processed logits (temperature, top-p) the tokens were drawn from; keep
        # one gathered float per step, never a stacked (B, steps, V) copy.
        chosen = torch.stack(
            [
                torch.log_softmax(step.float(), dim=-1).gather(-1, generated[:, t : t + 1]).squeeze(-1)
                for t, step in enumerate(out.scores)
            ],
            dim=1,
        ).cpu()
        generated = generated.cpu()
        results = []
        for row in range(len(prompts)):
            tokens = generated[row].tolist()
            length, finished = cut_at_eos(tokens, eos)
            results.append(Generation(tokens[:length], chosen[row, :length].tolist(), finished))
        return results
