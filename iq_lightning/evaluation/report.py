"""Evaluation results as files people read: CSV tables, a Markdown summary, and the same tables,
plots and credit maps in a W&B run of the training runs' project."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

from iq_lightning.config import LoggerSpec
from iq_lightning.files import atomic_path
from iq_lightning.evaluation.matches import Judgment
from iq_lightning.evaluation.ratings import EloIntervals, EloResult, WinRate

log = logging.getLogger(__name__)

RATE_FIELDS = [
    "a", "b", "wins", "ties", "losses", "invalid", "win_rate", "win_low", "win_high", "tie_rate", "lose_rate", "lose_low",
    "lose_high", "win_minus_lose", "significant",
]
ELO_FIELDS = ["contestant", "elo", "low", "high", "std"]


def _significance(r: WinRate, a: str, b: str) -> str:
    return {"a": f"{a} better", "b": f"{b} better", None: "no"}[r.better]


def rate_row(a: str, b: str, r: WinRate) -> dict:
    """One pairing for the CSV: counts, rates with 95% Wilson intervals, and whether the interval
    of wins / (wins + losses) excludes 1/2 ("<a> better", "<b> better" or "no")."""
    (win_low, win_high), (lose_low, lose_high) = r.win_interval, r.lose_interval
    return {
        "a": a, "b": b, "wins": r.wins, "ties": r.ties, "losses": r.losses, "invalid": r.invalid,
        "win_rate": round(r.win_rate, 4), "win_low": round(win_low, 4), "win_high": round(win_high, 4),
        "tie_rate": round(r.tie_rate, 4), "lose_rate": round(r.lose_rate, 4), "lose_low": round(lose_low, 4),
        "lose_high": round(lose_high, 4), "win_minus_lose": round(r.win_minus_lose, 4), "significant": _significance(r, a, b),
    }


def elo_rows(elo: EloResult, intervals: EloIntervals | None) -> list[dict]:
    rows = []
    for p, m, s in zip(elo.players, elo.mean, elo.std):
        low, high = intervals.interval(p) if intervals is not None else (float("nan"), float("nan"))
        rows.append({"contestant": p, "elo": round(float(m), 2), "low": round(low, 2), "high": round(high, 2), "std": round(float(s), 2)})
    return rows


def write_csv(path: Path, fields: Sequence[str], rows: Sequence[Mapping]) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{x:.1%}"


def _interval(low: float, high: float) -> str:
    return "n/a" if low != low else f"{low:.0%}-{high:.0%}"


def markdown_summary(
    rates: Mapping[tuple[str, str], WinRate],
    elo: EloResult | None,
    reward: Mapping[int, float] | None,
    judge_block: Sequence[str] = (),
    judge_free_block: Sequence[str] = (),
    elo_intervals: EloIntervals | None = None,
    unreliable: bool = False,
    settings_block: Sequence[str] = (),
) -> str:
    """summary.md: the judge and its measured quality first (a banner when unreliable), the
    settings used and where they came from, the judge-free figures, then the judge's win rates
    and Elo with their intervals."""
    lines = ["# Evaluation", "", *judge_block, *settings_block, *judge_free_block]
    if rates:
        caveat = " (UNRELIABLE JUDGE: see the top)" if unreliable else ""
        lines += [
            f"## Win rates{caveat}",
            "",
            "Rates over the valid verdicts, one per prompt; 95% Wilson intervals. \"significant\": whether the 95% interval "
            "of wins / (wins + losses) excludes 50% (one test per pairing, no correction for their number).",
            "",
            "| A | B | A wins | 95% CI | tie | A loses | 95% CI | invalid | n | significant |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (a, b), r in rates.items():
            lines.append(
                f"| {a} | {b} | {_pct(r.win_rate)} | {_interval(*r.win_interval)} | {_pct(r.tie_rate)} | {_pct(r.lose_rate)} "
                f"| {_interval(*r.lose_interval)} | {r.invalid} | {r.valid + r.invalid} | {_significance(r, a, b)} |"
            )
    if elo is not None:
        caveat = " (UNRELIABLE JUDGE: see the top)" if unreliable else ""
        lines += [
            "",
            f"## Elo{caveat}",
            "",
            "Elo: the sequential update averaged over random orderings of the matches (Boubdir et al. 2023). The 95% "
            "interval resamples the prompts with replacement and rates again; the spread over orderings only says how "
            "much the update depends on match order and is no confidence interval.",
            "",
            "| contestant | Elo (mean over orderings) | 95% CI over prompts | spread over orderings (std) |",
            "|---|---|---|---|",
        ]
        for i in sorted(range(len(elo.players)), key=lambda i: -elo.mean[i]):
            p = elo.players[i]
            ci = "n/a"
            if elo_intervals is not None and p in elo_intervals.players:
                low, high = elo_intervals.interval(p)
                ci = f"{low:.1f}-{high:.1f}"
            lines.append(f"| {p} | {elo.mean[i]:.1f} | {ci} | {elo.std[i]:.1f} |")
        if elo_intervals is not None and elo_intervals.difference:
            lines += ["", f"Pairwise Elo differences ({elo_intervals.rounds} resamples of the prompts):", "",
                      "| A | B | Elo A - Elo B | 95% CI | significant |", "|---|---|---|---|---|"]
            index = {p: i for i, p in enumerate(elo.players)}
            for (p, q), (low, high) in elo_intervals.difference.items():
                point = elo.mean[index[p]] - elo.mean[index[q]] if p in index and q in index else float("nan")
                significant = "yes" if elo_intervals.significant(p, q) else "no"
                lines.append(f"| {p} | {q} | {point:+.1f} | {low:+.1f} to {high:+.1f} | {significant} |")
    if reward:
        lines += ["", "## Reward model", "", "| epoch | reward increment / std |", "|---|---|"]
        lines += [f"| {e} | {v:+.3f} |" for e, v in reward.items()]
    return "\n".join(lines) + "\n"


def log_to_wandb(
    spec: LoggerSpec,
    out_dir: Path,
    judgments: Sequence[Judgment],
    answers: Mapping[str, Mapping[str, dict]],
    rate_rows: Sequence[dict],
    elo: EloResult | None,
    plots: Sequence[Path],
    credit_pages: Sequence[Path],
    elo_table: Sequence[dict] = (),
    judge_metrics: Mapping[str, float] | None = None,
    judge_problems: Sequence[str] = (),
    judge_free_rows: Sequence[dict] = (),
    init_kwargs: Mapping | None = None,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """One W&B run (job_type evaluation) in the training runs' project: the judge's measured
    quality (summary numbers, and its problems as text), verdicts with prompts and answers,
    rate and Elo tables with intervals, judge-free figures, the plots as images, the credit maps
    as HTML."""
    if spec.kind != "wandb":
        return
    import wandb

    run = wandb.init(
        project=spec.project, entity=spec.entity, name=spec.name or f"evaluate-{out_dir.name}",
        dir=str(out_dir), mode=os.environ.get("WANDB_MODE") or spec.mode,
        **{"job_type": "evaluation", **(init_kwargs or {})},
    )
    try:
        verdicts = wandb.Table(columns=["prompt_id", "category", "prompt", "a", "answer_a", "b", "answer_b", "verdict", "swapped", "judge_reply"])
        for j in judgments:
            row_a, row_b = answers[j.a][j.prompt_id], answers[j.b][j.prompt_id]
            verdicts.add_data(j.prompt_id, j.category, row_a["messages"][-1]["content"], j.a, row_a["response"], j.b, row_b["response"], j.verdict, j.swapped, j.raw)
        payload = {"verdicts": verdicts, "win_rates": wandb.Table(columns=RATE_FIELDS, data=[[r[f] for f in RATE_FIELDS] for r in rate_rows])}
        if judge_metrics:
            payload.update(judge_metrics)
            run.summary["judge/status"] = "UNRELIABLE JUDGE" if judge_problems else "reliable"
            payload["judge/problems"] = wandb.Html("<br>".join(judge_problems) or "none")
        if elo is not None and elo_table:
            payload["elo"] = wandb.Table(columns=ELO_FIELDS, data=[[r[f] for f in ELO_FIELDS] for r in elo_table])
        if judge_free_rows:
            columns = list(judge_free_rows[0])
            payload["judge_free"] = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in judge_free_rows])
        payload.update({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots})
        payload.update({f"credit/{p.parent.name}/{p.stem}": wandb.Html(p.read_text(encoding="utf-8")) for p in credit_pages})
        payload.update(metrics or {})  # win rates and ratings as numbers a dashboard can chart
        run.log(payload)
    finally:
        run.finish()
