"""The judge, measured before its verdicts are used.

Three measurements, each on comparisons the evaluation itself provides:

1. Position bias: real matches (pairs of the contestants' answers to one prompt) judged in both
   shown orders, each order on its own (`Judge.judge_one_order`; a balanced likelihood judge is
   read before its two orders are averaged). The share of decided verdicts that pick position A,
   per order and over both; with a likelihood judge also the mean log-odds for A (nats).
2. Swap consistency: the share of those matches where both orders pick the same answer (or both
   call a tie).
3. Control accuracy: the judge (as used, balanced if configured) compares an intact answer with
   a corrupted copy of the same answer, intact shown first in half of them (seeded), for three
   corruptions: its words shuffled, its opening phrase looped to the same length, and the answer
   cut after its first third. It must prefer the intact one; a tie or an invalid reply counts as
   a failure. Intact answers are contestants' answers of at least `min_words` words that do not
   loop themselves (repetition <= `max_repetition`), drawn in turn from every contestant.

Thresholds (`JudgeCheckSpec`), below which every verdict is marked UNRELIABLE:
- control accuracy >= 0.8: the corruptions are gross; a judge that misses one in five of them
  cannot be trusted with the subtler differences between two contestants. Chance is 0.5.
- swap consistency >= 0.6: a judge guessing at random is consistent half the time; GPT-4 with
  the MT-Bench pairwise prompt was consistent in 65% of matches (Zheng et al. 2023, Table 2).
- position-A share, both orders together, within 0.5 +- 0.2: without ties this follows from a
  consistency of 0.6 (a consistent match contributes one A and one B); stated on its own so a
  judge that ties a lot is held to it too.
- each measured on at least `min_checked` comparisons, else it counts as not measured, and an
  unmeasured judge is unreliable too.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from iq_lightning.files import append_jsonl, read_jsonl
from iq_lightning.evaluation.judges import Comparison, Judge, JudgeReply, map_back, swap_orders
from iq_lightning.evaluation.ratings import wilson_interval
from iq_lightning.evaluation.spec import JudgeCheckSpec
from iq_lightning.text_quality import repetition

CORRUPTIONS = ("shuffled", "looped", "truncated")
CORRUPTION_LABELS = {"shuffled": "words shuffled", "looped": "opening phrase looped", "truncated": "cut after a third"}


# --- the control set ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Control:
    contestant: str
    prompt_id: str
    kind: str  # one of CORRUPTIONS
    conversation: tuple
    intact: str
    corrupted: str


def corrupt(text: str, kind: str, rng: np.random.Generator) -> str:
    """A corrupted copy of `text` (whitespace-separated tokens, punctuation kept with its word):
    shuffled: the same tokens in a random order (never the original order);
    looped: the first max(2, min(6, n // 3)) tokens repeated to the original n tokens;
    truncated: the text cut after its first max(1, n // 3) tokens, formatting kept."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    tokens = [text[a:b] for a, b in spans]
    n = len(tokens)
    if n < 2:
        raise ValueError("need at least two words to corrupt")
    if kind == "shuffled":
        order = rng.permutation(n)
        shuffled = [tokens[i] for i in order]
        if shuffled == tokens:
            shuffled = tokens[1:] + tokens[:1]
        return " ".join(shuffled)
    if kind == "looped":
        phrase = tokens[: max(2, min(6, n // 3))]
        return " ".join((phrase * (n // len(phrase) + 1))[:n])
    if kind == "truncated":
        return text[: spans[max(1, n // 3) - 1][1]]
    raise ValueError(f"unknown corruption {kind!r} (known: {', '.join(CORRUPTIONS)})")


def control_set(
    answers: Mapping[str, Mapping[str, dict]], count: int, min_words: int = 8, max_repetition: float = 0.2, seed: int = 0
) -> list[Control]:
    """Up to `count` intact answers, taken in turn from each contestant (each one's eligible
    answers in a seeded random order), each corrupted every way of CORRUPTIONS."""
    rng = np.random.default_rng(seed)
    queues = []
    for name in sorted(answers):
        eligible = [
            (name, pid, row) for pid, row in sorted(answers[name].items())
            if len(row["response"].split()) >= max(2, min_words) and repetition(row["response"]) <= max_repetition
        ]
        queues.append([eligible[i] for i in rng.permutation(len(eligible))])
    chosen = []
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    controls = []
    for i, (name, pid, row) in enumerate(chosen):
        answer_rng = np.random.default_rng([seed, i])
        for kind in CORRUPTIONS:
            controls.append(Control(name, pid, kind, tuple(row["messages"]), row["response"], corrupt(row["response"], kind, answer_rng)))
    return controls


# --- cached judging ----------------------------------------------------------------------------


class ReplyCache:
    """Replies of one judge keyed by what was shown (conversation, both answers) and how it was
    asked (one order, or as the judge is used), so a rerun asks nothing again."""

    def __init__(self, path: Path | None, judge: Judge):
        self.path, self.judge = path, judge
        self.judge_id = hashlib.sha256(json.dumps(judge.fingerprint(), sort_keys=True, default=str).encode()).hexdigest()[:12]
        # A kill mid-append leaves a torn last line: dropped (and asked again), never fatal.
        self.records: dict[str, dict] = {record["key"]: record for record in read_jsonl(path)} if path is not None else {}

    def _key(self, mode: str, c: Comparison) -> str:
        shown = json.dumps([self.judge_id, mode, list(c.conversation), c.first, c.second], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(shown.encode()).hexdigest()[:24]

    def replies(self, mode: str, comparisons: Sequence[Comparison], show_progress: bool = False) -> list[JudgeReply]:
        """mode one_order: `judge.judge_one_order`; final: `judge.judge` (as the verdicts are made)."""
        keys = [self._key(mode, c) for c in comparisons]
        missing = [(k, c) for k, c in zip(keys, comparisons) if k not in self.records]
        missing = list({k: c for k, c in missing}.items())
        if missing:
            ask = self.judge.judge_one_order if mode == "one_order" else self.judge.judge
            got = ask([c for _, c in missing], show_progress)
            new = [{"key": k, "mode": mode, "verdict": r.verdict, "raw": r.raw, "log_odds": r.log_odds} for (k, _), r in zip(missing, got)]
            if self.path is not None:
                append_jsonl(self.path, new)
            self.records.update({r["key"]: r for r in new})
        return [JudgeReply(self.records[k]["verdict"], self.records[k]["raw"], self.records[k].get("log_odds")) for k in keys]


# --- the measurement ---------------------------------------------------------------------------


def _share(count: int, n: int) -> float:
    return count / n if n else float("nan")


@dataclass(frozen=True)
class JudgeQuality:
    judge: str
    spec: JudgeCheckSpec
    matches: int  # real matches judged in both orders with valid verdicts
    position_a_first: float  # share of decided single-order verdicts for position A, first contestant shown first
    position_a_second: float  # ... second contestant shown first
    position_a: float  # both orders together
    decided: int  # decided (A or B) single-order verdicts behind position_a
    position_log_odds: float | None  # mean single-order log p(A) - log p(B) in nats (likelihood judges)
    consistency: float
    controls: int
    control_correct: int
    control_by_kind: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (correct, n)
    balanced: bool = False

    @property
    def control_accuracy(self) -> float:
        return _share(self.control_correct, self.controls)

    @property
    def problems(self) -> list[str]:
        """What fails, in words; empty for a judge that clears every bar."""
        s, found = self.spec, []
        if self.controls < s.min_checked:
            found.append(f"control set not measured ({self.controls} comparisons, at least {s.min_checked} needed: too few answers of {s.min_words}+ words)")
        elif not self.control_accuracy >= s.min_control_accuracy:
            found.append(f"control accuracy {self.control_accuracy:.0%} < {s.min_control_accuracy:.0%}: it does not reliably prefer an intact answer to a shuffled, looped or truncated copy")
        if self.matches < s.min_checked:
            found.append(f"position bias not measured ({self.matches} matches judged in both orders, at least {s.min_checked} needed)")
        else:
            if not self.consistency >= s.min_consistency:
                found.append(f"swap consistency {self.consistency:.0%} < {s.min_consistency:.0%}: showing the answers the other way round changes its verdict")
            if self.decided < s.min_checked:
                found.append(f"position bias not measured: {self.decided} of its {2 * self.matches} single-order verdicts picked an answer (the rest were ties)")
            elif abs(self.position_a - 0.5) > s.max_position_bias:
                found.append(
                    f"position A chosen in {self.position_a:.0%} of its single-order verdicts "
                    f"(allowed {0.5 - s.max_position_bias:.0%}-{0.5 + s.max_position_bias:.0%})"
                )
        return found

    @property
    def reliable(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        return "reliable" if self.reliable else "UNRELIABLE JUDGE"

    def note(self) -> str:
        """One line for plot titles."""
        core = f"judge {self.judge}: control {self.control_accuracy:.0%}, consistency {self.consistency:.0%}, position A {self.position_a:.0%}"
        return ("UNRELIABLE JUDGE - " if not self.reliable else "") + core.replace("nan%", "n/a")

    def metrics(self) -> dict[str, float]:
        """Flat numbers for W&B."""
        found = {
            "judge/reliable": float(self.reliable), "judge/control_accuracy": self.control_accuracy, "judge/controls": float(self.controls),
            "judge/consistency": self.consistency, "judge/position_a": self.position_a, "judge/position_a_first": self.position_a_first,
            "judge/position_a_second": self.position_a_second, "judge/matches_both_orders": float(self.matches),
        }
        for kind, (correct, n) in self.control_by_kind.items():
            found[f"judge/control_{kind}"] = _share(correct, n)
        if self.position_log_odds is not None:
            found["judge/position_log_odds"] = self.position_log_odds
        return found

    def markdown(self, criteria: str | None = None, tie_margin: float | None = None, ties: tuple[int, int] | None = None) -> list[str]:
        """The judge block that opens summary.md: a banner when unreliable, then every figure
        against its threshold. `ties`: (verdicts within the tie margin, all valid verdicts)."""
        s = self.spec
        lines = []
        if not self.reliable:
            lines += [
                "> **UNRELIABLE JUDGE: the win rates, Elo ratings and plots below are not evidence that any contestant is better.**",
                ">",
                *[f"> - {p}" for p in self.problems],
                "",
            ]
        lines += [f"## Judge: {self.judge} ({self.status})", ""]
        if criteria:
            lines += [f"Criteria: {criteria}", ""]

        def pct(x: float) -> str:
            return "n/a" if x != x else f"{x:.0%}"

        def ci(k: int, n: int) -> str:
            low, high = wilson_interval(k, n)
            return "" if n == 0 else f"{low:.0%}-{high:.0%}"

        def verdict(ok: bool, counted: int | None = None) -> str:
            if counted is not None and counted < s.min_checked:  # the value may look fine: the count is what fails
                return f"**FAIL**: too few to measure ({counted} < {s.min_checked})"
            return "pass" if ok else "**FAIL**"

        lines += ["| check | value | 95% CI | n | bar | |", "|---|---|---|---|---|---|"]
        control_ok = self.controls >= s.min_checked and self.control_accuracy >= s.min_control_accuracy
        lines.append(
            f"| control: prefers the intact answer to a corrupted copy | {pct(self.control_accuracy)} | {ci(self.control_correct, self.controls)} "
            f"| {self.controls} | >= {s.min_control_accuracy:.0%} | {verdict(control_ok, self.controls)} |"
        )
        for kind, (correct, n) in self.control_by_kind.items():
            lines.append(f"| - {CORRUPTION_LABELS.get(kind, kind)} | {pct(_share(correct, n))} | {ci(correct, n)} | {n} | | |")
        measured = self.matches >= s.min_checked
        lines.append(
            f"| swap consistency: same answer in both orders | {pct(self.consistency)} | {ci(round(self.consistency * self.matches) if self.matches else 0, self.matches)} "
            f"| {self.matches} | >= {s.min_consistency:.0%} | {verdict(measured and self.consistency >= s.min_consistency, self.matches)} |"
        )
        lines.append(f"| position A chosen, first contestant shown first | {pct(self.position_a_first)} | | | | |")
        lines.append(f"| position A chosen, second contestant shown first | {pct(self.position_a_second)} | | | | |")
        band_ok = measured and self.decided >= s.min_checked and abs(self.position_a - 0.5) <= s.max_position_bias
        lines.append(
            f"| position A chosen, both orders | {pct(self.position_a)} | | {self.decided} "
            f"| {0.5 - s.max_position_bias:.0%}-{0.5 + s.max_position_bias:.0%} | {verdict(band_ok, min(self.matches, self.decided))} |"
        )
        if self.position_log_odds is not None:
            lines.append(f"| mean log p(A) - log p(B), single order: preference for position A | {self.position_log_odds:+.2f} nats | | {2 * self.matches} | | |")
        if ties is not None and tie_margin is not None:
            within, total = ties
            lines.append(f"| verdicts within the tie margin ({tie_margin:g} nats): ties | {pct(_share(within, total))} | | {total} | | |")
        lines.append("")
        if self.balanced:
            lines += [
                "The verdicts used average the judge's log-odds over both orders of each match (balanced), which cancels a "
                "constant preference for one position; the single-order figures above show how much of each raw verdict was "
                "position rather than content, and the control set is judged balanced, as the matches are.",
                "",
            ]
        return lines


def position_figures(pairs: Sequence[tuple[JudgeReply, JudgeReply]]) -> dict:
    """From (first contestant shown first, second contestant shown first) single-order replies
    of each match: position-A shares per order and together, swap consistency, mean log-odds."""
    valid = [(x, y) for x, y in pairs if x.verdict != "invalid" and y.verdict != "invalid"]
    consistent = sum(x.verdict == map_back(y.verdict, True) for x, y in valid)
    first = [x.verdict for x, _ in valid if x.verdict in ("A", "B")]
    second = [y.verdict for _, y in valid if y.verdict in ("A", "B")]
    odds = [r.log_odds for pair in valid for r in pair]
    return {
        "matches": len(valid),
        "consistency": _share(consistent, len(valid)),
        "position_a_first": _share(first.count("A"), len(first)),
        "position_a_second": _share(second.count("A"), len(second)),
        "position_a": _share(first.count("A") + second.count("A"), len(first) + len(second)),
        "decided": len(first) + len(second),
        "position_log_odds": float(np.mean(odds)) if odds and all(o is not None for o in odds) else None,
    }


def measure_judge(
    judge: Judge,
    matches: Sequence[Comparison],
    controls: Sequence[Control],
    spec: JudgeCheckSpec = JudgeCheckSpec(),
    seed: int = 0,
    cache_path: Path | None = None,
    show_progress: bool = False,
) -> JudgeQuality:
    """Position bias and swap consistency on `matches` (each shown as given, then exchanged,
    one order at a time), control accuracy on `controls` (judged as the verdicts are made)."""
    cache = ReplyCache(cache_path, judge)
    exchanged = [Comparison(c.conversation, c.second, c.first) for c in matches]
    replies = cache.replies("one_order", list(matches) + exchanged, show_progress) if matches else []
    figures = position_figures(list(zip(replies[: len(matches)], replies[len(matches) :])))

    swaps = swap_orders(len(controls), seed).tolist()
    shown = [Comparison(c.conversation, c.corrupted, c.intact) if s else Comparison(c.conversation, c.intact, c.corrupted) for c, s in zip(controls, swaps)]
    verdicts = [map_back(r.verdict, s) for r, s in zip(cache.replies("final", shown, show_progress), swaps)] if controls else []
    correct = [v == "A" for v in verdicts]  # "A" after mapping back: the intact answer
    by_kind = {}
    for kind in CORRUPTIONS:
        marks = [ok for ok, c in zip(correct, controls) if c.kind == kind]
        if marks:
            by_kind[kind] = (sum(marks), len(marks))
    return JudgeQuality(
        judge=judge.describe(), spec=spec, controls=len(controls), control_correct=sum(correct), control_by_kind=by_kind,
        balanced=bool(getattr(judge, "balanced", False)), **figures,
    )


def sample_matches(
    planned: Sequence[tuple[str, str, str]], answers: Mapping[str, Mapping[str, dict]], count: int, seed: int
) -> list[Comparison]:
    """Up to `count` of the (a, b, prompt id) matches, seeded, as comparisons with a shown first."""
    rng = np.random.default_rng(seed)
    picked = sorted(rng.permutation(len(planned))[:count].tolist()) if planned else []
    found = []
    for i in picked:
        a, b, pid = planned[i]
        found.append(Comparison(tuple(answers[a][pid]["messages"]), answers[a][pid]["response"], answers[b][pid]["response"]))
    return found


def tie_share(log_odds: Sequence[float | None], margin: float) -> tuple[int, int] | None:
    """(verdicts whose |log-odds| is below `margin`, verdicts with log-odds), or None when the
    judge gives no log-odds (an API judge)."""
    known = [abs(x) for x in log_odds if x is not None and not math.isnan(x)]
    if not known:
        return None
    return sum(x < margin for x in known), len(known)
