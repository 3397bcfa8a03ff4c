"""Another principle's rate over a finished run's held-out answers: validation checks one
principle (the first of guide.principles), but it stores every answer, so any judge-free check
can be applied afterwards. Prints, per validation (the base at epoch -1, the teacher, each epoch),
the share of answers passing each named principle's check (principle_check.default_check_for).

    python experiments/tradeoff/recheck.py RUN_DIR "Always reply in French, whatever language the user writes in." "Answer in one sentence."
"""

from __future__ import annotations

import sys
from pathlib import Path

from iq_lightning.files import read_jsonl
from iq_lightning.principle_check import default_check_for, principle_rate
from iq_lightning.validation import VALIDATION_DIR


def rates(run_dir: Path, principles: list[str]) -> list[tuple[str, list[float | None]]]:
    """(who, one rate per principle) for the teacher and every validated epoch, in order."""
    checks = [default_check_for(p) for p in principles]
    files = [("teacher", run_dir / VALIDATION_DIR / "teacher.jsonl")]
    files += [(f"epoch {p.stem.removeprefix('epoch_')}", p) for p in sorted((run_dir / VALIDATION_DIR).glob("epoch_*.jsonl"))]
    out = []
    for who, path in files:
        answers = [r["answer"] for r in read_jsonl(path)]
        if answers:
            out.append((who, [principle_rate(check, answers) for check in checks]))
    return out


def main(run_dir: Path, principles: list[str]) -> None:
    print("| answers | " + " | ".join(f"{p} ({default_check_for(p).name})" for p in principles) + " |")
    print("|---" * (len(principles) + 1) + "|")
    for who, values in rates(run_dir, principles):
        print(f"| {who} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2:])
