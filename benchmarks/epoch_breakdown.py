"""Where an epoch's time and memory go: weight sync, sampling, guide scoring and training.

    python benchmarks/epoch_breakdown.py                  # SmolLM2-135M, 2 epochs x 32 samples x 32 new tokens
    python benchmarks/epoch_breakdown.py --model tiny
    python benchmarks/epoch_breakdown.py --sampler vllm --epochs 3

Runs a real training (`iq_lightning.run.train` on the composed Hydra config, the default run's
batch sizes unless overridden) and reads each epoch's phase seconds from its metrics.csv and its
token counts from the stored rollouts. Tokens per second count, per phase:
  sampling - generated response tokens;
  scoring  - response tokens scored (each by both guides), and the prompt+response tokens the
             guide passes cover (x_w + y and x + y, counted in full though a prefix shared by
             a batch is computed once);
  training - response tokens trained on, and the prompt+response tokens of the policy's forwards.
Peak RSS is the process's maximum (model loading included), and per phase the largest RSS
polled every 10 ms while that phase ran. The first epoch pays one-off warm-up costs; the summary
averages the later ones when there are any.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import resource
import sys
import tempfile
import threading
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose  # noqa: E402

PHASES = ("weight_sync", "sample", "score", "train")


class RSSPoller(threading.Thread):
    """The largest resident set size seen while each named phase was current."""

    def __init__(self, interval_s: float = 0.01):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.phase = "setup"
        self.peaks: dict[tuple[int, str], int] = {}
        self.epoch = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._done = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            key = (self.epoch, self.phase)
            self.peaks[key] = max(self.peaks.get(key, 0), self.rss())

    def stop(self) -> None:
        self._done.set()
        self.join()


def traced_datamodule(poller: RSSPoller):
    """The run's DataModule, telling the poller which phase is running."""
    from iq_lightning.datamodule import OnPolicyDataModule

    def during(phase: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            poller.phase = phase
            return fn(*args, **kwargs)

        return wrapper

    class Traced(OnPolicyDataModule):
        def collect(self, policy, guide, epoch):
            poller.epoch = epoch
            self.sampler.update_weights = during("weight_sync", type(self.sampler).update_weights.__get__(self.sampler))
            self.sampler.generate = during("sample", type(self.sampler).generate.__get__(self.sampler))
            guide.score = during("score", type(guide).score.__get__(guide))
            return super().collect(policy, guide, epoch)

        def train_dataloader(self):
            loader = super().train_dataloader()
            poller.phase = "train"
            return loader

    return Traced


def epoch_rows(run_dir: Path) -> list[dict[str, float]]:
    """One row per completed epoch: the phase seconds the run logged."""
    with (run_dir / "metrics" / "metrics.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("time/train_s")]
    return [{p: float(r.get(f"time/{p}_s") or 0.0) for p in PHASES} for r in rows]


def epoch_tokens(run_dir: Path, epoch: int, guide) -> dict[str, int]:
    from iq_lightning.data import EncodedPrompt, Prompt
    from iq_lightning.rollouts import read_rollouts

    rollouts = read_rollouts(run_dir / "rollouts" / f"epoch_{epoch:03d}.jsonl")
    response = sum(len(r.response_ids) for r in rollouts)
    prompts = sum(len(r.prompt_ids) for r in rollouts)
    winner = sum(
        len(guide.winner_prompt_ids(EncodedPrompt(Prompt(r.prompt_id, tuple(r.messages)), tuple(r.prompt_ids))))
        for r in rollouts
    )
    return {
        "samples": len(rollouts),
        "response": response,
        "score_forward": winner + prompts + 2 * response,
        "train_forward": prompts + response,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sampler", default="hf", choices=["hf", "vllm"])
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. samples_per_epoch=64 micro_batch_size=8")
    args = parser.parse_args()

    import iq_lightning.run as run_module

    overrides = [f"model={args.model}", f"epochs={args.epochs}", f"sampler={args.sampler}", "logger=csv",
                 "save_final=false", *args.overrides]
    poller = RSSPoller()
    run_module.OnPolicyDataModule = traced_datamodule(poller)
    with tempfile.TemporaryDirectory() as tmp:
        run = run_module.configure(compose(overrides), tmp)
        poller.start()
        result = run_module.train(run, show_progress=False)
        poller.stop()
        rows = epoch_rows(Path(tmp))
        tokens = [epoch_tokens(Path(tmp), e, result.module.guide) for e in range(len(rows))]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t = run.train
    print(f"model={args.model} epochs={len(rows)} samples_per_epoch={t.samples_per_epoch} max_new_tokens={run.sampler.max_new_tokens} "
          f"sampler={args.sampler} (batch {run.sampler.batch_size}) guide batch={run.guide.batch_size} "
          f"micro_batch={t.micro_batch_size} threads={torch.get_num_threads()}")
    header = f"{'epoch':>5} {'phase':<12} {'seconds':>8} {'share':>6} {'tokens/s':>22} {'peak RSS MiB':>13}"
    print(header)
    for epoch, (row, tok) in enumerate(zip(rows, tokens)):
        total = sum(row.values())
        rates = {
            "weight_sync": "",
            "sample": f"{tok['response'] / max(row['sample'], 1e-9):.0f} generated",
            "score": f"{tok['response'] / max(row['score'], 1e-9):.0f} resp, {tok['score_forward'] / max(row['score'], 1e-9):.0f} fwd",
            "train": f"{tok['response'] / max(row['train'], 1e-9):.0f} resp, {tok['train_forward'] / max(row['train'], 1e-9):.0f} fwd",
        }
        for phase in PHASES:
            peak = poller.peaks.get((epoch, phase))  # none when the phase was shorter than a poll
            peak_text = f"{peak / 2**20:.0f}" if peak else "-"
            print(f"{epoch:>5} {phase:<12} {row[phase]:8.2f} {row[phase] / total:6.1%} {rates[phase]:>22} {peak_text:>13}")
        print(f"{epoch:>5} {'epoch':<12} {total:8.2f} {'':>6} {tok['response']:>13} resp tok {'':>13}  "
              f"({tok['samples']} samples, {tok['train_forward']} prompt+response tokens)")
    later = rows[1:] or rows
    mean = {p: sum(r[p] for r in later) / len(later) for p in PHASES}
    total = sum(mean.values())
    which = "epochs 1.." if len(rows) > 1 else "epoch 0"
    print(f"summary ({which}): epoch {total:.2f} s = " + ", ".join(f"{p} {mean[p]:.2f} s ({mean[p] / total:.0%})" for p in PHASES))
    print(f"peak RSS (process, model loading included): {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
