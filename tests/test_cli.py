"""The command line as a user runs it: clear one-line errors, multirun directories."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _train(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py")]
    if multirun:
        cmd += ["-m", f"hydra.sweep.dir={tmp_path}"]
    else:
        cmd += [f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd + list(overrides), capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_zephyr_offline_is_one_clear_line(tmp_path):
    line = _one_line_error(_train(tmp_path, "model=zephyr", "alpha=1.2", "logger=none"))
    assert "cannot load model HuggingFaceH4/mistral-7b-sft-beta" in line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["alpha=-0.5"], "alpha must be >= 0"),
        (["epochs=0"], "epochs must be >= 1"),
        (["data=local", "data.path=/nonexistent/prompts.jsonl"], "data.path=/nonexistent/prompts.jsonl: no such file"),
        (["guide.placement=middle"], "guide.placement must be system or user"),
        (["+colour=blue"], "unknown top-level key 'colour'"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, overrides, expected):
    line = _one_line_error(_train(tmp_path, "model=tiny", "logger=none", *overrides))
    assert expected in line


def test_malformed_local_data_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    line = _one_line_error(_train(tmp_path / "run", "model=tiny", "logger=none", "data=local", f"data.path={bad}"))
    assert "bad.jsonl:1: not valid JSON" in line


def test_multirun_alpha_sweep_gets_one_directory_per_run(tmp_path):
    result = _train(
        tmp_path,
        "alpha=1.0,1.2,1.4",
        "model=tiny",
        "epochs=1",
        "samples_per_epoch=4",
        "sampler.max_new_tokens=4",
        "logger=csv",
        multirun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert len(runs) == 3
    alphas = []
    for run in runs:
        assert (run / "final" / "model.safetensors").exists()
        assert (run / "rollouts" / "epoch_000.jsonl").exists()
        config = (run / ".hydra" / "config.yaml").read_text()
        alphas.append(next(line for line in config.splitlines() if line.startswith("alpha:")))
    assert alphas == ["alpha: 1.0", "alpha: 1.2", "alpha: 1.4"]


def test_ctrl_c_then_same_command_resumes(tmp_path):
    """A real SIGINT mid-run: graceful stop, then the same command continues where it stopped."""
    import signal
    import time

    args = [sys.executable, str(REPO / "train.py"), "model=tiny", "epochs=30", "samples_per_epoch=16",
            "sampler.max_new_tokens=16", "logger=csv", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "KeyboardInterrupt" in out, out[-2000:]
    done = sorted(p.name for p in (tmp_path / "rollouts").glob("epoch_*.jsonl"))
    assert 1 <= len(done) < 30
    kept = {name: (tmp_path / "rollouts" / name).read_bytes() for name in done}

    resumed = _train(tmp_path, *args[2:-1])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    after = sorted(p.name for p in (tmp_path / "rollouts").glob("epoch_*.jsonl"))
    assert after == [f"epoch_{e:03d}.jsonl" for e in range(30)]
    assert all((tmp_path / "rollouts" / name).read_bytes() == data for name, data in kept.items())
    epochs = [line.split(",")[0] for line in (tmp_path / "metrics" / "metrics.csv").read_text().splitlines()[1:]]
    assert sorted({int(e) for e in epochs}) == list(range(30))
