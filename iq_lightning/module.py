"""The LightningModule: the trainable policy pi_theta, the frozen guides and the objective (Inverse-Q* by default)."""

from __future__ import annotations

import time

import lightning as L
import torch
from transformers import PreTrainedModel

from iq_lightning.config import StrategySpec
from iq_lightning.device_memory import PhasePeaks
from iq_lightning.guides import GuideScorer
from iq_lightning.nonfinite import GRAD_NORM, LOSS, PARAMETERS, TARGETS, NonFiniteGuard, all_finite, norm_is_finite
from iq_lightning.objective import inverse_q_loss, token_credit
from iq_lightning.objectives import InverseQ, Objective
from iq_lightning.rank_models import RankModels
from iq_lightning.strategies import Replicated, Sharding
from iq_lightning.throughput import ModelFlops, TrainingThroughput, device_peak_flops, logprob_gap


def fused_kernel_devices() -> set[str]:
    """Device types with fused optimizer kernels. torch's own list is private
    (torch.utils._foreach_utils); should it move, each device type is asked instead by stepping a
    one-element fused AdamW there (`_fused_adamw_works`)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return {device for device in ("cpu", "cuda") if _fused_adamw_works(device)}
    return set(_get_fused_kernels_supported_devices())


def _fused_adamw_works(device_type: str) -> bool:
    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    try:
        param = torch.nn.Parameter(torch.zeros(1, device=device_type))
        param.grad = torch.zeros_like(param)
        torch.optim.AdamW([param], fused=True).step()
    except (RuntimeError, ValueError):
        return False
    return True


class InverseQModule(L.LightningModule):
    """Regresses log pi_theta(y_t) onto the stored targets log pi_hat(y_t) (Algorithm 1).

    The guide scorer is kept as a plain attribute, not a submodule: the training strategy neither
    trains, checkpoints nor wraps it (under ZeRO-3 / FSDP it is sharded on its own terms, see
    strategies.py). Targets are computed by the DataModule before each epoch's training phase.

    Given `models` instead of a policy and a guide, the module builds them when the trainer is
    ready: the guides in `setup`, the policy in `configure_model` (inside the strategy's
    sharding context), so a sharded run never holds whole weights on every rank.
    """

    def __init__(
        self,
        policy: PreTrainedModel | None,
        guide: GuideScorer | None,
        lr: float,
        beta: float = 0.1,
        reduction: str = "token_mean",
        weight_decay: float = 0.0,
        guide_device: str | None = None,
        models: RankModels | None = None,
        nonfinite_skips: int = 0,
        objective: Objective | None = None,
        flops: ModelFlops | None = None,
    ):
        super().__init__()
        self.policy = policy
        self.guide = guide
        self.models = models
        self.lr = lr
        self.beta = beta
        self.reduction = reduction
        self.objective = objective or InverseQ(reduction)
        self.weight_decay = weight_decay
        self.guide_device = guide_device
        self.nonfinite = NonFiniteGuard(nonfinite_skips)
        self.sharding: Sharding = models.sharding if models is not None else Replicated(StrategySpec())
        self.heads: torch.nn.Module | None = None  # the objective's own trainable part (PPO's value head)
        if policy is not None:
            self._attach_heads()
        self.save_hyperparameters(ignore=["policy", "guide", "models", "objective", "flops"])
        self._epoch_started = 0.0
        self._train_peaks: PhasePeaks | None = None
        self.flops = flops  # the policy's sizes for model FLOPs and MFU (throughput.py)
        self._throughput = TrainingThroughput(flops)
        self._epoch_first_step = 0

    def setup(self, stage: str) -> None:
        if self.guide is None:
            self.guide = self.models.guide(self.global_rank, lambda: self.policy)

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy = self.models.policy()
            # from_pretrained returns a model in eval mode; training runs in train mode (dropout as
            # configured, and HF's gradient checkpointing acts only in train mode). The samplers
            # and validation switch to eval mode for generation and back.
            self.policy.train()
            self._attach_heads()

    def _attach_heads(self) -> None:
        """Registered as a submodule: in the optimizer, the state_dict (checkpoints) and DDP's sync."""
        self.heads = self.objective.make_heads(self.policy)

    def _trained(self) -> torch.nn.Module:
        """Everything the optimizer steps: the policy, and the objective's heads where it has any."""
        return self.policy if self.heads is None else torch.nn.ModuleList([self.policy, self.heads])

    def on_fit_start(self) -> None:
        # Targets are computed before each training phase, so whole guides may live elsewhere
        # (e.g. on CPU while the policy trains on the GPU); sharded ones stay where their shards are.
        if self.models is None or not self.models.guides_sharded:
            self.guide.to(self.guide_device or self.device)
        # The objective's own frozen models (PPO's reward model), per rank, where whole guides are.
        self.objective.load_models(self.models.tokenizer if self.models is not None else None, self.guide_device or self.device)

    def batch_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The objective's loss on one micro-batch of rollouts, and diagnostics that every
        objective logs against the same stored targets (so runs of different objectives compare)."""
        step = self.objective.step(self.policy, batch, self.guide)
        mask = batch["response_mask"]
        targets = batch["target_logprobs"]
        with torch.no_grad():
            policy_logprobs = step.policy_logprobs.detach()
            tokens = mask.sum().clamp(min=1.0)
            log_ratio = (targets - policy_logprobs) * mask  # log pi_hat - log pi_theta
            # k3 estimator of KL(pi_theta || pi_hat) on tokens sampled from pi_theta: unbiased, >= 0.
            # On the epoch's own rollouts, which the step is fitting: it falls as they are fitted,
            # while validation's exact KL on held-out greedy answers (val/kl_pi_hat_exact_heldout) need not.
            kl = ((torch.exp(log_ratio) - 1.0 - log_ratio) * mask).sum() / tokens
            credit = token_credit(targets, batch["ref_logprobs"], self.beta) * mask
            metrics = {
                # Inverse-Q*'s regression error, whatever the objective: one scale for all of them.
                "loss_token_mean": inverse_q_loss(policy_logprobs, targets, mask, "token_mean"),
                "log_ratio_mean": log_ratio.sum() / tokens,
                "kl_pi_hat_est_rollouts": kl,
                "credit_mean": credit.sum() / tokens,
                "response_length": mask.sum(-1).mean(),
                **step.figures,
            }
        return {"loss": step.loss, "policy_logprobs": policy_logprobs, **metrics}

    def _on_any_rank(self, flags: torch.Tensor) -> torch.Tensor:
        """`flags` (0/1 per check) summed over the ranks: every rank takes the same verdict."""
        return self.trainer.strategy.reduce(flags.to(self.device, torch.float32), reduce_op="sum") > 0

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._throughput.add(batch)
        targets_finite = torch.isfinite(batch["target_logprobs"]).all()  # padding is 0, not junk
        metrics = self.batch_metrics(batch)
        bad = self._on_any_rank(torch.stack([~targets_finite, ~torch.isfinite(metrics["loss"].detach())]))
        if bad.any():
            # Backward still runs (under DDP every rank must take part in the gradient all-reduce);
            # the step's gradients are then discarded in on_before_optimizer_step, or the run stops here.
            self.nonfinite.found(TARGETS if bad[0] else LOSS, self.current_epoch, self.global_step, self.sharding.discards_gradients)
            return metrics["loss"]
        size = batch["response_ids"].shape[0]
        # sync_dist: with DDP the epoch figures average every rank's share, not rank 0's alone.
        self.log("train/loss", metrics["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        per_token = {"loss_token_mean", "log_ratio_mean", "kl_pi_hat_est_rollouts", "credit_mean"}
        tokens = int(batch["response_mask"].sum().item())
        # Token-level figures are averaged over the epoch's tokens, not its micro-batches.
        self.log_dict(
            {f"train/{k}": v for k, v in metrics.items() if k in per_token},
            on_step=False,
            on_epoch=True,
            batch_size=max(tokens, 1),
            sync_dist=True,
        )
        self.log("train/response_length", metrics["response_length"], on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        if self._measures_sampler_gap(batch):
            gap, gap_tokens = logprob_gap(batch["sampling_logprobs"], metrics["policy_logprobs"], batch["response_mask"])
            self.log("train/sampler_logprob_gap", gap, on_step=False, on_epoch=True, batch_size=max(gap_tokens, 1), sync_dist=True)
        # The objective's own figures (StepLoss.figures: DPO's reward accuracy, PPO's losses and
        # clip fractions), epoch means over micro-batch rows.
        figures = {f"train/{k}": v for k, v in metrics.items() if k not in per_token | {"loss", "response_length", "policy_logprobs"}}
        if figures:
            self.log_dict(figures, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        return metrics["loss"]

    def _measures_sampler_gap(self, batch) -> bool:
        """Before the epoch's first optimizer step the policy holds the weights its samples were
        drawn with: only then do the sampler's log-probs and the trainer's describe the same
        model. Not for the data's own replies, samples drawn from x_w (their log-probs are given
        the principle, the trainer's are not) or an epoch trained on epoch 0's samples again."""
        plan = self.objective.plan
        on_policy = not plan.given_pairs and not plan.principle_in_prompt and (plan.on_policy or self.current_epoch == 0)
        return on_policy and "sampling_logprobs" in batch and self.global_step == self._epoch_first_step

    def on_before_optimizer_step(self, optimizer) -> None:
        """Between backward (gradients unscaled) and clipping and the step: skip the step, or stop,
        when a micro-batch's loss or targets (training_step) or the gradient norm is non-finite."""
        if self.nonfinite.pending is None and not self._gradients_finite():
            self.nonfinite.found(GRAD_NORM, self.current_epoch, self.global_step, self.sharding.discards_gradients)
        what = self.nonfinite.take_pending()
        if what is not None:
            self.sharding.discard_gradients(self._trained())
            self.nonfinite.skip(what, self.current_epoch, self.global_step)

    def _gradients_finite(self) -> bool:
        # A loss scaler (16-mixed) overflows on purpose and skips such steps itself.
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return True
        finite = norm_is_finite(self.sharding.local_gradients(self._trained()))
        return not self._on_any_rank(~finite.reshape(1)).any()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """After the epoch's last step, before its checkpoint: a step that took the weights past
        float32's range stops the run here, so the last checkpoint stays a good one.

        Not in on_train_epoch_end: Lightning's progress bar (rank 0 only) syncs the epoch's logged
        metrics there, before the module's hook, and a collective of ours would pair with those."""
        if not self.trainer.is_last_batch:
            return
        finite = all_finite(self.sharding.local_parameters(self._trained()))
        if self._on_any_rank(~finite.reshape(1)).any():
            self.nonfinite.stop(PARAMETERS, self.current_epoch, self.global_step)
        # The epoch's training ends here: callbacks' epoch-end work (validation, the checkpoint)
        # runs before the module's on_train_epoch_end and is timed on its own (time/val_s, time/checkpoint_s).
        self._train_done = time.perf_counter()

    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()
        self._train_done = None
        self._train_peaks = PhasePeaks()
        self._throughput = TrainingThroughput(self.flops)
        self._epoch_first_step = self.global_step

    def on_train_epoch_end(self) -> None:
        stats = dict(getattr(self.trainer.datamodule, "epoch_stats", {}) or {})
        stats["train/nonfinite_skipped"] = self.nonfinite.skipped
        stats["time/train_s"] = (self._train_done or time.perf_counter()) - self._epoch_started
        stats.update(self._throughput.figures(stats["time/train_s"], device_peak_flops(self.device, str(self.trainer.precision))))
        self._train_peaks.mark("train")
        stats.update(self._train_peaks.figures)
        self.log_dict({k: float(v) for k, v in stats.items()}, on_epoch=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_skipped"] = self.nonfinite.skipped  # the allowance is per run, not per restart

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite.skipped = checkpoint.get("nonfinite_skipped", 0)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and self.models is not None and self.models.sharding.clip_gradients(self.policy, gradient_clip_val):
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        groups = [{"params": params}]
        if self.heads is not None:
            groups.append({"params": list(self.heads.parameters()), "lr": self.objective.head_lr or self.lr})
        every = [p for group in groups for p in group["params"]]
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay, fused=self._fused_adamw(every))

    def _fused_adamw(self, params: list[torch.Tensor]) -> bool:
        """The fused AdamW kernel makes one pass over each parameter's state: on 2 CPU cores it
        steps SmolLM2-135M in 0.07 s instead of 0.41 s for the default (a per-tensor loop on CPU;
        foreach 0.38 s), the same update. Lightning's mixed-precision plugins refuse gradient
        clipping with a fused optimizer (they cannot unscale its gradients first), so mixed
        precision keeps the default."""
        supported = fused_kernel_devices()
        mixed = str(self.trainer.precision).endswith("-mixed")
        return not mixed and all(p.device.type in supported and p.is_floating_point() for p in params)
