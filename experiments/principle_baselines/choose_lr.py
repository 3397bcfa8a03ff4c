"""Per objective, the lr of the sweep whose held-out validation after the last epoch is best:
the most *clean* passes, then the highest principle rate, then the lowest NLL under pi_w (the
principle-prompted base: fluency as the teacher reads it). Prints `contestant<TAB>run_dir<TAB>lr`
lines; the objective `sft` (context distillation) becomes contestant `ctx_sft`, since
evaluate.py's `sft` is the untrained model, the paper's SFT baseline.

The principle check reads the language only, and at 135M it passes a phrase looped to the end,
one word and blank lines, and word salad in the right language. A clean pass also does not loop
(repetition <= MAX_REPETITION), has MIN_WORDS words or more (both evaluate.py's judge-check bars
for an answer that can be told from a corrupted copy), and is no less plausible to pi_w than the
least plausible answer pi_w gave itself to the same prompts (its NLL under pi_w at most the
largest of the teacher's, validation/teacher.jsonl).

    python experiments/principle_baselines/choose_lr.py outputs/principle_baselines
"""

from __future__ import annotations

import sys
from pathlib import Path

from iq_lightning.evaluation.spec import JudgeCheckSpec
from iq_lightning.files import read_jsonl
from iq_lightning.text_quality import words
from iq_lightning.validation import VALIDATION_DIR, read_summary

# evaluate.py's judge check: an answer of this many words, looping less than this, is one a
# corrupted copy can be told from.
MAX_REPETITION = JudgeCheckSpec.max_repetition
MIN_WORDS = JudgeCheckSpec.min_words

CONTESTANT = {"sft": "ctx_sft"}


def final_validation(run_dir: Path) -> dict | None:
    policy = [r for r in read_summary(run_dir) if r["who"] == "policy" and r["epoch"] >= 0]
    return max(policy, key=lambda r: r["epoch"]) if policy else None


def teacher_bar(run_dir: Path) -> float | None:
    """The largest NLL under pi_w of pi_w's own answers (validation/teacher.jsonl), if recorded."""
    rows = read_jsonl(run_dir / VALIDATION_DIR / "teacher.jsonl")
    return max(r["nll_w"] for r in rows) if rows else None


def clean_passes(answers: Path, nll_bar: float | None) -> tuple[int, int] | None:
    """(clean passes, answers) of a validation file (see the module docstring); None where it
    has no answers or no principle check."""
    rows = read_jsonl(answers)
    if not rows or any(r.get("passes") is None for r in rows):
        return None

    def clean(r: dict) -> bool:
        plausible = nll_bar is None or r["nll_w"] <= nll_bar
        return bool(r["passes"]) and r["repetition"] <= MAX_REPETITION and len(words(r["answer"])) >= MIN_WORDS and plausible

    return sum(clean(r) for r in rows), len(rows)


def _rank(validation: dict, run_dir: Path) -> tuple:
    counted = clean_passes(run_dir / VALIDATION_DIR / f"epoch_{validation['epoch']:03d}.jsonl", teacher_bar(run_dir))
    return (counted[0] / counted[1] if counted else 0.0, validation["principle_rate"], -validation["nll_w"])


def main(out: Path) -> None:
    for objective_dir in sorted(p for p in out.iterdir() if p.is_dir() and p.name != "evaluate"):
        runs = [(final_validation(d), d) for d in sorted(objective_dir.glob("lr*"))]
        runs = [(v, d) for v, d in runs if v is not None]
        if not runs:
            continue
        _, run_dir = max(runs, key=lambda vd: _rank(*vd))
        name = CONTESTANT.get(objective_dir.name, objective_dir.name)
        print(f"{name}\t{run_dir}\t{run_dir.name.removeprefix('lr')}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
