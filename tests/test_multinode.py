"""Several processes and several nodes on this machine's CPUs, as a cluster runs them.

- A resumed ZeRO-3 run whose killed predecessor wrote only some ranks' rollouts of an epoch
  samples that epoch again on every rank (a rank that reused its file would leave the others in
  the sampler's collectives until the process-group timeout).
- Processes started apart (torchrun, srun, one start per node) each evaluate the config: a run
  directory named by the clock is refused before anything is written.
- 2 "nodes" x 1 process on loopback, started as Lightning's manual multi-node launch and as
  torchrun's c10d rendezvous, under DDP and ZeRO-3: killed in epoch 1, resumed, exported, and the
  same run bit for bit as one node with 2 processes.
- scripts/slurm/train.sbatch under a stand-in srun (2 tasks, Lightning's SLURM environment)
  trains in the job id's directory; an alpha sweep through Hydra's submitit launcher writes one
  SLURM array job, offline.

Every start runs under a timeout that kills its whole process group: a hang is a failure, not a
stuck suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, has_module
from iq_lightning.cli import ExternalLaunch, external_launch, own_log_overrides, shared_run_dir_error

COMMON = [
    "model=tiny", "lr=1e-4", "samples_per_epoch=8", "micro_batch_size=4", "sampler.max_new_tokens=8", "alpha=3.0", "logger=csv",
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


@pytest.mark.parametrize(
    ("environ", "want"),
    [
        ({}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # one task: Lightning starts the others itself
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_JOB_NAME": "interactive"}, None),  # salloc, then python train.py
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "3"}, ExternalLaunch("srun", "outputs/slurm-7", "train_rank3")),
        ({"TORCHELASTIC_RUN_ID": "abc", "LOCAL_RANK": "0", "RANK": "1", "WORLD_SIZE": "2"}, ExternalLaunch("torchrun", "outputs/torchrun-abc", "train_rank1")),
        ({"TORCHELASTIC_RUN_ID": "none", "LOCAL_RANK": "0"}, ExternalLaunch("torchrun", "/shared/outputs/my-run")),
        ({"NODE_RANK": "1", "WORLD_SIZE": "2"}, ExternalLaunch("a launch per process or node (NODE_RANK/WORLD_SIZE set)", "/shared/outputs/my-run", "train_node1")),
        # What Lightning gives the processes it starts beside the first on a node.
        ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "4"}, ExternalLaunch("a launch per process or node (LOCAL_RANK/NODE_RANK/WORLD_SIZE set)", "/shared/outputs/my-run")),
        ({"LOCAL_RANK": "1", "NODE_RANK": "1", "WORLD_SIZE": "4"}, ExternalLaunch("a launch per process or node (LOCAL_RANK/NODE_RANK/WORLD_SIZE set)", "/shared/outputs/my-run", "train_node1_1")),
    ],
)
def test_external_launchers_are_told_from_the_environment(environ, want):
    assert external_launch(environ) == want
    # Only the job's first process writes train.log and .hydra/; the others log beside it.
    overrides = own_log_overrides(want)
    assert overrides == ([] if want is None or want.log_name is None else [f"hydra.job.name={want.log_name}", "hydra.output_subdir=null"])


SRUN = ExternalLaunch("srun", "outputs/slurm-7", "train_rank3")


@pytest.mark.parametrize(
    ("launch", "args", "refused"),
    [
        (None, [], False),
        (None, ["strategy=ddp", "strategy.num_nodes=2"], True),
        (None, ["strategy=ddp", "strategy.num_nodes=2", "dry_run=true"], False),  # loads and writes nothing
        (None, ["strategy=ddp", "strategy.num_nodes=2", "hydra.run.dir=/shared/run"], False),
        (None, ["-m", "alpha=1.0,1.2", "strategy=ddp", "strategy.num_nodes=2"], False),  # submitted from a login node
        (SRUN, [], True),
        (SRUN, ["hydra.run.dir=outputs/slurm-7"], False),
        (SRUN, ["-m", "alpha=1.0,1.2"], True),  # a sweep run by every task: each would name its own
        (SRUN, ["-m", "alpha=1.0,1.2", "hydra.sweep.dir=/shared/sweep"], False),
    ],
)
def test_a_clock_named_run_directory_is_refused_when_processes_start_apart(launch, args, refused):
    message = shared_run_dir_error(REPO / "conf", "train", launch, args)
    assert (message is not None) == refused, message
    if launch is not None and refused:
        key = "sweep" if "-m" in args else "run"
        assert message == (
            f"srun: every process would name its own {key} directory from the clock; give them one on a filesystem all nodes share: "
            f"hydra.{key}.dir=outputs/slurm-7"
        )


def test_a_launch_per_node_without_a_run_directory_is_one_line_and_writes_nothing(tmp_path):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "NODE_RANK": "1", "WORLD_SIZE": "2"}
    cmd = [sys.executable, str(REPO / "train.py"), *COMMON, "strategy=ddp", "strategy.num_nodes=2", "strategy.devices=1"]
    result = _run(cmd, env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
        "error: a launch per process or node (NODE_RANK/WORLD_SIZE set): every process would name its own run directory "
        "from the clock; give them one on a filesystem all nodes share: hydra.run.dir=/shared/outputs/my-run"
    ]
    assert list(tmp_path.iterdir()) == []



# Kills every process of the job at its `nth` training step (2: epoch 1's first, after epoch 0's
# checkpoint and epoch 1's rollouts), then runs train.py as its own __main__.
KILLER = r"""
import os, signal, sys
nth = int(sys.argv.pop(1))
sys.argv[0] = {train!r}
sys.path.insert(0, {repo!r})
import iq_lightning.module as module
steps = []
original = module.InverseQModule.training_step
def training_step(*args, **kwargs):
    steps.append(1)
    if len(steps) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
