"""Judge-free figures against hand-computed values and independent float64 computations."""

import math

import pytest
import torch

from iq_lightning.text_quality import answer_nll_under, mean_nll, per_token_kl, repetition, word_length, words


def test_words_ignore_punctuation_and_case_and_keep_elisions():
    assert words("La première war, LA première cause!") == ["la", "première", "war", "la", "première", "cause"]
    assert words("l'archiduc François-Ferdinand, a_b") == ["l'archiduc", "françois", "ferdinand", "a", "b"]
    assert word_length("") == 0 and word_length("  ...  ") == 0 and word_length("one two  three\n") == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0.0),
        ("two words", 0.0),  # no 3-gram
        ("the cat sat on the mat", 0.0),  # 4 distinct 3-grams
        ("la la la la", 0.5),  # 2 3-grams, 1 distinct
        # 11 words, 9 3-grams, 4 distinct: (la première cause) (première cause de) (cause de la) (de la première)
        ("la première cause de la première cause de la première cause", 5 / 9),
        # 10 words, 8 3-grams, "la première war" twice: 7 distinct; punctuation does not count
        ("La première war, la première cause de la première war", 1 / 8),
    ],
)
def test_repetition_is_the_share_of_repeated_word_trigrams(text, expected):
    assert repetition(text) == pytest.approx(expected)


def _kl_float64(logits_p, logits_q):
    """Independently: softmax in float64, then the sum written out per position."""
    p = torch.softmax(logits_p.double(), -1)
    q = torch.softmax(logits_q.double(), -1)
    flat_p, flat_q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    values = []
    for row_p, row_q in zip(flat_p, flat_q):
        values.append(sum(float(a) * (math.log(float(a)) - math.log(float(b))) for a, b in zip(row_p, row_q) if a > 0))
    return torch.tensor(values, dtype=torch.float64).reshape(p.shape[:-1])


def test_per_token_kl_matches_an_independent_float64_computation():
    generator = torch.Generator().manual_seed(0)
    logits_p = torch.randn(2, 3, 7, generator=generator) * 2
    logits_q = torch.randn(2, 3, 7, generator=generator) * 2
    expected = _kl_float64(logits_p, logits_q)
    # from log-probabilities (as the brief has it) and from raw logits alike, in bf16 too
    from_logprobs = per_token_kl(logits_p.log_softmax(-1), logits_q.log_softmax(-1))
    assert from_logprobs.shape == (2, 3) and from_logprobs.dtype == torch.float32
    torch.testing.assert_close(from_logprobs.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_token_kl(logits_p, logits_q).double(), expected, atol=1e-5, rtol=1e-5)
    assert per_token_kl(logits_p.double(), logits_q.double()).dtype == torch.float64
    torch.testing.assert_close(per_token_kl(logits_p.bfloat16(), logits_q.bfloat16()).double(), _kl_float64(logits_p.bfloat16(), logits_q.bfloat16()), atol=1e-4, rtol=1e-3)
    assert (from_logprobs >= 0).all()
    torch.testing.assert_close(per_token_kl(logits_p, logits_p), torch.zeros(2, 3), atol=1e-6, rtol=0)


def test_per_token_kl_with_zero_probabilities():
    minus_inf = float("-inf")
    p = torch.tensor([[0.0, minus_inf, 0.0]])  # p = (1/2, 0, 1/2)
    q = torch.tensor([[0.0, 0.0, 0.0]])  # uniform over 3
    # KL = 2 * 1/2 * (log 1/2 - log 1/3) = log 1.5; the p = 0 entry contributes nothing
    assert per_token_kl(p, q).item() == pytest.approx(math.log(1.5), abs=1e-6)
    assert per_token_kl(q, p).item() == math.inf  # q puts mass where p has none
    with pytest.raises(ValueError, match="shapes differ"):
        per_token_kl(p, torch.zeros(1, 4))


def test_mean_nll_per_sequence_ignores_masked_positions():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, float("nan"), float("-inf")], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    nll = mean_nll(logprobs, mask)
    assert nll[:2].tolist() == [1.5, 0.5]
    assert math.isnan(nll[2])  # an empty answer has no likelihood


def test_answer_nll_under_a_model_matches_scoring_each_answer_alone(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer(f"<|im_start|>user\nquestion {i}<|im_end|>\n<|im_start|>assistant\n")["input_ids"] for i in range(4)]
    responses = [tokenizer(text)["input_ids"] for text in ("a long answer here", "hi", "", "medium one")]
    got = answer_nll_under(model, tokenizer, prompts, responses, batch_size=2)
    assert len(got) == 4 and math.isnan(got[2])
    for i in (0, 1, 3):
        full = prompts[i] + responses[i]
        with torch.no_grad():
            logp = model(torch.tensor([full])).logits[0].double().log_softmax(-1)
        expected = -sum(logp[t - 1, full[t]].item() for t in range(len(prompts[i]), len(full))) / len(responses[i])
        assert got[i] == pytest.approx(expected, abs=1e-4), i
    assert answer_nll_under(model, tokenizer, prompts, responses, batch_size=1) == pytest.approx(got, abs=1e-4, nan_ok=True)
