"""Peak accelerator memory per phase of an epoch (sampling, guide scoring, training), the figures
the memory plan is checked against on GPUs. Host RSS cannot be reset between phases, so on CPU
there is nothing per phase to report (benchmarks/ measure whole-run peaks per rank instead)."""

from __future__ import annotations

import torch


class PhasePeaks:
    """`mark(name)` records the peak reserved CUDA memory since the previous mark as
    memory/<name>_peak_gib; does nothing without CUDA."""

    def __init__(self) -> None:
        self.enabled = torch.cuda.is_available()
        self.figures: dict[str, float] = {}
        self.start()

    def start(self) -> None:
        if self.enabled:
            torch.cuda.reset_peak_memory_stats()

    def mark(self, name: str) -> None:
        if self.enabled:
            self.figures[f"memory/{name}_peak_gib"] = torch.cuda.max_memory_reserved() / 2**30
            torch.cuda.reset_peak_memory_stats()
