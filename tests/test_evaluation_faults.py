"""Faults around evaluations and the entry points' output directories: a kill -9 while judging
then a rerun, a torn cache line, two evaluations on one out_dir, a directory that cannot be
written. Each outcome is compared with an uninterrupted evaluation, record for record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _unwritable(tmp_path: Path) -> Path:
    """A directory path that cannot be created, for root (a read-only pseudo file system) or not."""
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        return ro / "run"
    try:
        os.mkdir("/sys/iq-lightning-probe")
    except OSError:
        return Path("/sys/iq-lightning-probe/run")
    os.rmdir("/sys/iq-lightning-probe")
    pytest.skip("no read-only place to try")


def _script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "script, args",
    [
        ("train.py", ["model=tiny", "epochs=1", "logger=none", "hydra.run.dir={d}"]),
        ("train.py", ["-m", "model=tiny", "alpha=1.0,2.0", "logger=none", "hydra.sweep.dir={d}"]),
        ("evaluate.py", ["model=tiny", "logger=none", "out_dir={d}"]),
    ],
)
def test_an_output_directory_that_cannot_be_written_is_one_error_line(tmp_path, script, args):
    """B14: Hydra's mkdir of the run directory was a PermissionError traceback."""
    where = _unwritable(tmp_path)
    done = _script(script, *(a.format(d=where) for a in args), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: cannot write the output directory {where} (") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_the_write_check_leaves_nothing_behind(tmp_path):
    from iq_lightning.files import cannot_create

    assert cannot_create(tmp_path / "a" / "b") is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in cannot_create(tmp_path / "file" / "run")


# --- kill -9 while judging, a torn cache line, two evaluations on one out_dir -----------------------

EVAL_ARGS = [
    "model=tiny", "logger=none", "data.limit=8", "sampler.max_new_tokens=6", "judge.batch_size=1", "judge_check.matches=4",
    "judge_check.controls=0", "judge_free.enabled=false", "credit_maps=0", "elo.permutations=20", "elo.bootstrap=20",
    "+contestants.other.principle='Answer in one sentence.'",
]  # 3 contestants, 3 pairs of 8 prompts: 24 matches, judged in two chunks of 16 and 8

# Patches the judgment cache's append so that its second call (the second chunk) kills the
# process: before writing ("judging"), or after writing half of its first line ("torn").
WRAPPER = r'''
import os, runpy, signal, sys
point = sys.argv.pop(1)
sys.argv[0] = {script!r}
sys.path.insert(0, {repo!r})
import iq_lightning.evaluation.matches as matches
original, calls = matches.append_jsonl, []

def append(path, records):
    calls.append(path)
    if len(calls) == 2:
        if point == "torn":
            import json
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(list(records)[0])[:40])
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path, records)

matches.append_jsonl = append
runpy.run_path({script!r}, run_name="__main__")
'''

RESULTS = ("results/verdicts.jsonl", "results/win_rates.csv", "results/elo.csv", "results/judge_quality.csv", "judge_checks.jsonl")


def _evaluate(out: Path, *extra: str, wrapper: Path | None = None, point: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    head = [sys.executable, str(wrapper), point] if wrapper else [sys.executable, str(REPO / "evaluate.py")]
    return subprocess.run([*head, *EVAL_ARGS, f"out_dir={out}", *extra], cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "eval"
    done = _evaluate(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("point", ["judging", "torn"])
def test_killed_while_judging_the_rerun_gives_the_uninterrupted_results(point, uninterrupted, tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(script=str(REPO / "evaluate.py"), repo=str(REPO)))
    out = tmp_path / "eval"
    killed = _evaluate(out, wrapper=wrapper, point=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    cache = (out / "judgments.jsonl").read_text()
    assert len(cache.splitlines()) == (17 if point == "torn" else 16)  # the first chunk, and a torn line
    again = _evaluate(out)
    assert again.returncode == 0, again.stderr[-3000:]
    for name in RESULTS:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    # the cache holds each match once, as the uninterrupted one does
    assert sorted((out / "judgments.jsonl").read_text().splitlines()) == sorted((uninterrupted / "judgments.jsonl").read_text().splitlines())
    summary = (out / "results" / "summary.md").read_text().replace(str(out), "OUT")
    assert summary == (uninterrupted / "results" / "summary.md").read_text().replace(str(uninterrupted), "OUT")


def test_a_second_evaluation_of_one_out_dir_is_one_line_naming_the_holder(tmp_path):
    from iq_lightning.evaluation.lock import exclusive

    out = tmp_path / "eval"
    with exclusive(out):
        second = _evaluate(out)
    assert second.returncode == 2
    assert second.stderr == f"error: {out} is in use by another evaluation (pid {os.getpid()}); wait for it to finish, or give this one another out_dir\n"
    assert not (out / "generations").exists()  # it wrote nothing


def test_a_killed_evaluation_leaves_no_stale_lock(tmp_path):
    from iq_lightning.evaluation.lock import exclusive

    out = tmp_path / "eval"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
         "from pathlib import Path\nfrom iq_lightning.evaluation.lock import exclusive\n"
         f"with exclusive(Path({str(out)!r})):\n    print('held', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        from iq_lightning.errors import UserError

        with pytest.raises(UserError, match=rf"in use by another evaluation \(pid {holder.pid}\)"):
            with exclusive(out):
                pass
        holder.kill()
        holder.wait(timeout=30)
        with exclusive(out):  # the OS released it with the process
            pass
    finally:
        if holder.poll() is None:
            holder.kill()
