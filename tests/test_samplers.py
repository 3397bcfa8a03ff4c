"""Samplers: seeded, cut at EOS, and their log-probs agree with the trainer's forward pass."""

import pytest
import torch

from iq_lightning.forward import pack, response_logprobs
from iq_lightning.samplers import SamplingParams, cut_at_eos
from iq_lightning.samplers.hf import HFSampler

PROMPTS = [[1, 87, 85, 71, 84, 201], [1, 67, 201], [1, 90, 91, 92, 93, 94, 95, 201]]


def _sampler(tokenizer, batch_size=2):
    return HFSampler(batch_size, [tokenizer.eos_token_id], tokenizer.pad_token_id, show_progress=False)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 0, 0], {2}) == (3, True)
    assert cut_at_eos([5, 6, 7], {2}) == (3, False)
    assert cut_at_eos([2, 2], {2, 9}) == (1, True)


def test_same_seed_same_samples_other_seed_differs(tiny):
    model, tokenizer = tiny
    sampler = _sampler(tokenizer)
    a = sampler.generate(model, PROMPTS, SamplingParams(10, 1.0, 1.0, seed=3))
    b = sampler.generate(model, PROMPTS, SamplingParams(10, 1.0, 1.0, seed=3))
    c = sampler.generate(model, PROMPTS, SamplingParams(10, 1.0, 1.0, seed=4))
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert [g.response_ids for g in a] != [g.response_ids for g in c]
    for g in a:
        assert len(g.response_ids) == len(g.sampling_logprobs) <= 10
        assert g.finished == (g.response_ids[-1] == tokenizer.eos_token_id)


def test_sampling_logprobs_match_trainer_forward_at_temperature_one(tiny):
    """Left-padded batched generation and the trainer's packed forward see the same model."""
    model, tokenizer = tiny
    generations = _sampler(tokenizer, batch_size=3).generate(model, PROMPTS, SamplingParams(8, 1.0, 1.0, seed=0))
    batch = pack(PROMPTS, [g.response_ids for g in generations], tokenizer.pad_token_id)
    with torch.no_grad():
        trainer_lp = response_logprobs(model, batch)
    for i, g in enumerate(generations):
        torch.testing.assert_close(trainer_lp[i, : len(g.response_ids)], torch.tensor(g.sampling_logprobs), atol=1e-4, rtol=1e-4)


def test_temperature_scales_sampling_logprobs_and_greedy_is_deterministic(tiny):
    model, tokenizer = tiny
    sampler = _sampler(tokenizer, batch_size=3)
    greedy = sampler.generate(model, PROMPTS, SamplingParams(6, 0.0, 1.0, seed=0))
    again = sampler.generate(model, PROMPTS, SamplingParams(6, 0.0, 1.0, seed=99))
    assert [g.response_ids for g in greedy] == [g.response_ids for g in again]
    cold = sampler.generate(model, PROMPTS, SamplingParams(6, 0.5, 1.0, seed=0))
    batch = pack(PROMPTS, [g.response_ids for g in cold], tokenizer.pad_token_id)
    from iq_lightning.forward import response_logits

    with torch.no_grad():
        logits = response_logits(model, batch) / 0.5
    want = torch.log_softmax(logits, -1).gather(-1, batch["response_ids"][..., None]).squeeze(-1)
    for i, g in enumerate(cold):
        torch.testing.assert_close(want[i, : len(g.response_ids)], torch.tensor(g.sampling_logprobs), atol=1e-4, rtol=1e-4)


def test_sampler_restores_training_mode(tiny):
    model, tokenizer = tiny
    model.train()
    _sampler(tokenizer).generate(model, PROMPTS[:1], SamplingParams(2, 1.0, 1.0, seed=0))
    assert model.training
    model.eval()
