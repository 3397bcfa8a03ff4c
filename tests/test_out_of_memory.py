"""A CUDA out-of-memory error on one rank stops every rank promptly, with one line naming the
phase, the memory plan's figure for it and the override that shrinks it
(iq_lightning/out_of_memory.py).

`train.py` (tiny model) runs under a wrapper script that patches one function to raise
torch.OutOfMemoryError on one rank, as the CUDA allocator would: in sampling, guide scoring,
a training step's backward or validation. Without the stop, a 2-process DDP run whose rank 1
fails waits in rank 0's next collective until the process-group timeout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from iq_lightning.memory_plan import PlanItem, MemoryPlan
from iq_lightning.out_of_memory import PhaseBudget, budgets_from_plan, out_of_memory_line

WRAPPER = r'''
import os, sys
# From the environment, not argv: Lightning starts the other ranks with this script's own command line.
where, rank = os.environ["OOM_AT"].split(":")
sys.path.insert(0, {repo!r})
import torch
import iq_lightning.samplers.hf as hf
import iq_lightning.guides as guides
import iq_lightning.module as module

def oom(*args, desc="", **kwargs):
    if int(os.environ.get("LOCAL_RANK", 0)) == int(rank) and (where == "training" or desc.startswith(prefix)):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of 79.19 GiB")

def patch(owner, name):
    original = getattr(owner, name)
    def patched(*args, **kwargs):
        oom(*args, **kwargs)
        return original(*args, **kwargs)
    setattr(owner, name, patched)

prefix = {{"sampling": "epoch 0 sampling", "scoring": "epoch 0 scoring", "validation": "validation"}}.get(where, "")
if where in ("sampling", "validation"):
    patch(hf.HFSampler, "generate")
elif where == "scoring":
    patch(guides.GuideScorer, "score")
else:
    patch(module.InverseQModule, "backward")
# train.py run as __main__ here, sys.argv[0] left alone (runpy would set it to train.py, and the
# other ranks, started with this process's command line, would run without the patch).
exec(compile(open({train!r}).read(), {train!r}, "exec"), {{"__name__": "__main__", "__file__": {train!r}}})
'''

ARGS = ["model=tiny", "lr=1e-4", "epochs=1", "samples_per_epoch=4", "micro_batch_size=2", "sampler.max_new_tokens=6", "logger=csv",
        "val.prompts=2", "val.batch_size=2", "strategy.accelerator=cpu"]
# One shared-core 2-process run takes about 20 s; a hang would last the gloo timeout (30 min).
PROMPT_S = 120


def _alive(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (this test's run directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.parametrize(
    "where, rank, devices",
    [("sampling", 1, 2), ("training", 0, 2), ("scoring", 0, 1), ("validation", 0, 1)],
)
def test_an_out_of_memory_rank_stops_every_rank_with_one_line(where, rank, devices, tmp_path):
    wrapper = tmp_path / "oom_train.py"
    wrapper.write_text(WRAPPER.format(train=str(REPO / "train.py"), repo=str(REPO)))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(wrapper), *ARGS, f"strategy.devices={devices}", f"hydra.run.dir={run_dir}"]
    if devices > 1:
        cmd.append("strategy=ddp")
    started = time.monotonic()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "OOM_AT": f"{where}:{rank}"}, timeout=PROMPT_S, cwd=tmp_path)
    finally:
        time.sleep(1)
        left = _alive(str(run_dir))
        for pid in left:  # a hung rank of this test, not to outlive it
            os.kill(pid, 9)
    assert not left, f"ranks still running after the run returned: {left}"
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    what = {"sampling": "during sampling", "scoring": "during guide scoring", "training": "during a training step", "validation": "during validation"}
    assert lines[0].startswith(f"error: CUDA out of memory on rank {rank} {what[where]} (tried to allocate 2.00 gib): the memory plan puts {where} at ")
    assert "; try " in lines[0] and lines[0].endswith("every rank was stopped")
    assert time.monotonic() - started < PROMPT_S


def test_budgets_name_each_phase_figure_and_its_own_fix():
    gib = 2**30
    plan = MemoryPlan(
        items=(
            PlanItem("weights", 4 * gib, "model.dtype=bfloat16"),
            PlanItem("KV cache", 1 * gib, "sampler.batch_size=8", ("sampling",)),
            PlanItem("activations", 3 * gib, "model.gradient_checkpointing=true", ("training",)),
            PlanItem("vLLM", 2 * gib, "sampler.options.kv_cache_gib=1", ("sampling", "scoring")),
        ),
        device="cuda", capacity_bytes=80 * gib, world_size=8,
    )
    budgets = budgets_from_plan(plan)
    assert budgets["sampling"] == PhaseBudget(7.0, "sampler.batch_size=8")  # the phase's own item, not the larger weights
    assert budgets["scoring"] == PhaseBudget(6.0, "model.dtype=bfloat16")  # nothing of its own: its largest item
    assert budgets["training"] == PhaseBudget(7.0, "model.gradient_checkpointing=true")
    assert budgets[None] == budgets["sampling"]  # the peak phase (sampling and training tie at 7; the first wins)


def test_the_line_outside_the_marked_phases_names_the_peak():
    import torch

    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.")
    line = out_of_memory_line(exc, 3, {None: PhaseBudget(70.25, "micro_batch_size=1")}, 79.2)
    assert line == (
        "CUDA out of memory on rank 3 outside sampling, scoring, training steps and validation (tried to allocate 20.00 mib): "
        "the memory plan puts its peak phase at 70.2 of 79.2 GiB per device; try micro_batch_size=1; every rank was stopped"
    )
