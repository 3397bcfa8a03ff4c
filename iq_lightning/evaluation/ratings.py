"""Pairwise-comparison arithmetic: win/tie/lose rates with 95% Wilson intervals, Elo ratings
(Boubdir et al. 2023) with intervals from resampling prompts (as Arena-Hard does), and whether a
pairwise difference is significant.

Pure functions over match lists; no models, no I/O. A match is (a, b, score_a) with score_a
1 (a won), 0.5 (tie) or 0 (b won).

Two kinds of spread, not to be confused:
- the spread of Elo over *orderings* of the same matches (`EloResult.std`) says how much the
  sequential update depends on the order it saw the matches in; it is no confidence interval;
- the 95% interval over *prompts* (`bootstrap_elo`) redraws the evaluation prompts with
  replacement and recomputes the ratings: how much the ratings would move on other prompts
  like these. Only that one says whether two contestants differ.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from iq_lightning.intervals import wilson_interval

Match = tuple[str, str, float]

VERDICT_SCORE = {"A": 1.0, "tie": 0.5, "B": 0.0}  # score of the first-named contestant


@dataclass(frozen=True)
class WinRate:
    """Rates over the valid verdicts of one pairing (`invalid` ones are counted, not rated)."""

    wins: int
    ties: int
    losses: int
    invalid: int

    @property
    def valid(self) -> int:
        return self.wins + self.ties + self.losses

    def rate(self, count: int) -> float:
        return count / self.valid if self.valid else float("nan")

    @property
    def win_rate(self) -> float:
        return self.rate(self.wins)

    @property
    def tie_rate(self) -> float:
        return self.rate(self.ties)

    @property
    def lose_rate(self) -> float:
        return self.rate(self.losses)

    @property
    def win_minus_lose(self) -> float:
        """The alpha-sweep figure of the paper (Fig. 7)."""
        return self.win_rate - self.lose_rate

    @property
    def win_interval(self) -> tuple[float, float]:
        """95% Wilson interval of the win rate (each verdict is one prompt)."""
        return wilson_interval(self.wins, self.valid)

    @property
    def lose_interval(self) -> tuple[float, float]:
        return wilson_interval(self.losses, self.valid)

    @property
    def decisive_interval(self) -> tuple[float, float]:
        """95% Wilson interval of wins / (wins + losses): the share of decided prompts won."""
        return wilson_interval(self.wins, self.wins + self.losses)

    @property
    def better(self) -> str | None:
        """'a' or 'b' when the 95% interval of wins / (wins + losses) excludes 1/2 (the first or
        second contestant is better, significantly), else None. One test per pairing, with no
        correction for the number of pairings."""
        low, high = self.decisive_interval
        if low > 0.5:
            return "a"
        if high < 0.5:
            return "b"
        return None


def win_rates(verdicts: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str], WinRate]:
    """(a, b, verdict) with verdict in A|B|tie|invalid (A = a better) -> rates of a against b.

    Each unordered pairing is reported once, in the orientation first seen."""
    counts: dict[tuple[str, str], list[int]] = {}
    for a, b, verdict in verdicts:
        if (b, a) in counts:
            a, b, verdict = b, a, {"A": "B", "B": "A"}.get(verdict, verdict)
        c = counts.setdefault((a, b), [0, 0, 0, 0])
        c[{"A": 0, "tie": 1, "B": 2}.get(verdict, 3)] += 1
    return {pair: WinRate(*c) for pair, c in counts.items()}


def flip(rate: WinRate) -> WinRate:
    """The same pairing seen from the other side."""
    return WinRate(rate.losses, rate.ties, rate.wins, rate.invalid)


def matches_from_verdicts(verdicts: Iterable[tuple[str, str, str]]) -> list[Match]:
    """Valid verdicts as Elo matches (invalid ones carry no outcome)."""
    return [(a, b, VERDICT_SCORE[v]) for a, b, v in verdicts if v in VERDICT_SCORE]


def elo_sequence(matches: Sequence[Match], k: float = 16.0, initial: float = 1000.0) -> tuple[list[str], np.ndarray]:
    """Sequential Elo over `matches` in the given order.

    E_a = 1 / (1 + 10^((R_b - R_a) / 400));  R_a += K (S_a - E_a);  R_b += K (E_a - S_a).
    Returns the players (sorted) and their ratings after every match, shape (len(matches)+1, players)."""
    players = sorted({m[0] for m in matches} | {m[1] for m in matches})
    index = {p: i for i, p in enumerate(players)}
    ratings = np.full(len(players), initial, dtype=np.float64)
    history = np.empty((len(matches) + 1, len(players)))
    history[0] = ratings
    for step, (a, b, score_a) in enumerate(matches, start=1):
        ia, ib = index[a], index[b]
        expected_a = 1.0 / (1.0 + 10.0 ** ((ratings[ib] - ratings[ia]) / 400.0))
        ratings[ia] += k * (score_a - expected_a)
        ratings[ib] -= k * (score_a - expected_a)
        history[step] = ratings
    return players, history


def elo_lanes(
    first: np.ndarray, second: np.ndarray, score: np.ndarray, active: np.ndarray, players: int,
    k: float = 16.0, initial: float = 1000.0, keep_mean_history: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Many independent sequential Elo runs ("lanes") at once: row l of the (L, S) arrays is lane
    l's match sequence (player indices, score of the first, whether the step is a match or
    padding). The update is `elo_sequence`'s. Returns the final ratings (L, players) and, with
    `keep_mean_history`, the mean over lanes after every step (S + 1, players)."""
    lanes, steps = first.shape
    ratings = np.full((lanes, players), float(initial))
    rows = np.arange(lanes)
    history = [ratings.mean(0)] if keep_mean_history else None
    for step in range(steps):
        ia, ib = first[:, step], second[:, step]
        expected_a = 1.0 / (1.0 + 10.0 ** ((ratings[rows, ib] - ratings[rows, ia]) / 400.0))
        delta = k * (score[:, step] - expected_a) * active[:, step]
        ratings[rows, ia] += delta
        ratings[rows, ib] -= delta
        if history is not None:
            history.append(ratings.mean(0))
    return ratings, (np.stack(history) if history is not None else None)


