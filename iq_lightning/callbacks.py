"""Per-epoch artefacts of a training run that evaluation reads back: the policy after each epoch
(reward-model curves, paper Fig. 6) and token-credit maps of a few samples (Fig. 8)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from transformers import PreTrainedTokenizerBase

from iq_lightning.analysis import (
    CREDIT_QUANTILE,
    SCALE_FILE,
    credit_scale,
    rollout_credit_html,
    rollout_credits,
    safe_filename,
    scale_note,
)
from iq_lightning.models import export_policy
from iq_lightning.rollouts import read_rollouts

log = logging.getLogger(__name__)

POLICY_DIR = "policies"
CREDIT_DIR = "credit"


def epoch_policy_dir(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / POLICY_DIR / f"epoch_{epoch:03d}"


class EpochPolicyExport(Callback):
    """policies/epoch_NNN/: the policy as it is after epoch NNN, loadable by plain transformers
    (for LoRA: the adapter plus merged/)."""

    def __init__(self, run_dir: Path, tokenizer: PreTrainedTokenizerBase):
        self.run_dir, self.tokenizer = Path(run_dir), tokenizer

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank takes part: a sharded policy is gathered collectively; rank zero writes.
        out = epoch_policy_dir(self.run_dir, trainer.current_epoch)
        export_policy(pl_module.policy, self.tokenizer, out, merge=True, is_writer=trainer.is_global_zero)


class CreditMaps(Callback):
    """credit/epoch_NNN/*.html for the first `per_epoch` samples of each epoch, also sent to W&B.
    Costs no model call: the targets and reference log-probs are stored with each rollout.

    Every page of a run shares one colour scale, fixed from the first epoch's credits and kept in
    credit/scale.json (a resumed run reuses it), so pages of different epochs compare; each page
    states it, with alpha and beta."""

    def __init__(
        self, run_dir: Path, rollout_path, tokenizer: PreTrainedTokenizerBase, per_epoch: int, beta: float, alpha: float | None = None
    ):
        self.run_dir, self.rollout_path = Path(run_dir), rollout_path
        self.tokenizer, self.per_epoch, self.beta, self.alpha = tokenizer, per_epoch, beta, alpha

    def scale(self, epoch: int, rollouts: list) -> tuple[float, str]:
        """The run's colour scale: stored, or fixed now from this (the first) epoch's credits."""
        path = self.run_dir / CREDIT_DIR / SCALE_FILE
        if path.is_file():
            stored = json.loads(path.read_text())
            return float(stored["scale"]), stored["note"]
        value = credit_scale(rollout_credits(rollouts, self.beta))
        note = scale_note(value, f"epoch {epoch}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"scale": value, "note": note, "epoch": epoch, "quantile": CREDIT_QUANTILE, "beta": self.beta}))
        return value, note

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.rollout_path(trainer.current_epoch)
        if not trainer.is_global_zero or not path.exists():
            return
        out = self.run_dir / CREDIT_DIR / f"epoch_{trainer.current_epoch:03d}"
        out.mkdir(parents=True, exist_ok=True)
        rollouts = read_rollouts(path)
        scale, note = self.scale(trainer.current_epoch, rollouts)
        pages = []
        for i, rollout in enumerate(rollouts[: self.per_epoch]):
            page = rollout_credit_html(rollout, self.tokenizer, self.beta, alpha=self.alpha, scale=scale, scale_note=note)
            (out / f"{i:02d}_{safe_filename(rollout.prompt_id)}.html").write_text(page, encoding="utf-8")
            pages.append(page)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger" and pages:
                import wandb

                logger.experiment.log({"credit_maps": [wandb.Html(p) for p in pages], "trainer/global_step": trainer.global_step})
