"""Fault injection: `train.py` on the tiny model (3 epochs) in a subprocess, killed with SIGKILL
at a chosen point, or given a full disk, then the same command rerun until it completes. The
result must be the uninterrupted run's: the same final weights bit for bit, every epoch's
rollouts once (the same bytes), every metrics row once and none missing.

The points are chosen deterministically by a wrapper script that patches one function of the
package and then runs train.py's main: nothing in the package reads a variable for it.
About 3 minutes on 2 shared CPU cores (22 train.py starts of 6-15 s each).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO

ARGS = [
    "model=tiny", "lr=1e-4",
    "epochs=3",
    "samples_per_epoch=4",
    "micro_batch_size=2",
    "sampler.max_new_tokens=6",
    "logger=csv",
    "val.prompts=2",
    "val.batch_size=2",
    "credit_maps_per_epoch=1",
]

# Patches one function so that its matching call kills the process (or fails like a full disk).
WRAPPER = r'''
import errno, os, signal, sys
point, _, nth = sys.argv.pop(1).partition(":")
nth = int(nth or 4)  # training_step: the call that is killed (4: epoch 1's second step)
sys.argv[0] = {train!r}
sys.path.insert(0, {repo!r})

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def full_disk():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

def patch(owner, name, before):
    original = getattr(owner, name)
    def patched(*args, **kwargs):
        before(*args, **kwargs)
        return original(*args, **kwargs)
    setattr(owner, name, patched)

import iq_lightning.samplers.hf as hf
import iq_lightning.guides as guides
import iq_lightning.module as module
import iq_lightning.run as run
from iq_lightning.checkpoint_io import StreamingCheckpointIO

saves = []
def torn_checkpoint(self, checkpoint, path, storage_options=None):
    saves.append(path)
    if len(saves) == 2:  # epoch 1's checkpoint, cut short
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        full_disk() if point == "checkpoint_disk_full" else die()

steps = []
if point == "sampling":
    patch(hf.HFSampler, "generate", lambda *a, desc="", **k: desc.startswith("epoch 1 ") and die())
elif point == "scoring":
    patch(guides.GuideScorer, "score", lambda *a, desc="", **k: desc.startswith("epoch 1 ") and die())
elif point == "training_step":
    patch(module.InverseQModule, "training_step", lambda *a, **k: (steps.append(1), len(steps) == nth and die()))
elif point == "sigterm":  # what scancel and SLURM preemption send, in epoch 1's second step
    patch(module.InverseQModule, "training_step", lambda *a, **k: (steps.append(1), len(steps) == nth and os.kill(os.getpid(), signal.SIGTERM)))
elif point in ("checkpoint_write", "checkpoint_disk_full"):
    patch(StreamingCheckpointIO, "save_checkpoint", torn_checkpoint)
elif point in ("rollout_write", "rollout_disk_full"):
    real_fsync = os.fsync
    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{{fd}}").endswith("epoch_001.jsonl.tmp"):
            full_disk() if point == "rollout_disk_full" else die()
        return real_fsync(fd)
    os.fsync = fsync
elif point in ("checkpoint_renamed", "base_validation"):
    # Right after epoch 1's checkpoint is renamed into place; right after the base's answers
    # (validation/epoch_-01.jsonl) are, inside the epoch -1 validation.
    target = "epoch001.ckpt" if point == "checkpoint_renamed" else "epoch_-01.jsonl"
    real_replace = os.replace
    def replace(src, dst, **kwargs):
        real_replace(src, dst, **kwargs)
        if str(dst).endswith(target):
            die()
    os.replace = replace
elif point == "after_validation":  # epoch 1 validated and recorded, its checkpoint not yet written
    import iq_lightning.validation as validation
    real_report = validation.Validation._report
    def report(self, trainer, epoch, *args, **kwargs):
        real_report(self, trainer, epoch, *args, **kwargs)
        if epoch == 1:
            die()
    validation.Validation._report = report
elif point == "pause":  # holds the run directory at epoch 1's sampling until killed
    def pause(*a, desc="", **k):
        if desc.startswith("epoch 1 "):
            open(sys.argv[-1].partition("=")[2] + "/paused", "w").close()
            import time
            time.sleep(600)
    patch(hf.HFSampler, "generate", pause)
elif point == "export":  # final/'s weights half written
    import iq_lightning.models as models
    def torn_export(model, tokenizer, out, state_dict=None):
        if "final" in str(out):
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "model.safetensors"), "wb") as handle:
                handle.write(b"half a model")
            die()
    patch(models, "export_pretrained", torn_export)
else:
    raise SystemExit(f"unknown point {{point}}")

sys.path.insert(0, os.path.dirname({train!r}))
import runpy
runpy.run_path({train!r}, run_name="__main__")
'''


def _train(run_dir: Path, *extra: str, wrapper: Path | None = None, point: str | None = None, **env: str) -> subprocess.CompletedProcess:
    head = [sys.executable, str(wrapper), point] if wrapper else [sys.executable, str(REPO / "train.py")]
    cmd = head + ARGS + list(extra) + [f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _metric_keys(run_dir: Path) -> list[tuple]:
    rows = csv.DictReader(open(run_dir / "metrics" / "metrics.csv", newline=""))
    return [(r["epoch"], r["step"], tuple(sorted(k for k, v in r.items() if v and k not in ("epoch", "step")))) for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    _ok(_train(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("wrapper") / "faulty_train.py"
    path.write_text(WRAPPER.format(train=str(REPO / "train.py"), repo=str(REPO)))
    return path


def _assert_same_as(run_dir: Path, reference: Path) -> None:
    got, want = load_file(run_dir / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(got[k].equal(want[k]) for k in want), [k for k in want if not got[k].equal(want[k])]
    names = sorted(p.name for p in (run_dir / "rollouts").iterdir())
    assert names == ["epoch_000.jsonl", "epoch_001.jsonl", "epoch_002.jsonl"]
    for name in names:
        assert (run_dir / "rollouts" / name).read_bytes() == (reference / "rollouts" / name).read_bytes(), name
    keys = _metric_keys(run_dir)
    assert len(keys) == len(set(keys)), sorted(k for k in set(keys) if keys.count(k) > 1)
    # A resumed epoch that reuses its stored rollouts has no sampling speed to report.
    def logged(keys):
        return {(e, s, tuple(n for n in names if not n.startswith(("time/", "throughput/")))) for e, s, names in keys}

    assert logged(keys) == logged(_metric_keys(reference))
    # Every validation's rows once, the base's and the teacher's included, as uninterrupted.
    summary = (run_dir / "validation" / "summary.jsonl").read_text()
    assert [json.loads(line)["epoch"] for line in summary.splitlines()] == [-1, -1, 0, 1, 2]
    assert summary == (reference / "validation" / "summary.jsonl").read_text()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch002.ckpt", "epoch002.ckpt.sha256", "last.ckpt"]


@pytest.mark.parametrize(
    "point",
    ["sampling", "scoring", "training_step", "checkpoint_write", "checkpoint_renamed", "base_validation", "after_validation",
     "rollout_write", "export"],
)
def test_killed_anywhere_the_same_command_finishes_the_same_run(point, reference, wrapper, tmp_path):
    killed = _train(tmp_path, wrapper=wrapper, point=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "final").exists()  # final/ appears only complete (B4: half of it was there)
    resumed = _ok(_train(tmp_path))
    if point != "base_validation":  # every other point comes after epoch 0's checkpoint
        assert "resuming from" in resumed.stderr + resumed.stdout
    _assert_same_as(tmp_path, reference)


@pytest.mark.parametrize(("point", "written"), [("rollout_disk_full", "epoch_001.jsonl"), ("checkpoint_disk_full", "checkpoints")])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(point, written, reference, wrapper, tmp_path):
    failed = _train(tmp_path, wrapper=wrapper, point=point)
    assert failed.returncode == 2, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert "No space left on device" in errors[0] and written in errors[0], errors[0]
    assert not list(tmp_path.rglob("*.tmp"))
    _ok(_train(tmp_path))
    _assert_same_as(tmp_path, reference)


@pytest.mark.parametrize(("step", "done"), [(3, 1), (4, 2)])  # epoch 1's first step; its last (Lightning ends the epoch)
def test_sigterm_exits_143_with_one_line_whose_command_finishes_the_same_run(step, done, reference, wrapper, tmp_path):
    """B3: Lightning ended a SIGTERM'd run with exit status 0, no final/ and no word."""
    stopped = _train(tmp_path, wrapper=wrapper, point=f"sigterm:{step}")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    line = _one_error(stopped)
    assert f"stopped by SIGTERM with {done} of 3 epochs done" in line and f"epoch{done - 1:03d}.ckpt is kept" in line, line
    assert not (tmp_path / "final").exists()
    command = shlex.split(line.split(": ", 2)[2])
    assert command[0] == "python" and Path(command[1]).name == "train.py" and command[2:] == ARGS + [f"hydra.run.dir={tmp_path.resolve()}"], command
    resumed = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *command[2:]], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    _ok(resumed)
    _assert_same_as(tmp_path, reference)


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated"])
def test_a_damaged_checkpoint_is_skipped_in_one_line_and_the_run_still_ends_the_same(damage, reference, wrapper, tmp_path):
    """B6: one flipped byte in a checkpoint loaded silently (final/ then differed from an honest
    continuation). B5: a truncated newest checkpoint was a traceback. Either is found by its
    SHA-256 manifest and skipped; with no older checkpoint the run starts over, reusing every
    stored rollout, and ends with the same weights."""
    killed = _train(tmp_path, wrapper=wrapper, point="training_step")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoint = tmp_path / "checkpoints" / "epoch000.ckpt"
    data = bytearray(checkpoint.read_bytes())
    if damage == "flipped_byte":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) // 2 :]
    checkpoint.write_bytes(bytes(data))
    resumed = _ok(_train(tmp_path))
    skipped = [line for line in (resumed.stdout + resumed.stderr).splitlines() if "skipped the checkpoint" in line]
    assert len(skipped) == 1 and "epoch000.ckpt" in skipped[0] and "SHA-256" in skipped[0], resumed.stderr[-3000:]
    assert "resuming from the first epoch" in skipped[0]
    _assert_same_as(tmp_path, reference)


