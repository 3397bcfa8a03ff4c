"""Where held-out validation's seconds go, piece by piece: one default run (overrides may follow)
with validation's decoding, guide passes, the policy's own pass and the figures each timed by
wrapping them. The training's own sampling goes through the same HF sampler and is counted apart
(the call made while no validation runs).

    python benchmarks/validation_breakdown.py epochs=1          # warm the answer cache first for "after"
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time

import common

import iq_lightning.validation as validation
from iq_lightning.config import build_run_config
from iq_lightning.run import train

spent: dict[str, list[float]] = collections.defaultdict(list)
inside = [False]


def timed(owner, name: str, label: str) -> None:
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            where = label if inside[0] or label == "validation" else f"{label} (training)"
            spent[where].append(time.perf_counter() - started)

    setattr(owner, name, wrapper)


def main() -> None:
    timed(validation.HFSampler, "generate", "decode")
    timed(validation, "response_logits", "policy pass")
    timed(validation.PrincipleGuide, "_guide_logits", "guide passes")
    timed(validation, "answer_figures", "figures")
    real_validate = validation.Validation.validate

    def validate(self, *args, **kwargs):
        inside[0] = True
        try:
            return real_validate(self, *args, **kwargs)
        finally:
            inside[0] = False

    validation.Validation.validate = validate
    timed(validation.Validation, "validate", "validation")
    cfg = common.compose(["logger=none", "save_final=false", "credit_maps_per_epoch=0", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as run_dir:
        train(build_run_config(cfg, run_dir), show_progress=False)
    for label, times in spent.items():
        print(f"{label:24s} total {sum(times):6.2f} s  calls: {', '.join(f'{t:.2f}' for t in times)}")


if __name__ == "__main__":
    main()
