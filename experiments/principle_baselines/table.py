"""The judge-free comparison table of a principle_baselines run: for each objective, the held-out
validation after the last epoch (principle rate with its 95% Wilson interval, NLL under the
principle-prompted base, repetition) and the mean seconds per epoch of each phase.

    python experiments/principle_baselines/table.py outputs/principle_baselines/*/
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from iq_lightning.evaluation.ratings import wilson_interval
from iq_lightning.validation import read_summary


def epoch_seconds(run_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader(open(run_dir / "metrics" / "metrics.csv")))
    out = {}
    for key in ("time/sample_s", "time/score_s", "time/train_s"):
        values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        out[key] = sum(values) / len(values) if values else float("nan")
    return out


def main(dirs: list[str]) -> None:
    print("| objective | principle rate (95% CI) | NLL under pi_w | repetition | s/epoch: sample + score + train |")
    print("| --- | --- | --- | --- | --- |")
    teacher = None
    for d in map(Path, dirs):
        rows = read_summary(d)
        policy = [r for r in rows if r["who"] == "policy"]
        teacher = teacher or next((r for r in rows if r["who"] == "teacher"), None)
        if not policy:
            continue
        base = policy[0] if policy[0]["epoch"] == -1 else None
        last = policy[-1]
        n = last["answers"]
        lo, hi = wilson_interval(round(last["principle_rate"] * n), n)
        t = epoch_seconds(d)
        print(
            f"| {d.name} | {last['principle_rate']:.2f} ({lo:.2f}-{hi:.2f}, n={n}) | {last['nll_w']:.3f} | {last['repetition']:.3f} "
            f"| {t['time/sample_s']:.1f} + {t['time/score_s']:.1f} + {t['time/train_s']:.1f} |"
        )
    if base is not None:
        print(f"| base (epoch -1) | {base['principle_rate']:.2f} | {base['nll_w']:.3f} | {base['repetition']:.3f} | |")
    if teacher is not None:
        print(f"| teacher (base + principle) | {teacher['principle_rate']:.2f} | {teacher['nll_w']:.3f} | {teacher['repetition']:.3f} | |")


if __name__ == "__main__":
    main(sys.argv[1:])
