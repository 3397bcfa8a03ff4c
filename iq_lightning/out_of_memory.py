"""A CUDA out-of-memory error stops every rank at once, with one line that says what to change.

Left alone, the rank that ran out of memory raises, and the other ranks wait in their next
collective (a gradient all-reduce, a ZeRO-3 gather) until the process group times out, tens of
minutes later. Here the failing rank names the phase it was in (`phase` marks sampling, guide
scoring and validation; `StopOnOutOfMemory` knows when a training step runs, backward and
optimizer step included), the memory plan's figure for that phase and the override that shrinks
it, and ends the run:

- the rank that launched the others (Lightning's launcher, global rank 0) kills them first;
- any other rank exits non-zero, and the launcher's watcher (Lightning's child-process observer;
  torchrun's agent; `srun --kill-on-bad-exit`) kills the rest.

Either way the failing rank raises `OutOfMemoryStop`, a UserError the entry point prints as one
`error: ...` line.
"""

from __future__ import annotations

import contextlib
import re
import signal
from dataclasses import dataclass
from typing import Iterator, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from iq_lightning.errors import UserError

# The phases marked here, by the memory plan's names for them (memory_plan.PHASES).
SAMPLING, SCORING, TRAINING, VALIDATION = "sampling", "scoring", "training", "validation"
_WHAT = {SAMPLING: "sampling", SCORING: "guide scoring", TRAINING: "a training step", VALIDATION: "validation"}


class OutOfMemoryStop(UserError):
    """A device ran out of memory; every rank has been stopped."""


@dataclass(frozen=True)
class PhaseBudget:
    """The memory plan's figure for one phase (GiB per device) and the override that shrinks it most."""

    gib: float
    fix: str


def budgets_from_plan(plan) -> dict[str | None, PhaseBudget]:
    """PhaseBudget per phase of a memory_plan.MemoryPlan, and under None its peak phase's (for an
    error outside the marked phases). A phase's fix is that of its largest item alive in it
    alone (what the phase itself adds), else of its largest item with a fix."""
    budgets: dict[str | None, PhaseBudget] = {}
    for phase in (SAMPLING, SCORING, TRAINING, VALIDATION, plan.peak_phase()):
        alive = [i for i in plan.items if phase in i.phases and i.fix]
        own = [i for i in alive if i.phases == (phase,)]
        fix = max(own or alive, key=lambda i: i.bytes).fix if alive else "a device with more memory"
        budgets[phase] = PhaseBudget(plan.phase_bytes(phase) / 2**30, fix)
    budgets[None] = budgets[plan.peak_phase()]
    return budgets


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Marks an out-of-memory error raised inside with the phase `name` (the innermost mark wins)."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        if getattr(exc, "phase", None) is None:
            exc.phase = name
        raise


def out_of_memory_line(exc: BaseException, rank: int, budgets: Mapping[str | None, PhaseBudget], capacity_gib: float | None) -> str:
    """The one line: where it happened, what the plan expected there, what to change."""
    name = getattr(exc, "phase", None)
    budget = budgets.get(name) or budgets.get(None)
    where = f"during {_WHAT[name]}" if name in _WHAT else "outside sampling, scoring, training steps and validation"
    tried = re.search(r"Tried to allocate [\d.]+ \w+", str(exc))
    line = f"CUDA out of memory on rank {rank} {where}" + (f" ({tried.group(0).lower()})" if tried else "")
    if budget is not None:
        plan_phase = name if name in _WHAT else "its peak phase"
        of = f" of {capacity_gib:.1f}" if capacity_gib else ""
        line += f": the memory plan puts {plan_phase} at {budget.gib:.1f}{of} GiB per device; try {budget.fix}"
    return line + "; every rank was stopped"


class StopOnOutOfMemory(Callback):
    """Turns an out-of-memory error on this rank into `OutOfMemoryStop` and stops the other ranks
    (see the module docstring). `budgets`: `budgets_from_plan` of the run's plan."""

    def __init__(self, budgets: Mapping[str | None, PhaseBudget], capacity_gib: float | None = None):
        self.budgets = dict(budgets)
        self.capacity_gib = capacity_gib
        self._in_step = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._in_step = True  # forward, backward and the optimizer step run before on_train_batch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_step = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, torch.OutOfMemoryError):
            return
        if getattr(exception, "phase", None) is None and self._in_step:
            exception.phase = TRAINING
        line = out_of_memory_line(exception, trainer.global_rank, self.budgets, self.capacity_gib)
        stop_launched_ranks(trainer)
        raise OutOfMemoryStop(line) from exception


def stop_launched_ranks(trainer: L.Trainer) -> None:
    """Kill the processes this one launched (Lightning's launcher on global rank 0; elsewhere it
    launched none): they may be waiting in a collective this rank will never join. SIGKILL, as
    Lightning's own observer uses: a process inside a collective ignores SIGTERM."""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, _SubprocessScriptLauncher):
        launcher.kill(getattr(signal, "SIGKILL", signal.SIGTERM))
