"""One log line per epoch: the training loss, the KL estimate, validation's principle rate and
the seconds each phase took, so a run can be followed from its log without a progress bar or a
W&B sync.

The line is written once all of an epoch's figures exist: Lightning aggregates the epoch's
logged values (and the module logs its training time) after the callbacks' own epoch-end hooks,
so the line for epoch N is written when epoch N+1 starts, or when training ends.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

# (metric, label) in the order shown; phases in the order an epoch runs them.
TRAIN_FIGURES = (("train/loss_epoch", "loss"), ("train/kl_pi_hat_est_rollouts", "KL est. (rollouts)"))
VAL_FIGURES = (("principle_rate", "principle rate"), ("kl_pi_hat_exact_heldout", "KL exact (held out)"), ("truncated", "truncated"))
PHASES = (
    ("time/weight_sync_s", "sync"),
    ("time/sample_s", "sample"),
    ("time/score_s", "score"),
    ("time/train_s", "train"),
    ("val", "val"),
    ("time/checkpoint_s", "checkpoint"),
)


def summary_line(epoch: int, epochs: int, metrics: Mapping[str, float], validation: Mapping[str, float] | None) -> str:
    """`epoch 2/4: loss 0.012, KL est. (rollouts) 0.45 | principle rate 0.62, ... | s: sample 12, ...`;
    figures that were not logged are left out. `validation`: that epoch's held-out figures."""
    def number(value: float) -> str:
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"

    train = [f"{label} {number(float(metrics[key]))}" for key, label in TRAIN_FIGURES if _finite(metrics.get(key))]
    parts = [", ".join(train)] if train else []
    if validation is not None:
        held = [f"{label} {number(validation[key])}" for key, label in VAL_FIGURES if _finite(validation.get(key))]
        if not _finite(validation.get("principle_rate")):
            held.insert(0, "principle rate n/a (no check)")
        parts.append(", ".join(held))
    seconds = dict(metrics)
    if validation is not None and _finite(validation.get("seconds")):
        seconds["val"] = validation["seconds"]
    phases = [f"{label} {float(seconds[key]):.1f}" for key, label in PHASES if _finite(seconds.get(key))]
    if phases:
        parts.append("seconds: " + ", ".join(phases))
    return f"epoch {epoch + 1}/{epochs}: " + " | ".join(parts)


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class EpochSummary(Callback):
    """Logs `summary_line` for every finished epoch (rank zero). `validation`: the Validation
    callback, whose newest figures (`last`) belong to the epoch when it validated after it."""

    def __init__(self, validation=None):
        self.validation = validation
        self._pending: int | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = trainer.current_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        epoch, self._pending = self._pending, None
        if epoch is None or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        last = getattr(self.validation, "last", None)
        validation = last if last is not None and last.get("epoch") == epoch else None
        log.info(summary_line(epoch, trainer.max_epochs, metrics, validation))
