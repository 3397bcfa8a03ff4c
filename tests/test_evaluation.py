"""Evaluation arithmetic and judging, against hand-computed values."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from iq_lightning.evaluation.judges import (
    Comparison,
    Judge,
    JudgeReply,
    LikelihoodJudge,
    judge_messages,
    map_back,
    parse_verdict,
    swap_orders,
)
from iq_lightning.evaluation.matches import judge_pairings, pairings
from iq_lightning.evaluation.ratings import (
    WinRate,
    elo_ratings,
    elo_sequence,
    gaussian_smooth,
    matches_from_verdicts,
    per_category,
    win_rates,
)
from iq_lightning.evaluation.reward import reward_curve


# --- win rates and Elo -------------------------------------------------------------------------


def test_win_rates_count_each_pairing_once_and_leave_invalid_out_of_the_rates():
    verdicts = [("x", "y", "A"), ("x", "y", "A"), ("x", "y", "tie"), ("x", "y", "B"), ("x", "y", "invalid"),
                ("y", "x", "A"),  # y better, seen from the other side
                ("x", "z", "B")]
    rates = win_rates(verdicts)
    assert set(rates) == {("x", "y"), ("x", "z")}
    assert rates[("x", "y")] == WinRate(wins=2, ties=1, losses=2, invalid=1)
    assert rates[("x", "y")].win_rate == pytest.approx(2 / 5)
    assert rates[("x", "y")].tie_rate == pytest.approx(1 / 5)
    assert rates[("x", "y")].win_minus_lose == pytest.approx(0.0)
    assert rates[("x", "z")].lose_rate == 1.0
    assert math.isnan(WinRate(0, 0, 0, 3).win_rate)


def test_per_category_splits_the_verdicts():
    cats = per_category([("math", "a", "b", "A"), ("math", "a", "b", "B"), ("code", "a", "b", "tie")])
    assert list(cats) == ["code", "math"]
    assert cats["math"][("a", "b")] == WinRate(1, 0, 1, 0)
    assert cats["code"][("a", "b")] == WinRate(0, 1, 0, 0)


def test_elo_sequence_matches_hand_computation():
    # a beats b at equal ratings: expected 0.5, so a gains K/2 = 8.
    players, history = elo_sequence([("a", "b", 1.0)], k=16, initial=1000)
    assert players == ["a", "b"]
    np.testing.assert_allclose(history[-1], [1008.0, 992.0])
    # then b beats a: E_b = 1 / (1 + 10^(16/400)) = 0.476990..., b gains 16 * (1 - E_b).
    _, history = elo_sequence([("a", "b", 1.0), ("b", "a", 1.0)], k=16, initial=1000)
    e_b = 1 / (1 + 10 ** (16 / 400))
    np.testing.assert_allclose(history[-1], [1008 - 16 * (1 - e_b), 992 + 16 * (1 - e_b)])
    np.testing.assert_allclose(history[-1], [999.631847, 1000.368153], atol=1e-5)
    # a tie between equals moves nothing
    _, history = elo_sequence([("a", "b", 0.5)])
    np.testing.assert_allclose(history[-1], [1000.0, 1000.0])


def test_elo_over_orderings_is_the_mean_of_both_orders_with_their_spread():
    matches = [("a", "b", 1.0), ("b", "a", 1.0)]
    result = elo_ratings(matches, k=16, initial=1000, permutations=4000, seed=1)
    # The two orders end at (999.63, 1000.37) and (1000.37, 999.63): mean 1000, spread 0.368.
    np.testing.assert_allclose(result.mean, [1000.0, 1000.0], atol=0.03)
    np.testing.assert_allclose(result.std, [0.3683, 0.3683], atol=0.005)
    assert result.progression.shape == (3, 2)
    np.testing.assert_allclose(result.progression.sum(1), 2000.0)  # Elo is zero-sum


def test_elo_ranks_a_dominant_player_first():
    matches = matches_from_verdicts([("a", "b", "A")] * 6 + [("b", "c", "A")] * 6 + [("a", "c", "A")] * 6 + [("a", "c", "invalid")])
    assert len(matches) == 18
    result = elo_ratings(matches, permutations=50)
    assert list(np.argsort(-result.mean)) == [0, 1, 2]


def test_gaussian_smoothing_keeps_constants_and_mass():
    flat = np.full((20, 2), 1000.0)
    np.testing.assert_allclose(gaussian_smooth(flat, 3.0), flat)
    impulse = np.zeros(41)
    impulse[20] = 1.0
    smoothed = gaussian_smooth(impulse, 2.0)
    assert smoothed.sum() == pytest.approx(1.0)
    assert smoothed[20] == pytest.approx(1 / (2.0 * math.sqrt(2 * math.pi)), rel=1e-3)
    np.testing.assert_array_equal(gaussian_smooth(impulse, 0), impulse)


def test_reward_curve_is_the_increment_over_initial_in_initial_stds():
    curve = reward_curve({0: [1.0, 2.0, 3.0], 1: [2.0, 3.0, 4.0], 2: [4.0, 4.0, 4.0]})
    assert curve.epochs == [0, 1, 2]
    assert curve.mean == [2.0, 3.0, 4.0]
    assert curve.increment == pytest.approx([0.0, 1.0, 2.0])  # std of [1, 2, 3] is 1


# --- verdicts, order swapping ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("A is more helpful. [[A]]", "A"),
        ("[[B]]", "B"),
        ("Both are equally good.\nFinal verdict: [[C]]", "tie"),
        ("I prefer A", "invalid"),
        ("[[A]] ... no wait, [[B]]", "invalid"),
        ("[[A]] and again [[A]]", "A"),
        ("", "invalid"),
        (None, "invalid"),
    ],
)
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_swaps_are_balanced_seeded_and_mapped_back():
    swaps = swap_orders(10, seed=3)
    assert swaps.sum() == 5
    np.testing.assert_array_equal(swaps, swap_orders(10, seed=3))
    assert any((swap_orders(10, seed=s) != swaps).any() for s in range(4, 8))
    assert swap_orders(7, 0).sum() == 3
    assert [map_back(v, True) for v in ("A", "B", "tie", "invalid")] == ["B", "A", "tie", "invalid"]
    assert [map_back(v, False) for v in ("A", "B", "tie", "invalid")] == ["A", "B", "tie", "invalid"]


def test_judge_prompt_hides_names_and_states_the_criteria():
    messages = judge_messages(({"role": "user", "content": "Hi?"},), "first answer", "second answer")
    text = messages[0]["content"] + messages[1]["content"]
    assert "helpful" in text and "harmless" in text and "[[A]]" in text and "length" in text
    assert messages[1]["content"].index("first answer") < messages[1]["content"].index("second answer")
    assert "User: Hi?" in messages[1]["content"]


class FirstPositionJudge(Judge):
    """Always prefers whichever answer is shown first."""

    def judge(self, comparisons, show_progress=True):
        self.seen = list(comparisons)
        return [JudgeReply("A", "[[A]]") for _ in comparisons]

    def fingerprint(self):
        return {"judge": "first"}


class ContentJudge(Judge):
    """Prefers the answer containing 'good', wherever it is shown."""

    calls = 0

    def judge(self, comparisons, show_progress=True):
        ContentJudge.calls += len(comparisons)
        return [JudgeReply("A" if "good" in c.first else "B", "") for c in comparisons]

    def fingerprint(self):
        return {"judge": "content"}


def _answers(n: int):
    conv = [{"role": "user", "content": "q"}]
    good = {f"p{i}": {"messages": conv, "response": f"good {i}", "category": "c"} for i in range(n)}
    bad = {f"p{i}": {"messages": conv, "response": f"bad {i}", "category": "c"} for i in range(n)}
    return {"good": good, "bad": bad}, {"good": "kg", "bad": "kb"}


def test_a_first_position_judge_ends_at_fifty_fifty(tmp_path):
    answers, keys = _answers(20)
    judge = FirstPositionJudge()
    judgments = judge_pairings(judge, [("good", "bad")], answers, keys, seed=0, cache_path=tmp_path / "j.jsonl", show_progress=False)
    rate = win_rates([(j.a, j.b, j.verdict) for j in judgments])[("good", "bad")]
    assert (rate.wins, rate.losses) == (10, 10)
    # What the judge saw really was swapped for the matches marked so.
    for j, c in zip(judgments, judge.seen):
        assert c.first.startswith("bad" if j.swapped else "good")


def test_verdicts_map_back_to_the_right_contestant_and_are_cached(tmp_path):
    answers, keys = _answers(9)
    cache = tmp_path / "j.jsonl"
    ContentJudge.calls = 0
    judgments = judge_pairings(ContentJudge(), [("bad", "good")], answers, keys, 0, cache, show_progress=False)
    assert {j.swapped for j in judgments} == {True, False}
    assert all(j.verdict == "B" for j in judgments)  # good (b) wins every match, swapped or not
    assert ContentJudge.calls == 9
    again = judge_pairings(ContentJudge(), [("bad", "good")], answers, keys, 0, cache, show_progress=False)
    assert again == judgments and ContentJudge.calls == 9  # all from the cache
    # new answers for one contestant (another cache key) are judged anew
    judge_pairings(ContentJudge(), [("bad", "good")], answers, {"good": "kg2", "bad": "kb"}, 0, cache, show_progress=False)
    assert ContentJudge.calls == 18


def test_pairings():
    assert pairings(["s", "p", "q"], "s", "all") == [("s", "p"), ("s", "q"), ("p", "q")]
    assert pairings(["s", "p", "q"], "s", "reference") == [("p", "s"), ("q", "s")]


def test_likelihood_judge_compares_the_two_verdict_continuations(tiny):
    model, tokenizer = tiny
    judge = LikelihoodJudge(lambda: (model, tokenizer), "tiny", batch_size=2)
    comparisons = [Comparison(({"role": "user", "content": f"question {i}"},), f"answer {i}", "other answer") for i in range(3)]
    replies = judge.judge(comparisons, show_progress=False)
    assert len(replies) == 3
    for c, reply in zip(comparisons, replies):
        # Independently: the unpadded log-probability of "A]]" and "B]]" after the judge prompt.
        text = tokenizer.apply_chat_template(judge_messages(c.conversation, c.first, c.second), add_generation_prompt=True, tokenize=False) + judge.reply_prefix
        logps = []
        for label in "AB":
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            full = tokenizer(text + label + "]]", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([full])).logits[0].double().log_softmax(-1)
            logps.append(sum(logits[t - 1, full[t]].item() for t in range(len(prompt), len(full))))
        assert reply.raw == f"log p(A)={logps[0]:.4f} log p(B)={logps[1]:.4f}"
        assert reply.verdict == ("A" if logps[0] > logps[1] else "B")
    tie_judge = LikelihoodJudge(lambda: (model, tokenizer), "tiny", tie_margin=1e9)
    assert {r.verdict for r in tie_judge.judge(comparisons, show_progress=False)} == {"tie"}


def test_balanced_likelihood_judge_averages_both_orders(tiny):
    model, tokenizer = tiny
    plain = LikelihoodJudge(lambda: (model, tokenizer), "tiny", batch_size=4)
    balanced = LikelihoodJudge(lambda: (model, tokenizer), "tiny", batch_size=4, balanced=True)
    comparisons = [Comparison(({"role": "user", "content": f"q{i}"},), f"answer number {i}", "x") for i in range(4)]
    exchanged = [Comparison(c.conversation, c.second, c.first) for c in comparisons]
    forward = plain.judge(comparisons, show_progress=False)
    backward = plain.judge(exchanged, show_progress=False)
    both = balanced.judge(comparisons, show_progress=False)
    flipped = balanced.judge(exchanged, show_progress=False)
    for f, b, r, fl in zip(forward, backward, both, flipped):
        (fa, fb), (ba, bb) = [[float(v) for v in x.raw.replace("log p(A)=", "").replace("log p(B)=", "").split()] for x in (f, b)]
        log_odds = ((fa - fb) - (ba - bb)) / 2
        assert r.verdict == ("A" if log_odds > 0 else "B")
        assert r.raw.startswith(f.raw) and b.raw in r.raw
        # exchanging the answers exchanges a balanced verdict exactly
        assert fl.verdict == {"A": "B", "B": "A"}[r.verdict]