def test_killed_then_moved_run_directory_finishes_the_same_run(reference, wrapper, tmp_path):
    first = tmp_path / "first"
    killed = _train(first, wrapper=wrapper, point="training_step")
    assert killed.returncode == -signal.SIGKILL
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    _ok(_train(moved))
    _assert_same_as(moved, reference)


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _one_error(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def test_a_restart_with_a_changed_setting_names_it(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, symlinks=True)
    refused = _train(run_dir, "model.lora.enabled=true", "epochs=4")
    assert refused.returncode == 2, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "model.lora.enabled: false -> true" in errors[0], refused.stderr[-3000:]
    assert "epochs" not in errors[0].split("(")[1]  # epochs may change on a restart


def test_a_refused_restart_leaves_every_file_of_the_run_directory_as_it_was(reference, tmp_path):
    """B7: Hydra wrote the refused values into .hydra/config.yaml before the check refused them,
    and evaluation labelled the run with them. B8: fewer epochs than are done was a traceback."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, symlinks=True)
    before = _files(run_dir)
    refused = _train(run_dir, "alpha=2.0")
    assert refused.returncode == 2
    assert "alpha: 1.2 -> 2.0" in _one_error(refused)
    changed = sorted(name for name, data in _files(run_dir).items() if before.get(name) != data)
    assert not changed, changed  # the parent rewrote .hydra/config.yaml and overrides.yaml here
    fewer = _train(run_dir, "epochs=1")
    assert fewer.returncode == 2
    assert "3 epochs done; epochs must be >= 3" in _one_error(fewer)
    assert _files(run_dir) == before
    # The run's own record, what evaluation reads: the settings it trained with.
    assert "alpha: 1.2" in before["config.yaml"].decode().splitlines() and ".hydra/config.yaml" not in before


def test_a_second_process_on_a_run_directory_is_refused_and_a_killed_holder_leaves_no_lock(reference, wrapper, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, str(wrapper), "pause", *ARGS, f"hydra.run.dir={tmp_path}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "paused").exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder did not reach epoch 1"
            time.sleep(0.5)
        before = _files(tmp_path)
        second = _train(tmp_path)
        assert second.returncode == 2
        assert f"in use by process {holder.pid}" in _one_error(second)
        assert _files(tmp_path) == before  # it wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    (tmp_path / "paused").unlink()
    _ok(_train(tmp_path))
    _assert_same_as(tmp_path, reference)


def test_wandb_steps_never_go_back_after_a_kill(wrapper, tmp_path):
    """A kill -9 loses what the offline W&B writer had not flushed, so the killed run's own log
    may be empty: the steps it reached are read from metrics.csv, and the resumed W&B run (the
    same run id) must not log below them."""
    from iq_lightning.tracking import read_offline_run

    extra = ["logger=wandb", "val.every_n_epochs=0", "save_final=false", "samples_per_epoch=8"]  # 4 steps an epoch
    killed = _train(tmp_path, *extra, wrapper=wrapper, point="training_step:7", WANDB_MODE="offline")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    reached = max(int(step) for _, step, _ in _metric_keys(tmp_path))
    assert reached == 5  # killed at epoch 1's third step, after epoch 0's checkpoint at step 4
    _ok(_train(tmp_path, *extra, WANDB_MODE="offline"))
    resumed = read_offline_run(tmp_path)
    assert resumed.id == (tmp_path / "wandb_run_id").read_text().strip()
    steps = [row["trainer/global_step"] for row in resumed.history if "trainer/global_step" in row]
    # (Within any run Lightning logs an epoch's means one step back, after that epoch's tables.)
    assert min(steps) >= reached and max(steps) == 12, steps


def test_epoch_checkpoints_skip_the_zip_crc_and_restore_the_setting(tmp_path):
    """The CRC torch.load never checks is not computed for epoch checkpoints (most of their save
    time); the records still load exactly, and torch's global setting is put back."""
    import zipfile

    import torch
    from torch.utils.serialization import config

    from iq_lightning.callbacks import _without_zip_crc

    state = {"w": torch.randn(257), "step": torch.tensor(3)}
    with _without_zip_crc():
        torch.save(state, tmp_path / "fast.ckpt")
    torch.save(state, tmp_path / "plain.ckpt")
    assert config.save.compute_crc32 is True
    crcs = lambda name: [i.CRC for i in zipfile.ZipFile(tmp_path / name).infolist() if "/data/" in i.filename]  # noqa: E731
    assert crcs("fast.ckpt") and all(c == 0 for c in crcs("fast.ckpt"))
    assert any(c != 0 for c in crcs("plain.ckpt"))
    loaded = torch.load(tmp_path / "fast.ckpt")
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["step"], state["step"])
