"""The tradeoff recipe's table/figure script, run as run.sh runs it, over run directories written
here: pooled seeds, clean passes as choose_lr.py counts them, the front, base and teacher points."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "experiments" / "tradeoff" / "table.py"
LOOP = "la cuisine en mode, la cuisine en mode, la cuisine en mode, la cuisine en mode"
FLUENT = "Je vous conseille de prendre des chaussures solides et une veste de pluie"
ENGLISH = "I would take solid shoes and a rain jacket with me on the walk today"


def _run(out: Path, name: str, seed: int, answers: list[tuple[str, bool]], nll: float, repetition: float) -> Path:
    """A run whose last validation (epoch 3) gave `answers` (text, passes), all at NLL under pi_w
    1.0; its teacher answered FLUENT at NLL 0.5 and 1.4 (the clean-pass bar: 1.4)."""
    from iq_lightning.text_quality import repetition as repeated

    run = out / name / f"seed{seed}"
    (run / "validation").mkdir(parents=True)
    rows = [{"epoch": 3, "prompt_id": f"p{i}", "answer": a, "passes": p, "repetition": repeated(a), "nll_w": 1.0, "tokens": 10 + i} for i, (a, p) in enumerate(answers)]
    (run / "validation" / "epoch_003.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [{**r, "answer": ENGLISH, "passes": False, "repetition": 0.0} for r in rows]
    (run / "validation" / "epoch_-01.jsonl").write_text("".join(json.dumps(r) + "\n" for r in base))
    teacher = [{**r, "passes": i % 2 == 0, "answer": FLUENT, "repetition": 0.0, "nll_w": 0.5 + 0.9 * (i % 2)} for i, r in enumerate(rows)]
    (run / "validation" / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in teacher))
    n = len(answers)
    summary = [
        {"epoch": -1, "who": "policy", "principle_rate": 0.0, "nll_w": 0.8 + 0.1 * seed, "repetition": 0.05, "answers": n},
        {"epoch": -1, "who": "teacher", "principle_rate": 0.5, "nll_w": 0.9, "repetition": 0.1, "answers": n},
        {"epoch": 1, "who": "policy", "principle_rate": 0.0, "nll_w": 9.0, "repetition": 0.9, "answers": n},  # not the last
        {"epoch": 3, "who": "policy", "principle_rate": sum(p for _, p in answers) / n, "nll_w": nll, "repetition": repetition, "answers": n},
    ]
    (run / "validation" / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in summary))
    return run


def _script(*args) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def sweep(tmp_path):
    out = tmp_path / "tradeoff"
    out.mkdir()
    (out / "settings.tsv").write_text("looped\talpha=1.5 lr=3e-4\nfluent\talpha=1.2 lr=1e-4\nshy\talpha=1.0 lr=3e-5\nworse\talpha=1.0 lr=1e-4\n")
    # looped: passes 4 of 4 by looping (0 clean) at low NLL; fluent: 2 seeds, 3 of 4 then 4 of 4
    # passes, of them 3 then 2 clean; shy: 1 of 4, clean, at the lowest NLL; worse: dominated by fluent.
    _run(out, "looped", 0, [(LOOP, True)] * 4, nll=0.7, repetition=0.6)
    _run(out, "fluent", 0, [(FLUENT, True)] * 3 + [(ENGLISH, False)], nll=0.9, repetition=0.05)
    _run(out, "fluent", 1, [(FLUENT, True)] * 2 + [(LOOP, True)] * 2, nll=1.1, repetition=0.25)
    _run(out, "shy", 0, [(FLUENT, True)] + [(ENGLISH, False)] * 3, nll=0.6, repetition=0.0)
    _run(out, "worse", 0, [(FLUENT, True)] * 2 + [(ENGLISH, False)] * 2, nll=1.2, repetition=0.1)
    return out


def test_table_pools_seeds_and_marks_the_front(sweep):
    table = _script(sweep)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")}
    # fluent: 7 passes and 5 clean of 8 pooled answers (Wilson 95%), NLL and repetition as mean (min-max)
    assert rows["fluent"][1:] == ["alpha=1.2 lr=1e-4", "2", "0.88 (0.53-0.98, n=8)", "0.62 (0.31-0.86)", "1.000 (0.900-1.100)", "0.150 (0.050-0.250)", "yes"]
    assert rows["looped"][3:5] == ["1.00 (0.51-1.00, n=4)", "0.00 (0.00-0.49)"] and rows["looped"][7] == ""  # dominated by shy
    assert rows["shy"][7] == "yes" and rows["worse"][7] == ""
    # the base and the teacher, one run per seed (seed0 from the first setting, seed1 from fluent)
    assert rows["base"][2:7] == ["2", "0.00 (0.00-0.32, n=8)", "0.00 (0.00-0.32)", "0.850 (0.800-0.900)", "0.050 (0.050-0.050)"]
    assert rows["teacher"][3:5] == ["0.50 (0.22-0.78, n=8)", "0.50 (0.22-0.78)"]
    order = list(rows)[3:]  # after the header, the base and the teacher
    assert order == ["fluent", "worse", "shy", "looped"]  # by clean passes
    assert "Above the teacher's principle rate at or below its NLL under pi_w and repetition: shy." not in table
    assert "Above the teacher's principle rate at or below its NLL under pi_w and repetition: none." in table  # shy's 0.25 < 0.5
    # the teacher's passing answers alone (even rows: NLL 0.5, no repetition), 2 of 4 in each of 2 runs
    assert "The teacher's passing answers alone (4): NLL under pi_w 0.500, repetition 0.000; above the teacher's principle rate at or below these: none." in table
    assert _script(sweep, "--front").split() == ["shy", "fluent"]
    assert _script(sweep, "--front", "--rate", "principle").split() == ["shy", "looped"]


def test_figures_are_written(sweep, tmp_path):
    out = _script(sweep, "--figures", tmp_path / "figs")
    for name in ("tradeoff_nll.png", "tradeoff_repetition.png"):
        path = tmp_path / "figs" / name
        assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in out


def test_every_setting_of_the_recipe_is_a_valid_config(tmp_path):
    """run.sh passes each line's overrides to train.py: each must build (a typo would cost the
    sweep an hour before it stopped)."""
    from conftest import compose
    from iq_lightning.config import build_run_config

    lines = [line.split("\t") for line in (SCRIPT.parent / "settings.tsv").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) >= 20 and len({name for name, _ in lines}) == len(lines)
    alphas = set()
    for name, overrides in lines:
        run = build_run_config(compose(overrides.split() + ["val.every_n_epochs=1", "logger=csv"]), tmp_path)
        alphas.add(run.train.alpha)
    assert alphas == {1.0, 1.2, 1.5}


def test_recheck_applies_each_principles_check_to_the_stored_answers(tmp_path):
    run = tmp_path / "run"
    (run / "validation").mkdir(parents=True)
    write = lambda name, texts: (run / "validation" / name).write_text("".join(json.dumps({"answer": t}) + "\n" for t in texts))  # noqa: E731
    write("teacher.jsonl", ["Je prends une veste de pluie.", "Il fait beau aujourd'hui à Paris. Sortez !"])
    write("epoch_-01.jsonl", [ENGLISH, ENGLISH + ". And boots."])
    write("epoch_003.jsonl", ["Je vous conseille de prendre des chaussures solides.", FLUENT + ". Et un parapluie, bien sûr."])
    done = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "recheck.py"), str(run), "Always reply in French.", "Answer in one sentence."],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "answers" not in line]
    assert rows == ["| teacher | 1.00 | 0.50 |", "| epoch -01 | 0.00 | 0.50 |", "| epoch 003 | 1.00 | 0.50 |"]
