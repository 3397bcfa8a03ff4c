"""What runs are compared by: tokens per second per device, model FLOPs and MFU, and the gap
between the sampler's log-probs and the trainer's.

Model FLOPs follow PaLM's MFU (Chowdhery et al. 2022, appendix B): a training token costs
6 FLOPs per weight it passes through (2 forward, 4 backward) plus attention's
12 * layers * (heads * head_dim) * T for a sequence of T tokens (QK^T and AV, forward and
backward, counted without the causal halving). Only the work the model needs counts: not the
padding, not gradient checkpointing's recomputation, and the LM head only at the response
positions, the only ones whose logits the training forward computes (forward.response_logits).
With LoRA the frozen weights need no weight gradients (about 4 instead of 6 FLOPs per weight):
the convention still counts 6, so a LoRA run's MFU reads high by up to half.

MFU = achieved model FLOP/s / the device's dense peak for the training precision (`PEAK_FLOPS`,
from the vendors' datasheets; float32 matmuls are not TF32 unless torch is told so). A device
missing from the table (a CPU) gets no MFU, only the achieved TFLOP/s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense (no sparsity) peaks in FLOP/s by precision family, datasheet figures; the first name
# contained in torch.cuda.get_device_name wins, so the specific variants come first.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756.5e12, "fp32": 51.2e12}),
    ("H100 NVL", {"bf16": 835e12, "fp32": 60e12}),
    ("H100", {"bf16": 989.4e12, "fp32": 66.9e12}),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200 NVL", {"bf16": 835e12, "fp32": 60e12}),
    ("H200", {"bf16": 989.4e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "fp32": 19.5e12}),  # SXM4 and PCIe alike
)

# Lightning precision settings whose matmuls run on half-precision tensor cores (fp16 peaks equal bf16's).
_HALF = ("bf16", "16")


def precision_family(precision: str) -> str:
    """"bf16" for bf16 and fp16 precisions (mixed or true), else "fp32"."""
    return "bf16" if str(precision).split("-")[0] in _HALF else "fp32"


def peak_flops(device_name: str | None, precision: str) -> float | None:
    """The device's dense peak FLOP/s for `precision`, or None when the table does not know it."""
    if not device_name:
        return None
    for key, peaks in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peaks[precision_family(precision)]
    return None


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """`peak_flops` of a CUDA device by its name; None elsewhere."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), precision)


@dataclass(frozen=True)
class ModelFlops:
    """The sizes model FLOPs are counted from (see the module docstring).

    body_parameters: the weights every token passes through (decoder layers and final norm; not
    the input embeddings, a lookup; not the LM head). head_parameters: the LM head's
    (vocab x hidden, tied or not). attention_width: heads x head_dim."""

    body_parameters: int
    head_parameters: int
    layers: int
    attention_width: int

    @classmethod
    def of(cls, arch) -> "ModelFlops":
        """From a memory_plan.Architecture (read from the config, no weights)."""
        head = arch.vocab_size * arch.hidden_size
        body = arch.layer_parameters * arch.num_layers + arch.hidden_size
        return cls(body_parameters=body, head_parameters=head, layers=arch.num_layers, attention_width=arch.q_dim)

    def training(self, lengths: torch.Tensor, response_lengths: torch.Tensor) -> float:
        """Forward + backward FLOPs of rows of `lengths` tokens (prompt + response), of which
        `response_lengths` get logits: sum over rows of 6 N_body n + 6 N_head r + 12 L d_attn n^2."""
        n = lengths.double()
        r = response_lengths.double()
        per_row = 6 * self.body_parameters * n + 6 * self.head_parameters * r + 12 * self.layers * self.attention_width * n * n
        return float(per_row.sum())


class TrainingThroughput:
    """Tokens and model FLOPs of an epoch's training micro-batches, as per-device rates."""

    def __init__(self, flops: ModelFlops | None):
        self.flops = flops
        self.tokens = 0
        self.model_flops = 0.0

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        lengths = batch["attention_mask"].sum(-1)
        self.tokens += int(lengths.sum())
        if self.flops is not None:
            self.model_flops += self.flops.training(lengths.cpu(), batch["response_mask"].sum(-1).cpu())

    def figures(self, seconds: float, peak: float | None) -> dict[str, float]:
        """throughput/train_tokens_per_s, and with model sizes the achieved TFLOP/s and (with a peak) MFU."""
        seconds = max(seconds, 1e-9)
        out = {"throughput/train_tokens_per_s": self.tokens / seconds}
        if self.flops is not None:
            achieved = self.model_flops / seconds
            out["throughput/train_tflops_per_s"] = achieved / 1e12
            if peak:
                out["throughput/mfu"] = achieved / peak
        return out


def logprob_gap(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mean |log pi_sampler(y_t) - log pi_theta(y_t)| over the masked tokens, their count).
    With the sampler holding the trainer's weights, at temperature 1 and top_p 1 this is the
    numerical disagreement of two implementations (~0 for HF generate, small for vLLM); stale
    engine weights show up as a large gap."""
    mask = mask.to(torch.float32)
    tokens = int(mask.sum().item())
    gap = ((sampler_logprobs.float() - trainer_logprobs.detach().float()).abs() * mask).sum() / max(tokens, 1)
    return gap, tokens
