"""Faults around evaluations and the entry points' output directories: a kill -9 while judging
then a rerun, a torn cache line, two evaluations on one out_dir, a directory that cannot be
written. Each outcome is compared with an uninterrupted evaluation, record for record."""

from __future__ import annotations

import os
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
