"""The comparison table of a principle_baselines run: per objective, the lr kept by the sweep, the
held-out validation after the last epoch (principle rate with its 95% Wilson interval, NLL under
the principle-prompted base, repetition), the judge's win rate against SFT and against Prompting
(95% Wilson intervals; ties counted apart), Elo with its bootstrap interval, and the mean seconds
per epoch of each phase. The principle check reads the language only, and at 135M it passes
loops and word salad; so the table also gives the share of *clean* passes (choose_lr.py: not
looping, 8 words or more, no less plausible to pi_w than pi_w's own least plausible answer),
by which choose_lr.py ranks the sweep's runs first.

    python experiments/principle_baselines/table.py outputs/principle_baselines
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from iq_lightning.evaluation.ratings import wilson_interval
from choose_lr import clean_passes, teacher_bar
from iq_lightning.validation import VALIDATION_DIR, read_summary


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open(encoding="utf-8"))) if path.exists() else []


def epoch_seconds(run_dir: Path) -> dict[str, float]:
    rows = read_csv(run_dir / "metrics" / "metrics.csv")
    out = {}
    for key in ("time/sample_s", "time/score_s", "time/train_s"):
        values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        out[key] = sum(values) / len(values) if values else float("nan")
    return out


def versus(rates: list[dict], name: str, other: str) -> str:
    """`name`'s win rate against `other`, from whichever order the pairing was written in."""
    for r in rates:
        if (r["a"], r["b"]) == (name, other):
            rate, low, high, ties = r["win_rate"], r["win_low"], r["win_high"], r["tie_rate"]
            break
        if (r["a"], r["b"]) == (other, name):
            rate, low, high, ties = r["lose_rate"], r["lose_low"], r["lose_high"], r["tie_rate"]
            break
    else:
        return "-"
    return f"{float(rate):.2f} ({float(low):.2f}-{float(high):.2f}), ties {float(ties):.2f}"


def clean(answers: Path, nll_bar: float | None) -> str:
    """Share (95% CI) of the answers in `answers` that pass the principle check cleanly."""
    counted = clean_passes(answers, nll_bar)
    if counted is None:
        return "-"
    k, n = counted
    lo, hi = wilson_interval(k, n)
    return f"{k / n:.2f} ({lo:.2f}-{hi:.2f})"


def validation_cells(run_dir: Path) -> str:
    policy = [r for r in read_summary(run_dir) if r["who"] == "policy"]
    last = policy[-1]
    n = last["answers"]
    lo, hi = wilson_interval(round(last["principle_rate"] * n), n)
    passes = clean(run_dir / VALIDATION_DIR / f"epoch_{last['epoch']:03d}.jsonl", teacher_bar(run_dir))
    return f"{last['principle_rate']:.2f} ({lo:.2f}-{hi:.2f}, n={n}) | {passes} | {last['nll_w']:.3f} | {last['repetition']:.3f}"


def main(out: Path) -> None:
    selected = [line.split("\t") for line in (out / "selected.tsv").read_text().splitlines() if line.strip()]
    results = out / "evaluate" / "results"
    rates = read_csv(results / "win_rates.csv")
    elo = {r["contestant"]: r for r in read_csv(results / "elo.csv")}
    quality = {r["metric"]: r["value"] for r in read_csv(results / "judge_quality.csv")}
    if quality:
        print("Judge: " + ", ".join(f"{k} {v}" for k, v in quality.items()) + "\n")

    def elo_cell(name: str) -> str:
        r = elo.get(name)
        return f"{float(r['elo']):.0f} ({float(r['low']):.0f}-{float(r['high']):.0f})" if r else "-"

    print("| objective | lr | principle rate (95% CI) | clean passes (95% CI) | NLL under pi_w | repetition "
          "| win rate vs SFT | win rate vs Prompting | Elo (95% CI) | s/epoch: sample + score + train |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = teacher = answers_of = None
    for name, run_dir, lr in selected:
        run_dir = Path(run_dir)
        rows = read_summary(run_dir)
        base = base or next((r for r in rows if r["who"] == "policy" and r["epoch"] == -1), None)
        teacher = teacher or next((r for r in rows if r["who"] == "teacher"), None)
        answers_of = answers_of or run_dir / VALIDATION_DIR  # every run answers the same held-out prompts at epoch -1
        t = epoch_seconds(run_dir)
        print(f"| {name} | {lr} | {validation_cells(run_dir)} | {versus(rates, name, 'sft')} | {versus(rates, name, 'prompting')} "
              f"| {elo_cell(name)} | {t['time/sample_s']:.1f} + {t['time/score_s']:.1f} + {t['time/train_s']:.1f} |")
    if base is not None:
        print(f"| SFT (untrained; validation epoch -1) | - | {base['principle_rate']:.2f} | {clean(answers_of / 'epoch_-01.jsonl', teacher_bar(answers_of.parent))} "
              f"| {base['nll_w']:.3f} | {base['repetition']:.3f} "
              f"| - | {versus(rates, 'sft', 'prompting')} | {elo_cell('sft')} | |")
    if teacher is not None:
        print(f"| Prompting (base + principle) | - | {teacher['principle_rate']:.2f} | {clean(answers_of / 'teacher.jsonl', teacher_bar(answers_of.parent))} "
              f"| {teacher['nll_w']:.3f} | {teacher['repetition']:.3f} "
              f"| {versus(rates, 'prompting', 'sft')} | - | {elo_cell('prompting')} | |")

    print("\nEvery run of the sweep (held-out validation after the last epoch):\n")
    print("| objective | lr | principle rate (95% CI) | clean passes | NLL under pi_w | repetition |")
    print("| --- | --- | --- | --- | --- | --- |")
    for objective_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "evaluate"):
        for run_dir in sorted(objective_dir.glob("lr*")):
            if read_summary(run_dir):
                print(f"| {objective_dir.name} | {run_dir.name.removeprefix('lr')} | {validation_cells(run_dir)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
