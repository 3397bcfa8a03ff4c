"""Beam search over the policy's own likelihood, with transformers' `generate`: the decoding of
generate.py and the evaluation when `decoding.num_beams` > 1, never of training rollouts.

"From r to Q*" (Rafailov et al. 2024) shows that a policy trained this way is a token-level
Q-function (beta log pi(y_t | s_t) / pi_ref(y_t | s_t) = Q*(s_t, y_t) - V*(s_t)), so a search over
its likelihood is a search over its implicit reward; their win rates rise with a few beams, then
fall as the answers grow longer.

What beam search guarantees: the answer returned is the best, by sum log p / length**length_penalty,
of the finished hypotheses it kept, not that it beats greedy decoding. With at least as many beams
as the vocabulary has tokens and two new tokens it keeps every answer, and so finds the best one
(tests/test_beams.py checks this against brute force).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel

from iq_lightning.config import DecodingSpec
from iq_lightning.forward import pack, response_logprobs, to_device
from iq_lightning.samplers.base import Generation, Sampler, SamplingParams, cut_at_eos
from iq_lightning.sharded import ready_for_generate


@contextlib.contextmanager
def _neutral_generation_defaults(policy: PreTrainedModel, eos_token_ids: Sequence[int], pad_token_id: int) -> Iterator[None]:
    """Eval mode and a neutral generation_config for the block: transformers fills every unset
    field of the config passed to generate from the checkpoint's generation_config.json
    (repetition_penalty, no_repeat_ngram_size, ...), which would search something other than the
    policy's likelihood (as in HFSampler)."""
    was_training = policy.training
    policy.eval()
    owner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy  # peft wraps it
    saved = owner.generation_config
    owner.generation_config = GenerationConfig(eos_token_id=list(eos_token_ids), pad_token_id=pad_token_id)
    try:
        yield
    finally:
        owner.generation_config = saved
        policy.train(was_training)


class BeamSearch(Sampler):
    """`decoding.num_beams` beams per prompt; deterministic, so the sampling temperature, top_p and
    seed of `SamplingParams` play no part (only max_new_tokens does). Each `generate` call of
    transformers holds about `batch_size` rows: batch_size // num_beams prompts (at least one).
    `sampling_logprobs` are the policy's log-probs of the answer's tokens (temperature 1), from
    one forward pass over the finished answers."""

    def __init__(self, decoding: DecodingSpec, batch_size: int, eos_token_ids: Sequence[int], pad_token_id: int, show_progress: bool = True):
        if decoding.num_beams < 2:
            raise ValueError(f"BeamSearch needs num_beams >= 2, got {decoding.num_beams} (1 beam is the sampler's own decoding)")
        self.decoding = decoding
        self.prompts_per_call = max(1, batch_size // decoding.num_beams)
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.show_progress = show_progress

    def generation_config(self, max_new_tokens: int) -> GenerationConfig:
        d = self.decoding
        return GenerationConfig(
            do_sample=False,
            num_beams=d.num_beams,
            num_return_sequences=1,
            length_penalty=d.length_penalty,
            early_stopping=d.early_stopping,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )

    @torch.no_grad()
    def generate(self, policy: PreTrainedModel, prompts, params: SamplingParams, desc: str = "beam search") -> list[Generation]:
        config = self.generation_config(params.max_new_tokens)
        results: list[Generation] = []
        with ready_for_generate(policy) as model, _neutral_generation_defaults(model, self.eos_token_ids, self.pad_token_id):
            device = next(model.parameters()).device
            with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not self.show_progress, leave=False) as bar:
                for start in range(0, len(prompts), self.prompts_per_call):
                    chunk = [list(p) for p in prompts[start : start + self.prompts_per_call]]
                    results.extend(self._generate_batch(model, chunk, config, device))
                    bar.update(len(chunk))
        return results

    def _generate_batch(self, model: PreTrainedModel, prompts: list[list[int]], config: GenerationConfig, device) -> list[Generation]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, prompt in enumerate(prompts):  # left padding: every answer starts at column `width`
            input_ids[i, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[i, width - len(prompt) :] = 1
        sequences = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config)
        eos = set(self.eos_token_ids)
        answers = []
        for row in sequences[:, width:].cpu().tolist():
            length, finished = cut_at_eos(row, eos)
            answers.append((row[:length], finished))
        batch = to_device(pack(prompts, [a for a, _ in answers], self.pad_token_id), device)
        logprobs = response_logprobs(model, batch).float().cpu()
        return [Generation(tokens, logprobs[i, : len(tokens)].tolist(), finished) for i, (tokens, finished) in enumerate(answers)]
