"""Matches between contestants: which pairs meet, in which shown order, and the judge's verdicts,
cached in judgments.jsonl so that re-running judges only what is new."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from iq_lightning.files import append_jsonl, read_jsonl, write_jsonl_atomic
from iq_lightning.evaluation.judges import Comparison, Judge, map_back, swap_orders

CHUNK = 16  # the bar moves and the cache grows every 16 verdicts; the judge batches within a chunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judgment:
    prompt_id: str
    category: str | None
    a: str
    b: str
    swapped: bool  # b's answer was shown as assistant A
    verdict: str  # about a against b: A (a better), B, tie, invalid
    raw: str
    log_odds: float | None = None  # a likelihood judge's log-odds for the shown A over B (nats)


def pairings(names: Sequence[str], reference: str, mode: str) -> list[tuple[str, str]]:
    """all: every pair once (what Elo needs); reference: each contestant against the reference."""
    if mode == "reference":
        return [(n, reference) for n in names if n != reference]
    return list(itertools.combinations(names, 2))


def _fingerprint(judge: Judge) -> str:
    return hashlib.sha256(json.dumps(judge.fingerprint(), sort_keys=True, default=str).encode()).hexdigest()[:12]


def judge_pairings(
    judge: Judge,
    pairs: Sequence[tuple[str, str]],
    answers: dict[str, dict[str, dict]],
    answer_keys: dict[str, str],
    seed: int,
    cache_path: Path,
    show_progress: bool = True,
) -> list[Judgment]:
    """Every pair judged on the prompts both answered, each in its seeded shown order."""
    judge_id = _fingerprint(judge)
    # A kill mid-append leaves a torn last line: dropped (and judged again), never fatal.
    cached: dict[str, dict] = {record["key"]: record for record in read_jsonl(cache_path)}

    planned = []  # (cache key, a, b, prompt id, swapped)
    for a, b in pairs:
        ids = [i for i in answers[a] if i in answers[b]]
        # The order depends on the pair, not on which other pairs are judged in this run.
        swaps = swap_orders(len(ids), seed + zlib.crc32(f"{a}\x00{b}".encode()))
        for prompt_id, swapped in zip(ids, swaps.tolist()):
            key = "|".join((judge_id, answer_keys[a], answer_keys[b], prompt_id, str(swapped)))
            planned.append((key, a, b, prompt_id, swapped))

    missing = [p for p in planned if p[0] not in cached]
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    # Judged in chunks, each appended at once: an interrupted evaluation keeps what it judged.
    log.info("judging %d matches (%d of %d cached in %s)", len(missing), len(planned) - len(missing), len(planned), cache_path)
    bar = tqdm(total=len(missing), desc="judging", unit="match", disable=not show_progress or not missing)
    for start in range(0, len(missing), CHUNK):
        chunk = missing[start : start + CHUNK]
        comparisons = []
        for _, a, b, prompt_id, swapped in chunk:
            first, second = (b, a) if swapped else (a, b)
            comparisons.append(
                Comparison(tuple(answers[a][prompt_id]["messages"]), answers[first][prompt_id]["response"], answers[second][prompt_id]["response"])
            )
        replies = judge.judge(comparisons, show_progress=False)
        records = [
            {"key": key, "shown_verdict": reply.verdict, "raw": reply.raw, "log_odds": reply.log_odds}
            for (key, *_), reply in zip(chunk, replies)
        ]
        append_jsonl(cache_path, records)
        cached.update((record["key"], record) for record in records)
        bar.update(len(chunk))
    bar.close()

    judgments = []
    for key, a, b, prompt_id, swapped in planned:
        record = cached[key]
        judgments.append(
            Judgment(
                prompt_id, answers[a][prompt_id].get("category"), a, b, swapped, map_back(record["shown_verdict"], swapped), record["raw"],
                record.get("log_odds"),
            )
        )
    return judgments


def write_judgments(judgments: Sequence[Judgment], path: Path) -> None:
    write_jsonl_atomic(path, (asdict(j) for j in judgments))