def _lane_arrays(matches: Sequence[Match], index: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    first = np.array([index[m[0]] for m in matches], dtype=np.intp)
    second = np.array([index[m[1]] for m in matches], dtype=np.intp)
    score = np.array([m[2] for m in matches], dtype=np.float64)
    return first, second, score


@dataclass(frozen=True)
class EloResult:
    players: list[str]
    mean: np.ndarray  # final rating, mean over orderings
    std: np.ndarray  # its spread over orderings (order dependence, not a confidence interval)
    progression: np.ndarray  # (matches+1, players): rating after each match, mean over orderings


def elo_ratings(
    matches: Sequence[Match], k: float = 16.0, initial: float = 1000.0, permutations: int = 1000, seed: int = 0
) -> EloResult:
    """Elo made robust to match order (Boubdir et al. 2023): the sequential update run over many
    random orderings of the same matches; the rating is the mean over orderings, with its spread."""
    if not matches:
        raise ValueError("no valid matches to rate")
    players = sorted({m[0] for m in matches} | {m[1] for m in matches})
    first, second, score = _lane_arrays(matches, {p: i for i, p in enumerate(players)})
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((permutations, len(matches))), axis=1)  # a random permutation per lane
    finals, history = elo_lanes(first[order], second[order], score[order], np.ones(order.shape), len(players), k, initial, True)
    return EloResult(players, finals.mean(0), finals.std(0), history)


@dataclass(frozen=True)
class EloIntervals:
    """95% percentile intervals of the (ordering-mean) Elo over resamples of the prompts, and of
    every pairwise difference: `difference[(p, q)]` = (low, high) of R_p - R_q."""

    players: list[str]
    low: np.ndarray
    high: np.ndarray
    difference: dict[tuple[str, str], tuple[float, float]]
    rounds: int

    def interval(self, player: str) -> tuple[float, float]:
        i = self.players.index(player)
        return float(self.low[i]), float(self.high[i])

    def significant(self, p: str, q: str) -> bool:
        """Whether the 95% interval of R_p - R_q excludes 0."""
        low, high = self.difference[(p, q)] if (p, q) in self.difference else tuple(-x for x in reversed(self.difference[(q, p)]))
        return low > 0 or high < 0


