"""Per-epoch artefacts of a training run that evaluation reads back: the policy after each epoch
(reward-model curves, paper Fig. 6) and token-credit maps of a few samples (Fig. 8)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from transformers import PreTrainedTokenizerBase

from iq_lightning.analysis import rollout_credit_html, safe_filename
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
    Costs no model call: the targets and reference log-probs are stored with each rollout."""

    def __init__(self, run_dir: Path, rollout_path, tokenizer: PreTrainedTokenizerBase, per_epoch: int, beta: float):
        self.run_dir, self.rollout_path = Path(run_dir), rollout_path
        self.tokenizer, self.per_epoch, self.beta = tokenizer, per_epoch, beta

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.rollout_path(trainer.current_epoch)
        if not trainer.is_global_zero or not path.exists():
            return
        out = self.run_dir / CREDIT_DIR / f"epoch_{trainer.current_epoch:03d}"
        out.mkdir(parents=True, exist_ok=True)
        pages = []
        for i, rollout in enumerate(read_rollouts(path)[: self.per_epoch]):
            page = rollout_credit_html(rollout, self.tokenizer, self.beta)
            (out / f"{i:02d}_{safe_filename(rollout.prompt_id)}.html").write_text(page, encoding="utf-8")
            pages.append(page)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger" and pages:
                import wandb

                logger.experiment.log({"credit_maps": [wandb.Html(p) for p in pages], "trainer/global_step": trainer.global_step})
