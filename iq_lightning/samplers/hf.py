"""Sampling with transformers' `generate`: batched, left-padded, KV cache, one seeded random
stream per prompt (so a sample does not depend on `batch_size`, as with vLLM)."""

from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.generation.logits_process import TopPLogitsWarper

from iq_lightning.forward import shared_prefix_length
from iq_lightning.samplers.base import Generation, NonFiniteSampling, Sampler, SamplingParams, cut_at_eos
from iq_lightning.sharded import ready_for_generate


class HFSampler(Sampler):
    """Reads the policy module directly, so it always samples with the current weights."""

    def __init__(
        self,
        batch_size: int,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        show_progress: bool = True,
        synced_gpus: bool = False,
        gather_whole_up_to: int = 0,
    ):
        self.batch_size = batch_size
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.show_progress = show_progress
        # ZeRO-3 / FSDP: every rank must run the same number of forward passes (its shards are
        # gathered collectively), so ranks keep stepping until all have finished.
        self.synced_gpus = synced_gpus
        # ZeRO-3: gather the whole policy once per generate call, not once per token, when it
        # takes at most this many bytes (the memory plan's headroom; sharded.ready_for_generate).
        self.gather_whole_up_to = gather_whole_up_to

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        # Greedy as far as generate knows: TokenDraw puts all the mass on the token it drew.
        return GenerationConfig(
            do_sample=False,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )

    # no_grad, not inference_mode: ZeRO-3 and FSDP gather and re-shard the policy's parameters
    # in place around each forward, and a parameter touched in inference mode stays an inference
    # tensor that training (or a LoRA policy's adapter-disabled guide pass) then cannot use.
    @torch.no_grad()
    def generate(self, policy: PreTrainedModel, prompts, params: SamplingParams, desc: str = "sampling") -> list[Generation]:
        with ready_for_generate(policy, self.gather_whole_up_to) as model:
            return self._generate(model, prompts, params, desc)

    def _generate(self, policy: PreTrainedModel, prompts, params: SamplingParams, desc: str) -> list[Generation]:
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
        bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not self.show_progress, leave=False)
        try:
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                streams = RowStreams([params.sample_seed(i) for i in range(start, start + len(chunk))], params.max_new_tokens, device)
                progress = BatchProgress(bar, len(chunk), self.eos_token_ids, params.max_new_tokens, device) if not bar.disable else None
                draw = TokenDraw(params, streams, desc, progress)
                results.extend(self._generate_batch(policy, chunk, config, draw, eos, device))
                if progress is not None:
                    progress.close()
        finally:
            bar.close()
            owner.generation_config = saved_config
            policy.train(was_training)
        return results

    def _generate_batch(self, policy, prompts, config, draw: TokenDraw, eos, device) -> list[Generation]:
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
        sequences = policy.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            generation_config=config,
            logits_processor=LogitsProcessorList([draw]),
            synced_gpus=self.synced_gpus,
        )
        generated = sequences[:, width:].cpu()
        chosen = torch.cat(draw.logprobs, dim=1).cpu() if draw.logprobs else torch.zeros(len(prompts), 0)
        results = []
        for row in range(len(prompts)):
            tokens = generated[row].tolist()
            length, finished = cut_at_eos(tokens, eos)
            results.append(Generation(tokens[:length], chosen[row, :length].tolist(), finished))
        return results


class BatchProgress:
    """Moves the prompts bar within a batch: a prompt counts as done the step its answer draws an
    EOS (the rest when the batch ends), and the bar shows the batch's current token."""

    def __init__(self, bar: tqdm, rows: int, eos_token_ids: Sequence[int], max_new_tokens: int, device):
        self.bar, self.rows, self.max_new_tokens = bar, rows, max_new_tokens
        self.eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.counted = 0
        self.drawn_at = time.monotonic()

    def step(self, step: int, tokens: torch.Tensor) -> None:
        self.done |= torch.isin(tokens.view(-1), self.eos)
        finished = int(self.done.sum())  # generate syncs every step anyway (its stopping check)
        self.bar.update(finished - self.counted)  # tqdm redraws at most every mininterval
        self.counted = finished
        now = time.monotonic()
        if now - self.drawn_at >= 1.0:  # the current token, redrawn once a second
            self.bar.set_postfix_str(f"token {step + 1}/{self.max_new_tokens}")
            self.drawn_at = now

    def close(self) -> None:
        self.bar.update(self.rows - self.counted)
        self.counted = self.rows


