"""Several processes and several nodes on this machine's CPUs, as a cluster runs them.

- A resumed ZeRO-3 run whose killed predecessor wrote only some ranks' rollouts of an epoch
  samples that epoch again on every rank (a rank that reused its file would leave the others in
  the sampler's collectives until the process-group timeout).

Every start runs under a timeout that kills its whole process group: a hang is a failure, not a
stuck suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, has_module

COMMON = [
    "model=tiny", "samples_per_epoch=8", "micro_batch_size=4", "sampler.max_new_tokens=8", "alpha=3.0", "logger=csv",
    "val.every_n_epochs=0", "credit_maps_per_epoch=0", "strategy.accelerator=cpu",
]
ZERO3 = [*COMMON, "strategy=deepspeed_zero3", "strategy.devices=2"]
needs_deepspeed = pytest.mark.skipif(not has_module("deepspeed"), reason="deepspeed is not installed")


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`cmd` in its own session; on timeout the whole group (Lightning's children too) is killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[1:3])} ... hung for {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _train(run_dir: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(REPO / "train.py"), *extra, f"hydra.run.dir={run_dir}"], timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def _assert_same_run(got: Path, want: Path, rollouts: list[str]) -> None:
    """The same rollouts byte for byte and the same exported weights bit for bit."""
    assert sorted(p.name for p in (got / "rollouts").iterdir()) == rollouts
    for name in rollouts:
        assert (got / "rollouts" / name).read_bytes() == (want / "rollouts" / name).read_bytes(), name
    a, b = load_file(got / "final" / "model.safetensors"), load_file(want / "final" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(a[k].equal(b[k]) for k in b), [k for k in b if not a[k].equal(b[k])]


ZERO3_ROLLOUTS = [f"epoch_{e:03d}.rank{r}.jsonl" for e in (0, 1) for r in (0, 1)]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero3")
    _ok(_train(run_dir, *ZERO3, "epochs=2"))
    return run_dir


@needs_deepspeed
def test_a_resume_with_one_ranks_rollouts_missing_samples_again_on_every_rank(zero3_run, tmp_path):
    _ok(_train(tmp_path, *ZERO3, "epochs=1", "save_final=false"))
    # As if killed after rank 0 stored epoch 1's rollouts and before rank 1 did: rank 0's file is
    # what it wrote in the uninterrupted run (the same policy drew it).
    shutil.copy(zero3_run / "rollouts" / "epoch_001.rank0.jsonl", tmp_path / "rollouts")
    _ok(_train(tmp_path, *ZERO3, "epochs=2"))
    log = (tmp_path / "train.log").read_text()
    assert "resuming from" in log
    assert "epoch 1: another rank has no stored rollouts; every rank samples the epoch again" in log
    _assert_same_run(tmp_path, zero3_run, ZERO3_ROLLOUTS)

