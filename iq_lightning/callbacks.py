"""Per-epoch artefacts of a training run: the checkpoint a restart resumes from, and what
evaluation reads back: the policy after each epoch (reward-model curves, paper Fig. 6) and
token-credit maps of a few samples (Fig. 8)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, Checkpoint
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
from iq_lightning.checkpoint_io import KEY_FILE, MANIFEST_SUFFIX, digests_of, manifest_path, manifest_text, verify
from iq_lightning.errors import UserError
from iq_lightning.models import export_policy
from iq_lightning.files import fsync_dir, write_atomically
from iq_lightning.rollouts import read_rollouts

log = logging.getLogger(__name__)

POLICY_DIR = "policies"
CREDIT_DIR = "credit"


LAST_LINK = "last.ckpt"
_EPOCH_CHECKPOINT = re.compile(r"^epoch(\d+)(?:-v\d+)?\.ckpt$")  # -vN: written by older versions


def epoch_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints in `directory`, (epoch, path) oldest first. A checkpoint is a file,
    or a directory for the sharded strategies; it only ever appears under its final name complete."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _EPOCH_CHECKPOINT.match(path.name)
        if match and not path.is_symlink():
            found.append((int(match.group(1)), path))
    return sorted(found, key=lambda item: (item[0], item[1].stat().st_mtime))


def _epoch_number(checkpoint: Path) -> int:
    match = _EPOCH_CHECKPOINT.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def last_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint, by the epoch in its name. The `last.ckpt` link is only a
    convenience: it is stale after a kill between the checkpoint's rename and the link's update,
    and older versions left it pointing at an old epoch after a run directory was moved."""
    found = epoch_checkpoints(directory)
    if found:
        return found[-1][1]
    legacy = Path(directory) / LAST_LINK  # a run directory of a version that kept only last.ckpt
    return legacy if legacy.exists() else None


def resumable_checkpoint(directory: str | Path, key_file: Path = KEY_FILE) -> Path | None:
    """The newest checkpoint whose files hash to its manifest: a damaged or cut-short newer one
    is skipped with one line saying which and why (an older one, or the start, is resumed from;
    a finished epoch's stored rollouts are reused, so the run still ends with the same weights)."""
    found = [path for _, path in epoch_checkpoints(directory)]
    if not found:
        return last_checkpoint(directory)
    for newer, path in reversed(list(enumerate(found))):
        reason = verify(path, key_file)
        if reason is None:
            return path
        fallback = found[newer - 1].name if newer else "the first epoch (the stored rollouts are reused)"
        log.warning("skipped the checkpoint %s: %s; resuming from %s", path, reason, fallback)
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_tree(path: Path) -> None:
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _without_zip_crc():
    """torch.save without the CRC32 of every record: torch.load never checks it (a flipped byte
    in a record loads silently either way), and computing it took most of torch.save's time for
    SmolLM2's 1.6 GB checkpoint (1.8-4.7 s against 0.5-0.8 s without). Completeness comes from
    writing under a temporary name, fsync and rename; integrity from the SHA-256 manifest that a
    resume checks (checkpoint_io.verify)."""
    try:
        from torch.utils.serialization import config
        before = config.save.compute_crc32
    except (ImportError, AttributeError):  # a torch without the switch: it computes the CRC
        yield
        return
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