module.InverseQModule.training_step = training_step
import runpy
runpy.run_path({train!r}, run_name="__main__")
"""
LAUNCH_VARIABLES = ("LOCAL_RANK", "RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(launcher: str, script: list[str], args: list[str], timeout: float = 400) -> list[subprocess.CompletedProcess]:
    """`script args` as a job of 2 "nodes" x 1 process on loopback, started the way `launcher`
    starts one per node; a node left alone after the other stopped is killed after 60 s."""
    port = _free_port()
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    base["OMP_NUM_THREADS"] = "1"
    procs = []
    for node in (0, 1):
        if launcher == "manual":  # Lightning's own multi-node launch: one start per node
            env = {**base, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node), "WORLD_SIZE": "2"}
            head = [sys.executable]
        else:
            env = base
            head = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=rehearsal", "--max-restarts=0",
            ]
        cmd = [*head, *script, *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, start_new_session=True))
    deadline, alone_since = time.monotonic() + timeout, None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if alone_since is None and any(p.poll() is not None for p in procs):
            alone_since = now
        if now > deadline or (alone_since is not None and now - alone_since > 60):
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.5)
    results = []
    for p, node in zip(procs, (0, 1)):
        out, _ = p.communicate()
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, f"node {node}:\n{out[-4000:]}"))
    return results


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp")
    _ok(_train(run_dir, *COMMON, "strategy=ddp", "strategy.devices=2", "epochs=2"))
    return run_dir


@pytest.fixture(scope="module")
def killer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("killer") / "killed_train.py"
    path.write_text(KILLER.format(train=str(REPO / "train.py"), repo=str(REPO)))
    return path


@pytest.mark.parametrize(
    ("strategy", "launcher"),
    [
        pytest.param("ddp", "manual"),
        pytest.param("deepspeed_zero3", "torchrun", marks=needs_deepspeed),
        pytest.param("ddp", "torchrun", marks=pytest.mark.slow),
        pytest.param("deepspeed_zero3", "manual", marks=[needs_deepspeed, pytest.mark.slow]),
    ],
)
def test_two_nodes_train_are_killed_resume_and_export_the_one_node_run(strategy, launcher, killer, request, tmp_path):
    want = request.getfixturevalue("zero3_run" if strategy == "deepspeed_zero3" else "ddp_run")
    args = [*COMMON, f"strategy={strategy}", "strategy.num_nodes=2", "strategy.devices=1", "epochs=2", f"hydra.run.dir={tmp_path}"]
    killed = _two_nodes(launcher, [str(killer), "2"], args)
    assert all(r.returncode != 0 for r in killed), [r.stderr for r in killed]
    assert not (tmp_path / "final").exists()
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()  # epoch 0's

    resumed = _two_nodes(launcher, [str(REPO / "train.py")], args)
    assert all(r.returncode == 0 for r in resumed), [r.stderr for r in resumed]
    # One run directory: the first process's log and config.yaml, the second node's log beside them.
    second = "train_node1.log" if launcher == "manual" else "train_rank1.log"
    assert "resuming from" in (tmp_path / "train.log").read_text()
    assert "resuming from" in (tmp_path / second).read_text()
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "overrides.yaml").exists()
    _assert_same_run(tmp_path, want, ZERO3_ROLLOUTS)


@pytest.mark.skipif(not has_module("hydra_plugins.hydra_submitit_launcher"), reason="needs hydra-submitit-launcher (pip install -e '.[slurm]')")
def test_an_alpha_sweep_submits_one_slurm_job_per_run_with_the_strategys_nodes_and_gpus(tmp_path):
    """The real submission, offline: Hydra's submitit launcher writes each job's batch script and
    hands it to `sbatch`, here a stand-in that keeps the script and refuses the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "sbatch: error: no cluster here" >&2\nexit 1\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    cmd = [
        sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=slurm", "alpha=1.0,1.2", "model=tiny", "strategy=deepspeed_zero3",
        "strategy.num_nodes=2", "strategy.devices=8", "hydra.launcher.timeout_min=600", "hydra.launcher.partition=gpu",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "no cluster here" in result.stderr, result.stderr[-3000:]
    script = (tmp_path / "submitted.sh").read_text()
    sbatch = {line.split("=")[0]: line.split("=", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH --") and "=" in line}
    assert sbatch["#SBATCH --array"] == "0-1%2"  # one job per alpha, both at once
    assert sbatch["#SBATCH --nodes"] == "2"
    assert sbatch["#SBATCH --ntasks-per-node"] == "8"  # one task per GPU
    assert sbatch["#SBATCH --gpus-per-node"] == "8"
    assert sbatch["#SBATCH --time"] == "600"
    assert sbatch["#SBATCH --partition"] == "gpu"
    assert "srun" in script


# Stands in for srun on one machine: SLURM_NTASKS tasks of the command, task i as "node" i, with the
# variables srun gives each task (Lightning's SLURM environment reads its ranks from them).
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i "$@" > "task$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def test_the_sbatch_script_runs_one_task_per_device_in_the_job_ids_directory(ddp_run, tmp_path):
    """scripts/slurm/train.sbatch as SLURM would run it on 2 nodes x 1 task, with a stand-in srun:
    the run directory is the job's (outputs/slurm-<id>), the same in both tasks, and the run is
    the one-node run's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')  # this environment's
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    for name in ("train.py", "conf"):  # sbatch runs from the repository root
        (tmp_path / name).symlink_to(REPO / name)
    job_id = "4242"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    env.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        SLURM_JOB_ID=job_id, SLURM_JOB_NAME="iq-train", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="1", SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(_free_port()),
    )
    cmd = ["bash", str(REPO / "scripts" / "slurm" / "train.sbatch"), *COMMON, "strategy=ddp", "epochs=2"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the sbatch script hung: " + "".join((tmp_path / f"task{i}.log").read_text()[-2000:] for i in (0, 1)))
    logs = [(tmp_path / f"task{i}.log").read_text() for i in (0, 1)]
    assert proc.returncode == 0, [log[-3000:] for log in logs]
    run_dir = tmp_path / "outputs" / f"slurm-{job_id}"
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == [f"slurm-{job_id}"]
    assert (run_dir / "train.log").exists() and (run_dir / "train_rank1.log").exists()
    _assert_same_run(run_dir, ddp_run, ZERO3_ROLLOUTS)
