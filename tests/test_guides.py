"""Guide scoring: targets aligned by position inside the response, batched == one at a time."""

import pytest
import torch
from torch import nn

from iq_lightning import guides as guides_module
from iq_lightning.config import TinySpec
from iq_lightning.data import EncodedPrompt, Prompt, encode_prompt
from iq_lightning.forward import mixable_head, pack, response_logits, shared_prefix_length
from iq_lightning.guides import AlignedModelGuide, PrincipleGuide, with_principle
from iq_lightning.models import AdapterDisabled, build_tiny, frozen_copy
from iq_lightning.objective import estimated_optimal_logprobs

PRINCIPLE = "Always answer politely and briefly."
TEXTS = ["Hi", "Explain rainbows to a child in two sentences.", "What is 2+2?"]


def _prompts(tokenizer):
    out = []
    for i, text in enumerate(TEXTS):
        prompt = Prompt(str(i), ({"role": "user", "content": text},))
        out.append(EncodedPrompt(prompt, tuple(encode_prompt(tokenizer, prompt.messages))))
    return out


def _responses(tokenizer):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9]
    responses = [torch.randint(3, len(tokenizer), (n,), generator=g).tolist() for n in lengths]
    responses[0][-1] = tokenizer.eos_token_id
    return responses


def _unpadded_logprobs(model, prompt_ids, response):
    """log-softmax rows predicting each response token from one unpadded sequence."""
    ids = torch.tensor([list(prompt_ids) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    start = len(prompt_ids) - 1
    return logits[start : start + len(response)]


def test_with_principle_placements():
    messages = ({"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"})
    system = with_principle(messages, "P", "system")
    assert system[0] == {"role": "system", "content": "P"} and system[1:] == messages
    user = with_principle(messages, "P", "user")
    assert user[0]["content"] == "Q1" and user[2]["content"] == "P\n\nQ2"
    with_sys = with_principle(({"role": "system", "content": "S"},) + messages, "P", "system")
    assert with_sys[0]["content"] == "S\n\nP" and len(with_sys) == 4
    assert messages[2]["content"] == "Q2"  # input untouched


@pytest.mark.parametrize("placement", ["system", "user"])
def test_principle_guide_targets_match_unbatched_computation(tiny, placement):
    model, tokenizer = tiny
    guide = PrincipleGuide(frozen_copy(model), tokenizer, PRINCIPLE, placement, alpha=1.4, batch_size=8, show_progress=False)
    prompts, responses = _prompts(tokenizer), _responses(tokenizer)
    batched = guide.score(prompts, responses)
    for prompt, response, scores in zip(prompts, responses, batched):
        winner_ids = encode_prompt(tokenizer, with_principle(prompt.prompt.messages, PRINCIPLE, placement))
        assert len(winner_ids) > len(prompt.input_ids)  # the principle lengthens x_w
        logits_w = _unpadded_logprobs(guide.model, winner_ids, response)
        logits_l = _unpadded_logprobs(guide.model, prompt.input_ids, response)
        tokens = torch.tensor(response)
        want_target = estimated_optimal_logprobs(logits_w, logits_l, 1.4).gather(-1, tokens[:, None]).squeeze(-1)
        want_ref = torch.log_softmax(logits_l, -1).gather(-1, tokens[:, None]).squeeze(-1)
        assert len(scores.target_logprobs) == len(response)
        torch.testing.assert_close(torch.tensor(scores.target_logprobs), want_target, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(scores.ref_logprobs), want_ref, atol=2e-5, rtol=1e-5)
    # One at a time gives the same numbers as the padded batch.
    singles = [guide.score([p], [r])[0] for p, r in zip(prompts, responses)]
    for one, many in zip(singles, batched):
        torch.testing.assert_close(torch.tensor(one.target_logprobs), torch.tensor(many.target_logprobs), atol=2e-5, rtol=1e-5)


def test_principle_changes_targets_and_alpha_zero_gives_pi_l(tiny):
    model, tokenizer = tiny
    prompts, responses = _prompts(tokenizer), _responses(tokenizer)
    guide = PrincipleGuide(frozen_copy(model), tokenizer, PRINCIPLE, "system", alpha=0.0, show_progress=False)
    for s in guide.score(prompts, responses):
        torch.testing.assert_close(torch.tensor(s.target_logprobs), torch.tensor(s.ref_logprobs), atol=1e-5, rtol=1e-5)
    guide.alpha = 1.5
    moved = [abs(a - b) for s in guide.score(prompts, responses) for a, b in zip(s.target_logprobs, s.ref_logprobs)]
    assert max(moved) > 1e-3


def test_aligned_model_guide_uses_both_models(tiny):
    lesser_model, tokenizer = tiny
    winner_model, _ = build_tiny(TinySpec(seed=1))
    guide = AlignedModelGuide(frozen_copy(winner_model), frozen_copy(lesser_model), tokenizer.pad_token_id, alpha=1.2, show_progress=False)
    prompts, responses = _prompts(tokenizer), _responses(tokenizer)
    for prompt, response, scores in zip(prompts, responses, guide.score(prompts, responses)):
        logits_w = _unpadded_logprobs(winner_model, prompt.input_ids, response)
        logits_l = _unpadded_logprobs(lesser_model, prompt.input_ids, response)
        tokens = torch.tensor(response)
        want = estimated_optimal_logprobs(logits_w, logits_l, 1.2).gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(scores.target_logprobs), want, atol=2e-5, rtol=1e-5)


def test_shared_prefix_length_keeps_each_prompts_last_token():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9, 9]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter keeps its last token
    assert shared_prefix_length([[1, 2], [5, 2]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 0  # nothing to share with one row


def test_shared_prefix_forward_equals_prefix_in_every_row(tiny):
    """The prefix run once as a cache gives the logits and the gradients of running it per row."""
    model, tokenizer = tiny
    model = frozen_copy(model).requires_grad_(True)
    prompts = [list(p.input_ids) for p in _prompts(tokenizer)]
    batch = pack(prompts, _responses(tokenizer), tokenizer.pad_token_id)
    assert batch["prefix_ids"].numel() >= 3  # the chat template's opening is shared
    flat = pack(prompts, _responses(tokenizer), tokenizer.pad_token_id, share_prefix=False)
    assert flat["prefix_ids"].numel() == 0

    def logits_and_grads(b, share):
        model.zero_grad()
        logits = response_logits(model, b, share_prefix=share)
        (logits * b["response_mask"][..., None]).square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    mask = batch["response_mask"].bool()
    for other, share in ((flat, True), (batch, False)):  # the flat layout, and the prefix per row
        want, want_grads = logits_and_grads(other, share)
        got, got_grads = logits_and_grads(batch, True)
        torch.testing.assert_close(got[mask], want[mask], atol=2e-5, rtol=1e-5)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointed_training_forward_keeps_the_prefix(tiny):
    """Checkpointed layers drop a passed cache in training mode: the prefix must go in every row."""
    model = frozen_copy(tiny[0])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    prompts, responses = [list(p.input_ids) for p in _prompts(tiny[1])], _responses(tiny[1])
    batch = pack(prompts, responses, tiny[1].pad_token_id)
    flat = pack(prompts, responses, tiny[1].pad_token_id, share_prefix=False)
    mask = batch["response_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(response_logits(model, batch)[mask], response_logits(model, flat)[mask], atol=2e-5, rtol=1e-5)


def _hidden_passes(monkeypatch) -> list[int]:
    """Counts the one-head path's hidden-state passes (guides.response_hidden calls)."""
    calls = []
    real = guides_module.response_hidden

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(guides_module, "response_hidden", counted)
    return calls


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 1.5, 0.5])
def test_one_head_path_equals_the_general_path(tiny, monkeypatch, alpha, share_prefix):
    """W (alpha h_w + (1 - alpha) h_l) gives the general path's targets and the same reference
    log-probs, on ragged, padded responses with the shared prefix on and off."""
    model, tokenizer = tiny
    model = frozen_copy(model)
    prompts, responses = _prompts(tokenizer), _responses(tokenizer)
    kwargs = dict(alpha=alpha, batch_size=8, show_progress=False, share_prefix=share_prefix)
    one_head = PrincipleGuide(model, tokenizer, PRINCIPLE, "system", **kwargs)
    general = PrincipleGuide(model, tokenizer, PRINCIPLE, "system", **kwargs)
    general._one_head = False
    assert one_head.one_head and mixable_head(model)
    passes = _hidden_passes(monkeypatch)
    got = one_head.score(prompts, responses)
    assert len(passes) == 2  # pi_w's and pi_l's, one batch
    want = general.score(prompts, responses)
    assert len(passes) == 2  # the general path runs none
    for g, w, response in zip(got, want, responses):
        assert len(g.target_logprobs) == len(g.ref_logprobs) == len(response) and g.winner_logprobs == []
        torch.testing.assert_close(torch.tensor(g.target_logprobs), torch.tensor(w.target_logprobs), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(g.ref_logprobs), torch.tensor(w.ref_logprobs), atol=2e-5, rtol=1e-5)


def test_winner_logprobs_take_the_general_path(tiny, monkeypatch):
    """log pi_w (PPO) needs z_w in full: the general path's two head products, not a third."""
    model, tokenizer = tiny
    guide = PrincipleGuide(frozen_copy(model), tokenizer, PRINCIPLE, "system", alpha=1.4, show_progress=False)
    prompts, responses = _prompts(tokenizer), _responses(tokenizer)
    passes = _hidden_passes(monkeypatch)
    with_winner = guide.score(prompts, responses, winner=True)
    assert passes == [] and guide.one_head
    plain = guide.score(prompts, responses)
    for w, p in zip(with_winner, plain):
        assert len(w.winner_logprobs) == len(w.target_logprobs)
        torch.testing.assert_close(torch.tensor(w.target_logprobs), torch.tensor(p.target_logprobs), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(w.ref_logprobs), torch.tensor(p.ref_logprobs), atol=2e-5, rtol=1e-5)


def test_head_with_bias_takes_the_general_path(tiny, monkeypatch):
    model, tokenizer = tiny
    model = frozen_copy(model)
    head = model.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.normal_(0.0, 1.0)
    model.set_output_embeddings(biased.requires_grad_(False))
    assert not mixable_head(model)
    guide = PrincipleGuide(model, tokenizer, PRINCIPLE, "system", alpha=1.5, show_progress=False)
    prompts, responses = _prompts(tokenizer), _responses(tokenizer)
    passes = _hidden_passes(monkeypatch)
    scores = guide.score(prompts, responses)
    assert passes == [] and not guide.one_head
    prompt, response = prompts[2], responses[2]
    winner_ids = encode_prompt(tokenizer, with_principle(prompt.prompt.messages, PRINCIPLE, "system"))
    logits_w = _unpadded_logprobs(model, winner_ids, response)
    logits_l = _unpadded_logprobs(model, prompt.input_ids, response)
    want = estimated_optimal_logprobs(logits_w, logits_l, 1.5).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(scores[2].target_logprobs), want, atol=2e-5, rtol=1e-5)