def bootstrap_elo(
    matches_by_prompt: Mapping[str, Sequence[Match]],
    k: float = 16.0,
    initial: float = 1000.0,
    rounds: int = 1000,
    orderings: int = 20,
    seed: int = 0,
    level: float = 0.95,
) -> EloIntervals:
    """Intervals from resampling prompts (Arena-Hard's bootstrap): each round draws as many
    prompts as there are, with replacement, takes all matches of the drawn prompts (a prompt drawn
    twice counts twice), and rates them as `elo_ratings` does, averaged over `orderings` random
    orders; the interval is the central `level` share of the rounds' ratings (percentiles).
    Deterministic for a given seed."""
    prompts = [p for p in sorted(matches_by_prompt) if matches_by_prompt[p]]
    if not prompts:
        raise ValueError("no valid matches to rate")
    players = sorted({m[i] for p in prompts for m in matches_by_prompt[p] for i in (0, 1)})
    index = {p: i for i, p in enumerate(players)}
    per_prompt = [_lane_arrays(matches_by_prompt[p], index) for p in prompts]
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(prompts), size=(rounds, len(prompts)))
    lengths = np.array([sum(len(per_prompt[j][0]) for j in row) for row in drawn])
    steps = int(lengths.max())
    lanes = rounds * orderings
    first = np.zeros((lanes, steps), dtype=np.intp)
    second = np.zeros((lanes, steps), dtype=np.intp)
    score = np.zeros((lanes, steps))
    active = np.zeros((lanes, steps))
    for r, row in enumerate(drawn):
        f = np.concatenate([per_prompt[j][0] for j in row])
        s = np.concatenate([per_prompt[j][1] for j in row])
        sc = np.concatenate([per_prompt[j][2] for j in row])
        n = len(f)
        # each of the round's lanes plays the same matches in its own random order, padding after
        order = np.argsort(rng.random((orderings, n)), axis=1)
        block = slice(r * orderings, (r + 1) * orderings)
        first[block, :n], second[block, :n], score[block, :n], active[block, :n] = f[order], s[order], sc[order], 1.0
        first[block, n:], second[block, n:] = 0, 1 % len(players)
    finals, _ = elo_lanes(first, second, score, active, len(players), k, initial)
    per_round = finals.reshape(rounds, orderings, len(players)).mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(per_round, [tail, 100 - tail], axis=0)
    difference = {}
    for i, p in enumerate(players):
        for j in range(i + 1, len(players)):
            d = per_round[:, i] - per_round[:, j]
            lo, hi = np.percentile(d, [tail, 100 - tail])
            difference[(p, players[j])] = (float(lo), float(hi))
    return EloIntervals(players, low, high, difference, rounds)


def gaussian_smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smoothed copy along axis 0 (edges reflected), for the Elo progression curve."""
    values = np.asarray(values, dtype=np.float64)
    if sigma <= 0 or len(values) < 2:
        return values.copy()
    radius = min(int(4 * sigma + 0.5), len(values) - 1)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(values, [(radius, radius)] + [(0, 0)] * (values.ndim - 1), mode="reflect")
    columns = padded.reshape(len(padded), -1)
    smoothed = np.stack([np.convolve(col, kernel, mode="valid") for col in columns.T], axis=1)
    return smoothed.reshape(values.shape)


def per_category(verdicts: Iterable[tuple[str, str, str, str]]) -> dict[str, dict[tuple[str, str], WinRate]]:
    """(category, a, b, verdict) -> category -> win rates of each pairing."""
    grouped: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for category, a, b, verdict in verdicts:
        grouped[category].append((a, b, verdict))
    return {c: win_rates(v) for c, v in sorted(grouped.items())}
