"""The principle_baselines recipe's own scripts, run as run.sh runs them (a fresh interpreter whose
first path entry is the script's folder), over run directories written here."""

import csv
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SCRIPTS = REPO / "experiments" / "principle_baselines"
LOOP = "la cuisine en mode, la cuisine en mode, la cuisine en mode, la cuisine en mode"
FLUENT = "Je vous conseille de prendre des chaussures solides et une veste de pluie"


def _run_dir(root: Path, objective: str, lr: str, answers: list[tuple[str, bool]], nll: float) -> Path:
    """A run whose answers are (text, passes) or (text, passes, NLL under pi_w); the teacher's
    answers are FLUENT at NLL 0.5 and 1.4, so 1.4 is the plausibility bar of a clean pass."""
    from iq_lightning.text_quality import repetition

    run = root / objective / f"lr{lr}"
    (run / "validation").mkdir(parents=True)
    answers = [(*a, 1.0)[:3] for a in answers]
    rows = [{"epoch": 3, "prompt_id": f"p{i}", "answer": a, "passes": p, "repetition": repetition(a), "nll_w": w} for i, (a, p, w) in enumerate(answers)]
    (run / "validation" / "epoch_003.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rate = sum(p for _, p, _ in answers) / len(answers)
    summary = [
        {"epoch": -1, "who": "policy", "principle_rate": 0.0, "nll_w": 0.8, "repetition": 0.05, "answers": len(answers)},
        {"epoch": -1, "who": "teacher", "principle_rate": 0.5, "nll_w": 0.9, "repetition": 0.1, "answers": len(answers)},
        {"epoch": 3, "who": "policy", "principle_rate": rate, "nll_w": nll, "repetition": 0.3, "answers": len(answers)},
    ]
    (run / "validation" / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in summary))
    (run / "validation" / "epoch_-01.jsonl").write_text("".join(json.dumps({**r, "passes": False}) + "\n" for r in rows))
    teacher = [{**r, "passes": True, "answer": FLUENT, "repetition": 0.0, "nll_w": 0.5 + 0.9 * (i % 2)} for i, r in enumerate(rows)]
    (run / "validation" / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in teacher))
    (run / "metrics").mkdir()
    with (run / "metrics" / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "time/sample_s", "time/score_s", "time/train_s"])
        writer.writeheader()
        writer.writerow({"epoch": 0, "time/sample_s": 6.0, "time/score_s": 7.0, "time/train_s": 14.0})
    return run


def _script(name: str, *args) -> str:
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_choose_lr_keeps_the_run_that_passes_without_looping_and_table_reports_it(tmp_path):
    # lr 3e-4 passes on every prompt by looping; lr 1e-4 passes on fewer, two of them cleanly (the
    # third is one word and blank lines: no 3-gram to repeat, too short to count); the sft run
    # passes with word salad, less plausible to pi_w than anything pi_w said itself.
    looped = _run_dir(tmp_path, "inverse_q", "3e-4", [(LOOP, True)] * 4, nll=1.2)
    fluent = _run_dir(tmp_path, "inverse_q", "1e-4", [(FLUENT, True), (FLUENT, True, 1.4), ("\nDélicère\n\n\n", True), (LOOP, False)], nll=1.5)
    _run_dir(tmp_path, "sft", "1e-4", [(FLUENT, False)] * 4, nll=2.0)
    _run_dir(tmp_path, "sft", "3e-4", [(FLUENT, True, 3.1)] * 4, nll=3.1)  # passes 4 of 4, none cleanly
    _run_dir(tmp_path, "sft", "1e-3", [(FLUENT, True, 1.0)] + [(FLUENT, False)] * 3, nll=2.5)  # one clean pass
    chosen = _script("choose_lr.py", tmp_path)
    assert chosen.splitlines() == [f"inverse_q\t{fluent}\t1e-4", f"ctx_sft\t{tmp_path / 'sft' / 'lr1e-3'}\t1e-3"]
    assert str(looped) not in chosen

    (tmp_path / "selected.tsv").write_text(chosen)
    results = tmp_path / "evaluate" / "results"
    results.mkdir(parents=True)
    (results / "win_rates.csv").write_text(
        "a,b,win_rate,win_low,win_high,lose_rate,lose_low,lose_high,tie_rate\n"
        "inverse_q,sft,0.6,0.4,0.8,0.3,0.1,0.5,0.1\n"
        "prompting,inverse_q,0.7,0.5,0.9,0.2,0.1,0.4,0.1\n"
    )
    (results / "elo.csv").write_text("contestant,elo,low,high\ninverse_q,1010,990,1030\n")
    (results / "judge_quality.csv").write_text("metric,value\nreliable,False\n")
    table = _script("table.py", tmp_path)
    assert table.startswith("Judge: reliable False")
    row = next(line for line in table.splitlines() if line.startswith("| inverse_q | 1e-4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "0.75 (0.30-0.95, n=4)"  # the principle rate and its Wilson interval
    assert cells[3] == "0.50 (0.15-0.85)"  # the two fluent ones, one of them exactly at the bar
    assert cells[6] == "0.60 (0.40-0.80), ties 0.10"  # against SFT, as written
    assert cells[7] == "0.20 (0.10-0.40), ties 0.10"  # against Prompting: the other side of its row
    assert cells[8] == "1010 (990-1030)" and cells[9] == "6.0 + 7.0 + 14.0"
    looped_row = next(line for line in table.splitlines() if line.startswith("| inverse_q | 3e-4 |"))
    assert "| 1.00 (0.51-1.00, n=4) | 0.00 (0.00-0.49) |" in looped_row
    prompting = next(line for line in table.splitlines() if line.startswith("| Prompting"))
    assert "| 0.50 | 1.00 (0.51-1.00) |" in prompting
