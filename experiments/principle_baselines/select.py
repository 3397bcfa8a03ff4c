"""Per objective, the lr of the sweep whose held-out validation after the last epoch is best:
the highest principle rate, ties broken by the lowest NLL under pi_w (the principle-prompted
base: fluency as the teacher reads it). Prints `contestant<TAB>run_dir<TAB>lr` lines; the
objective `sft` (context distillation) becomes contestant `ctx_sft`, since evaluate.py's `sft`
is the untrained model, the paper's SFT baseline.

    python experiments/principle_baselines/select.py outputs/principle_baselines
"""

from __future__ import annotations

import sys
from pathlib import Path

from iq_lightning.validation import read_summary

CONTESTANT = {"sft": "ctx_sft"}


def final_validation(run_dir: Path) -> dict | None:
    policy = [r for r in read_summary(run_dir) if r["who"] == "policy" and r["epoch"] >= 0]
    return max(policy, key=lambda r: r["epoch"]) if policy else None


def main(out: Path) -> None:
    for objective_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "evaluate"):
        runs = [(final_validation(d), d) for d in sorted(objective_dir.glob("lr*"))]
        runs = [(v, d) for v, d in runs if v is not None]
        if not runs:
            continue
        best, run_dir = max(runs, key=lambda vd: (vd[0]["principle_rate"], -vd[0]["nll_w"]))
        name = CONTESTANT.get(objective_dir.name, objective_dir.name)
        print(f"{name}\t{run_dir}\t{run_dir.name.removeprefix('lr')}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