class EpochCheckpoint(Checkpoint):
    """checkpoints/epochNNN.ckpt after every completed epoch; only the newest is kept.

    Written under a temporary name, synced, then renamed: a checkpoint under its final name is
    complete, whatever moment a kill -9 or a full disk strikes; a restart resumes from the highest
    epoch found (`last_checkpoint`). `last.ckpt` is a relative link to it, replaced atomically.
    No paths are stored in the callback's state (Lightning's ModelCheckpoint keeps its directory's
    absolute path and, resumed from a moved run directory, writes last-v1.ckpt and stops pruning)."""

    def __init__(self, dirpath: str | Path, key_file: Path = KEY_FILE):
        self.dirpath = Path(dirpath)
        self.key_file = key_file

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # A kill or a full disk mid-write leaves only a *.tmp, never read, or a manifest whose
        # checkpoint was not renamed into place yet: remove them (the run directory is locked).
        self.pending: tuple[Path, Path] | None = None
        self.trainer = trainer
        if trainer.is_global_zero and self.dirpath.is_dir():
            for leftover in self.dirpath.glob("*.tmp"):
                _remove(leftover)
            for manifest in self.dirpath.glob("*" + MANIFEST_SUFFIX):
                if not manifest.with_name(manifest.name.removesuffix(MANIFEST_SUFFIX)).exists():
                    _remove(manifest)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        # The epoch's metrics are reduced over the ranks (sync_dist) the first time they are read;
        # the progress bar reads them on rank zero only, so every rank must read them here, as
        # Lightning's ModelCheckpoint does, or that reduction waits forever for the other ranks.
        _ = trainer.callback_metrics
        epoch = trainer.current_epoch
        started = time.perf_counter()
        final = self.dirpath / f"epoch{epoch:03d}.ckpt"
        tmp = self.dirpath / f"epoch{epoch:03d}.ckpt.tmp"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
        trainer.strategy.barrier("EpochCheckpoint.prepare")
        try:
            with _without_zip_crc():
                trainer.save_checkpoint(tmp, weights_only=False)
            if trainer.is_global_zero:
                _fsync_tree(tmp)
                self._write_manifest(trainer, tmp, final)
        except OSError as exc:
            if trainer.is_global_zero:
                _remove(tmp)
                _remove(manifest_path(final))
            raise UserError(
                f"cannot write the checkpoint of epoch {epoch} to {self.dirpath} ({exc.strerror or exc}); "
                "nothing half-written was kept: free space and rerun the same command to resume"
            ) from None
        trainer.strategy.barrier("EpochCheckpoint.written")
        # The write, read-back and fsync of the whole run's state (optimizer included), between barriers.
        pl_module.log("time/checkpoint_s", time.perf_counter() - started, on_epoch=True, sync_dist=True)
        # Renamed into place only once Lightning has logged the epoch's metrics (after every
        # on_train_epoch_end hook): a kill before the rename redoes the epoch, its rows included;
        # after it, the rows are on disk (a kill in between lost the epoch's row for good).
        self.pending = (tmp, final)

    def commit(self) -> None:
        """Put the pending checkpoint into place. Called by the data module before it reads or
        draws the next epoch's samples (Lightning reloads the data before on_train_epoch_start;
        a kill while sampling must not cost the finished epoch), and at the end of training."""
        if getattr(self, "trainer", None) is not None:
            self._commit(self.trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._commit(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._commit(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning stops for SIGTERM after counting an epoch complete (its metrics logged) when
        # the signal came in the epoch's last step: that epoch's checkpoint is good to keep.
        pending = getattr(self, "pending", None)
        if pending is not None and trainer.fit_loop.epoch_progress.current.completed > _epoch_number(pending[1]):
            self._commit(trainer, barrier=False)  # a rank that died would never reach a barrier

    def _write_manifest(self, trainer: L.Trainer, tmp: Path, final: Path) -> None:
        """`<final>.sha256`, written before the checkpoint is renamed into place: the files as read
        back from disk, which must match what was streamed (a file checkpoint's own bytes)."""
        found = digests_of(tmp)
        streamed = getattr(trainer.strategy.checkpoint_io, "digests", {}).pop(str(tmp), None)
        if streamed is not None and found != {"": streamed}:
            raise OSError(f"{tmp.name} read back differs from what was written")
        write_atomically(manifest_path(final), manifest_text(found, self.key_file))

    def _commit(self, trainer: L.Trainer, barrier: bool = True) -> None:
        if getattr(self, "pending", None) is None:
            return
        tmp, final = self.pending
        self.pending = None
        if trainer.is_global_zero:
            if final.is_dir():  # os.replace overwrites a file, not a directory (sharded strategies)
                _remove(final)
            os.replace(tmp, final)
            self._link_last(final)
            fsync_dir(self.dirpath)
            # The previous checkpoint goes only now: the new one is complete, read back and in place.
            for _, path in epoch_checkpoints(self.dirpath):
                if path != final:
                    _remove(path)
                    _remove(manifest_path(path))
            for stale in self.dirpath.glob("last-v*.ckpt"):  # older versions' copies
                _remove(stale)
        if barrier:
            trainer.strategy.barrier("EpochCheckpoint.done")

    def _link_last(self, final: Path) -> None:
        last, link_tmp = self.dirpath / LAST_LINK, self.dirpath / (LAST_LINK + ".tmp")
        try:
            if last.exists() and not last.is_symlink():  # an older version's copy
                _remove(last)
            _remove(link_tmp)
            os.symlink(final.name, link_tmp)
            os.replace(link_tmp, last)
        except OSError as exc:  # a file system without links: the link is only a convenience
            log.debug("no %s link: %s", last, exc)


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
        write_atomically(path, json.dumps({"scale": value, "note": note, "epoch": epoch, "quantile": CREDIT_QUANTILE, "beta": self.beta}))
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