def _tiny_gemma2(softcap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=softcap,
    )
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).eval()


def test_mixable_head_asks_the_model_whether_its_logits_are_the_heads():
    """Gemma 2 soft-caps its logits (tanh, not linear) unless final_logit_softcapping is None;
    its head is tied to the embeddings, which is no obstacle; wrappers (a LoRA base, FSDP) are never mixable."""
    assert not mixable_head(_tiny_gemma2(30.0))
    assert mixable_head(_tiny_gemma2(None))
    assert not mixable_head(AdapterDisabled(lambda: _tiny_gemma2(None)))


SECOND = "Answer in one sentence."


@pytest.mark.parametrize("one_head", [True, False])
def test_several_principles_match_an_independent_float64_product_of_experts(tiny, monkeypatch, one_head):
    """guide.principles: pi_hat ∝ pi_w,1^a1 * pi_w,2^a2 * pi_l^(1 - a1 - a2), each winner the model
    given its own principle, unbatched and in float64 here; one pass per principle, both paths."""
    model, tokenizer = tiny
    model = frozen_copy(model)
    prompts, responses = _prompts(tokenizer), _responses(tokenizer)
    guide = PrincipleGuide(model, tokenizer, [PRINCIPLE, SECOND], ["system", "user"], [0.8, 0.6], show_progress=False)
    guide._one_head = one_head
    passes = _hidden_passes(monkeypatch)
    got = guide.score(prompts, responses)
    assert len(passes) == (3 if one_head else 0)  # pi_w,1, pi_w,2 and pi_l, one batch
    for prompt, response, scores in zip(prompts, responses, got):
        rows = [
            torch.log_softmax(_unpadded_logprobs(model, encode_prompt(tokenizer, with_principle(prompt.prompt.messages, p, where)), response).double(), -1)
            for p, where in ((PRINCIPLE, "system"), (SECOND, "user"))  # each principle where it is placed
        ]
        log_l = torch.log_softmax(_unpadded_logprobs(model, prompt.input_ids, response).double(), -1)
        z = 0.8 * rows[0] + 0.6 * rows[1] + (1 - 1.4) * log_l
        want = (z - torch.logsumexp(z, -1, keepdim=True)).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(scores.target_logprobs, dtype=torch.float64), want, atol=3e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(scores.ref_logprobs, dtype=torch.float64), log_l.gather(-1, torch.tensor(response)[:, None]).squeeze(-1), atol=3e-5, rtol=1e-5)
    assert guide.principle == PRINCIPLE and guide.winner_prompt_ids(prompts[0], 1) != guide.winner_prompt_ids(prompts[0])
    with pytest.raises(ValueError, match="as many alphas"):
        PrincipleGuide(model, tokenizer, [PRINCIPLE, SECOND], "system", 1.5)
    with pytest.raises(ValueError, match="as many placements"):
        PrincipleGuide(model, tokenizer, [PRINCIPLE, SECOND], ["user"], [1.0, 0.5])


def test_score_takes_the_epochs_alpha(tiny):
    """The alpha schedule hands each epoch's alpha to score(): the same as a guide built with it."""
    model, tokenizer = tiny
    model = frozen_copy(model)
    prompts, responses = _prompts(tokenizer), _responses(tokenizer)
    guide = PrincipleGuide(model, tokenizer, PRINCIPLE, "system", 1.5, show_progress=False)
    at_one = PrincipleGuide(model, tokenizer, PRINCIPLE, "system", 1.0, show_progress=False)
    for g, w in zip(guide.score(prompts, responses, alpha=1.0), at_one.score(prompts, responses)):
        assert g.target_logprobs == w.target_logprobs
    assert guide.score(prompts, responses)[2].target_logprobs != at_one.score(prompts, responses)[2].target_logprobs
