"""One log line per epoch: the training loss, the KL estimate, validation's principle rate and
the seconds each phase took, so a run can be followed from its log without a progress bar or a
W&B sync.

A Lightning logger rather than a callback: Lightning aggregates an epoch's logged values (the
module's training time among them) after every epoch-end hook, and hands them to the loggers
right then, before the next epoch samples; validation has logged its figures (and time/val_s)
to every logger just before.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

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
    return f"epoch {epoch} ({epoch + 1} of {epochs}): " + " | ".join(parts)  # 0-based, as the files, plots and validation lines count


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


class EpochSummary(Logger):
    """Logs `summary_line` for every trained epoch (rank zero), from what is logged to it."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self._validation: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "epoch_summary"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if "epoch" not in metrics:
            return
        epoch = int(metrics["epoch"])
        held = {k.removeprefix("val/"): v for k, v in metrics.items() if k.startswith("val/")}
        if held:
            self._validation[epoch] = {**held, "seconds": metrics.get("time/val_s", math.nan)}
        if "train/loss_epoch" in metrics:
            log.info(summary_line(epoch, self.epochs, metrics, self._validation.pop(epoch, None)))
