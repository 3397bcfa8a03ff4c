"""Non-finite numbers stop training loudly, or skip a few steps where the user allows it.

Checked, each once per micro-batch or step (a reduction over tensors already at hand):
- the guide targets log pi_hat(y_t) of a micro-batch, before they enter the loss;
- the loss L(theta) of Algorithm 1, before backward;
- the gradient norm ||g||_2 = sqrt(sum_p ||g_p||^2), between backward and the optimizer step
  (left to the loss scaler under 16-mixed, which overflows and skips on purpose);
- the policy's parameters once per epoch, before the epoch's checkpoint is written.

A rank that stopped alone would leave the others waiting in their next collective, so every
verdict is taken on flags summed over the ranks: all ranks skip, or all stop, together.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from iq_lightning.errors import NonFiniteError

log = logging.getLogger(__name__)

TARGETS = "guide targets log pi_hat(y_t)"
LOSS = "loss"
GRAD_NORM = "gradient norm"
PARAMETERS = "policy parameters"


def norm_is_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """isfinite(sqrt(sum_p ||t_p||^2)) as a 0-dim bool tensor (True for no tensors). One norm per
    tensor, in float32; a NaN or inf anywhere, or a sum of squares past float32's range, is False."""
    if not tensors:
        return torch.tensor(True)
    norms = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32).to(tensors[0].device) for t in tensors])
    return torch.isfinite(torch.linalg.vector_norm(norms))


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every element of every tensor finite, as a 0-dim bool tensor."""
    if not tensors:
        return torch.tensor(True)
    return torch.stack([torch.isfinite(t).all().to(tensors[0].device) for t in tensors]).all()


class NonFiniteGuard:
    """The run's allowance of skipped steps (`train.nonfinite_skips`) and what is pending for the
    coming optimizer step. Verdicts come from flags already summed over the ranks."""

    def __init__(self, allowance: int = 0):
        self.allowance = allowance
        self.skipped = 0
        self.pending: str | None = None  # what a micro-batch since the last step found non-finite

    def found(self, what: str, epoch: int, step: int, can_skip: bool) -> None:
        """Something non-finite in the coming optimizer step: mark the step to be skipped, or
        stop the run now when the allowance is spent (or the strategy cannot skip)."""
        if not (can_skip and self.skipped < self.allowance):
            self.stop(what, epoch, step, "" if can_skip or not self.allowance else " (this strategy cannot skip a step)")
        self.pending = self.pending or what

    def take_pending(self) -> str | None:
        """What the coming step was marked for, clearing the mark."""
        what, self.pending = self.pending, None
        return what

    def skip(self, what: str, epoch: int, step: int) -> None:
        self.skipped += 1
        log.warning(
            "non-finite %s at epoch %d, step %d: optimizer step skipped (%d of nonfinite_skips=%d)",
            what, epoch, step, self.skipped, self.allowance,
        )

    def stop(self, what: str, epoch: int, step: int, note: str = "") -> None:
        if not note and self.allowance and self.skipped >= self.allowance:
            note = f" after {self.skipped} skipped steps (nonfinite_skips={self.allowance})"
        raise NonFiniteError(
            f"non-finite {what} at epoch {epoch}, step {step}{note}: training stopped, checkpoints/ "
            "holds only completed epochs and final/ is not written; lower lr, set max_grad_norm or "
            "check the guides (nonfinite_skips=N skips a few such steps)"
        )
