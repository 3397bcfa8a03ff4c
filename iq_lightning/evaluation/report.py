"""Evaluation results as files people read: CSV tables, a Markdown summary, and the same tables,
plots and credit maps in a W&B run of the training runs' project."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

from iq_lightning.config import LoggerSpec
from iq_lightning.evaluation.matches import Judgment
from iq_lightning.evaluation.ratings import EloResult, WinRate

log = logging.getLogger(__name__)

RATE_FIELDS = ["a", "b", "wins", "ties", "losses", "invalid", "win_rate", "tie_rate", "lose_rate", "win_minus_lose"]


def rate_row(a: str, b: str, r: WinRate) -> dict:
    return {
        "a": a, "b": b, "wins": r.wins, "ties": r.ties, "losses": r.losses, "invalid": r.invalid,
        "win_rate": round(r.win_rate, 4), "tie_rate": round(r.tie_rate, 4), "lose_rate": round(r.lose_rate, 4),
        "win_minus_lose": round(r.win_minus_lose, 4),
    }


def write_csv(path: Path, fields: Sequence[str], rows: Sequence[Mapping]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_summary(rates: Mapping[tuple[str, str], WinRate], elo: EloResult | None, reward: Mapping[int, float] | None) -> str:
    lines = ["# Evaluation", "", "| A | B | win | tie | lose | invalid | n |", "|---|---|---|---|---|---|---|"]
    for (a, b), r in rates.items():
        lines.append(f"| {a} | {b} | {r.win_rate:.1%} | {r.tie_rate:.1%} | {r.lose_rate:.1%} | {r.invalid} | {r.valid + r.invalid} |")
    if elo is not None:
        lines += ["", "| contestant | Elo (mean over orderings) | spread (std) |", "|---|---|---|"]
        for i in sorted(range(len(elo.players)), key=lambda i: -elo.mean[i]):
            lines.append(f"| {elo.players[i]} | {elo.mean[i]:.1f} | {elo.std[i]:.1f} |")
    if reward:
        lines += ["", "| epoch | reward increment / std |", "|---|---|"]
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
) -> None:
    """One W&B run (job_type evaluation) in the training runs' project: verdicts with prompts and
    answers, rate and Elo tables, the plots as images, the credit maps as HTML."""
    if spec.kind != "wandb":
        return
    import wandb

    run = wandb.init(
        project=spec.project, entity=spec.entity, name=spec.name or f"evaluate-{out_dir.name}", job_type="evaluation",
        dir=str(out_dir), mode=os.environ.get("WANDB_MODE") or spec.mode,
    )
    try:
        verdicts = wandb.Table(columns=["prompt_id", "category", "prompt", "a", "answer_a", "b", "answer_b", "verdict", "swapped", "judge_reply"])
        for j in judgments:
            row_a, row_b = answers[j.a][j.prompt_id], answers[j.b][j.prompt_id]
            verdicts.add_data(j.prompt_id, j.category, row_a["messages"][-1]["content"], j.a, row_a["response"], j.b, row_b["response"], j.verdict, j.swapped, j.raw)
        payload = {"verdicts": verdicts, "win_rates": wandb.Table(columns=RATE_FIELDS, data=[[r[f] for f in RATE_FIELDS] for r in rate_rows])}
        if elo is not None:
            payload["elo"] = wandb.Table(columns=["contestant", "elo", "std"], data=[[p, float(m), float(s)] for p, m, s in zip(elo.players, elo.mean, elo.std)])
        payload.update({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots})
        payload.update({f"credit/{p.parent.name}/{p.stem}": wandb.Html(p.read_text(encoding="utf-8")) for p in credit_pages})
        run.log(payload)
    finally:
        run.finish()
