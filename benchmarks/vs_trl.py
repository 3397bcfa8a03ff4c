"""One epoch of this project against TRL's on-policy distillation trainer on the same work.

    pip install trl==1.16.0          # benchmark-only; installs beside the project unchanged
    python benchmarks/vs_trl.py      # SmolLM2-135M, 32 prompts, 32 new tokens, micro-batch 4
    python benchmarks/vs_trl.py --model tiny

Same model (float32), same 32 bundled prompts, same number of new tokens, micro-batch and
optimizer (AdamW, lr 1e-4), one epoch. TRL's `DistillationTrainer` samples each micro-batch
from the student and regresses it onto one teacher's full distribution; this project samples
the epoch once, scores it with two guides (principle-prompted pi_w and plain pi_l), and trains.
The figures are wall-clock seconds of the epoch itself (model loading excluded on both sides).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return hydra_compose(config_name="train", overrides=overrides)


def ours(model: str, samples: int, tokens: int, micro_batch: int, sampler: str = "hf") -> float:
    from iq_lightning.config import build_run_config
    from iq_lightning.run import train

    overrides = [f"model={model}", "epochs=1", f"samples_per_epoch={samples}", f"sampler.max_new_tokens={tokens}",
                 f"micro_batch_size={micro_batch}", "lr=1e-4", "logger=none", "save_final=false", f"sampler={sampler}"]
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(build_run_config(compose(overrides), run_dir), show_progress=False)
        stats = result.datamodule.epoch_stats
    train_s = result.module.trainer.callback_metrics.get("time/train_s")
    return stats["time/weight_sync_s"] + stats["time/sample_s"] + stats["time/score_s"] + float(train_s)


def trl_epoch(model_name: str, samples: int, tokens: int, micro_batch: int) -> float:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from iq_lightning.models import frozen_copy

    model, tokenizer = common.load(model_name)
    teacher = frozen_copy(model)
    prompts = common.prompts(tokenizer, samples)
    dataset = Dataset.from_list([{"prompt": [dict(m) for m in p.prompt.messages]} for p in prompts])
    with tempfile.TemporaryDirectory() as out:
        args = DistillationConfig(
            output_dir=out, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1,
            num_train_epochs=1, max_completion_length=tokens, learning_rate=1e-4, temperature=1.0, top_k=0,
            report_to="none", save_strategy="no", logging_steps=10_000, use_cpu=True, bf16=False,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer)
        started = time.perf_counter()
        trainer.train()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--sampler", default="hf", choices=["hf", "vllm"], help="this project's sampler (TRL uses HF generate: its colocated vLLM path fails on vLLM's CPU backend)")
    args = parser.parse_args()
    trl_s = trl_epoch(args.model, args.samples, args.tokens, args.micro_batch)
    our_s = ours(args.model, args.samples, args.tokens, args.micro_batch, args.sampler)
    print(f"model={args.model} samples={args.samples} new_tokens={args.tokens} micro_batch={args.micro_batch} threads={torch.get_num_threads()}")
    print(f"TRL DistillationTrainer epoch : {trl_s:.1f} s")
    print(f"iq-lightning epoch            : {our_s:.1f} s (sampler={args.sampler}; weight push + sampling + guide scoring + training)")
    print(f"ratio TRL/iq-lightning        : {trl_s / our_s:.2f}x (goal >= 1.5)")


if __name__ == "__main__":
    main()