class RowStreams:
    """One random stream per row, each a CPU generator seeded with its prompt's own seed
    (`SamplingParams.sample_seed`): row r's uniform at step t is the t-th draw of its own
    generator, whatever the other rows of the batch. The uniforms of `steps` steps are drawn up
    front and moved to the device once (more are drawn if generate ever asks for more)."""

    def __init__(self, seeds: Sequence[int], steps: int, device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.device = device
        self.drawn = self._draw(max(steps, 1))

    def _draw(self, steps: int) -> torch.Tensor:
        return torch.stack([torch.rand(steps, generator=g) for g in self.generators]).to(self.device)

    def uniform(self, step: int) -> torch.Tensor:
        """(rows, 1) uniforms in [0, 1) for step `step` (0-based)."""
        while step >= self.drawn.shape[1]:
            self.drawn = torch.cat([self.drawn, self._draw(self.drawn.shape[1])], dim=1)
        return self.drawn[:, step : step + 1]


class TokenDraw(LogitsProcessor):
    """Draws y_t ~ pi_theta(.|x, y_<t) (temperature, then top-p; argmax at temperature 0) and keeps
    its log-prob, one float per row and step; returns scores that are 0 at the drawn token and
    -inf elsewhere, which generate's greedy step then takes.

    The uniform of each row comes from that row's own stream (`RowStreams`), or from torch's
    global generator when none is given. A non-finite distribution (NaN or inf logits: diverged
    weights) raises NonFiniteSampling rather than yield an arbitrary token.

    Why not generate's own sampling: it calls torch.multinomial, whose CPU path draws an
    exponential for every vocabulary entry: 150 ms per step for 32 x 49152 on 2 busy cores,
    about 10x this inverse-CDF draw (one uniform per row into the cumulative distribution).
    """

    def __init__(
        self, params: SamplingParams, streams: RowStreams | None = None, desc: str = "sampling", progress: BatchProgress | None = None
    ):
        self.progress = progress
        self.temperature = params.temperature
        self.top_p = TopPLogitsWarper(params.top_p) if params.temperature and params.top_p < 1.0 else None
        self.streams = streams
        self.desc = desc
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = len(self.logprobs)
        raw = scores
        if self.temperature == 0:
            logprobs = torch.log_softmax(scores.float(), dim=-1)
        else:
            scores = scores.float() / self.temperature
            if self.top_p is not None:
                scores = self.top_p(input_ids, scores)
            logprobs = torch.log_softmax(scores, dim=-1)
        # NaN anywhere, +inf, or no finite entry at all: the row's best log-prob is not finite.
        # (generate already syncs every step for its stopping check, so this costs ~nothing.)
        if not torch.isfinite(logprobs.amax(-1)).all():
            self._refuse(raw, logprobs, step)
        if self.temperature == 0:
            tokens = logprobs.argmax(-1, keepdim=True)
        else:
            cdf = logprobs.exp().cumsum(-1)
            if self.streams is not None:
                u = self.streams.uniform(step).to(cdf.dtype)
            else:
                u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype)
            # right=True: the first entry whose cumulative mass exceeds u, never a zero-probability
            # one; the clamp only catches u * total landing on the total through rounding.
            tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)
        self.logprobs.append(logprobs.gather(-1, tokens))
        if self.progress is not None:
            self.progress.step(step, tokens)
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)

    def _refuse(self, raw: torch.Tensor, logprobs: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(logprobs.amax(-1))
        rows = raw[bad]
        what = "NaN" if rows.isnan().any() else ("+inf" if (rows == float("inf")).any() else "only -inf")
        raise NonFiniteSampling(
            f"{self.desc}: the policy's next-token logits hold {what} at response token {step + 1} in "
            f"{int(bad.sum())} of {bad.numel()} rows (non-finite weights? the training diverged); stopped "
            "instead of sampling an arbitrary token"
        )
