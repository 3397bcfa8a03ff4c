"""Sampling with transformers' `generate`: batched, left-padded, KV cache, seeded."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel

from iq_lightning.samplers.base import Generation, Sampler, SamplingParams, cut_at_eos


class HFSampler(Sampler):
    """Reads the policy module directly, so it always samples with the current weights."""

    def __init__(self, batch_size: int, eos_token_ids: Sequence[int], pad_token_id: int, show_progress: bool = True):
        self.batch_size = batch_size
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.show_progress = show_progress

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        # A fresh config so a checkpoint's generation_config.json (top_k=50, penalties, ...) cannot
        # silently change what the sampling parameters mean.
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
            policy.train(was_training)
        return results

    def _generate_batch(self, policy, prompts, config, eos, device) -> list[Generation]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[i, width - len(prompt) :] = 1
        out = policy.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
        generated = out.sequences[:, width:].cpu()
        # scores are the processed logits (temperature, top-p) the tokens were drawn from.
        step_logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1).cpu() for s in out.scores], dim=1)
        chosen = step_logprobs.gather(-1, generated.unsqueeze(-1)).squeeze(-1)
        results = []
        for row in range(len(prompts)):
            tokens = generated[row].tolist()
            length, finished = cut_at_eos(tokens, eos)
            results.append(Generation(tokens[:length], chosen[row, :length].tolist(), finished))
        return results
