"""Pairwise-comparison arithmetic: win/tie/lose rates and Elo ratings (Boubdir et al. 2023).

Pure functions over match lists; no models, no I/O. A match is (a, b, score_a) with score_a
1 (a won), 0.5 (tie) or 0 (b won).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

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


@dataclass(frozen=True)
class EloResult:
    players: list[str]
    mean: np.ndarray  # final rating, mean over orderings
    std: np.ndarray  # its spread over orderings
    progression: np.ndarray  # (matches+1, players): rating after each match, mean over orderings


def elo_ratings(
    matches: Sequence[Match], k: float = 16.0, initial: float = 1000.0, permutations: int = 1000, seed: int = 0
) -> EloResult:
    """Elo made robust to match order (Boubdir et al. 2023): the sequential update run over many
    random orderings of the same matches; the rating is the mean over orderings, with its spread."""
    if not matches:
        raise ValueError("no valid matches to rate")
    rng = np.random.default_rng(seed)
    finals, progressions = [], []
    for _ in range(permutations):
        order = rng.permutation(len(matches))
        players, history = elo_sequence([matches[i] for i in order], k, initial)
        finals.append(history[-1])
        progressions.append(history)
    finals_arr = np.stack(finals)
    return EloResult(players, finals_arr.mean(0), finals_arr.std(0), np.stack(progressions).mean(0))


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
