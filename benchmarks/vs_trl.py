"""One epoch of this project against TRL's on-policy trainers on the same work, as medians of
interleaved runs (A B A B ...), each run in a fresh process.

    pip install -e .[bench]                              # TRL 1.16, benchmark-only
    python benchmarks/vs_trl.py --peer sdft              # SDFT sampled_token (the closest math)
    python benchmarks/vs_trl.py --peer sdft --mode full_logits
    python benchmarks/vs_trl.py --peer distillation      # DistillationTrainer
    python benchmarks/vs_trl.py --peer sdft --model tiny --pairs 2   # a quick look
    python benchmarks/vs_trl.py --peer sdft --validation # both at their defaults: ours validates

The same work on both sides: SmolLM2-135M in float32, the first `--samples` bundled prompts, the
default principle, placed in the user turn on both sides (this project's `guide.placement=user`
and SDFT's `teacher_prompt_template="{privileged_context}\\n\\n{prompt}"` write the same turn), one
response of up to `--tokens` new tokens per prompt at temperature 1, micro-batch 4 (one optimizer
step per micro-batch), fused AdamW at lr 1e-4, one epoch.

Peers at their best for this machine: gradient checkpointing off (TRL turns it on by default),
float32, no logging, saving or evaluation; SDFT samples the epoch's prompts in one generation batch
(`generation_batch_size` = samples, `num_generations=1`: one response per prompt, as here), as this
project does. Each peer must be seen to train: the child records every step's loss and the weights'
movement, and the parent refuses a peer whose loss is zero throughout or whose weights did not move.
DistillationTrainer has no privileged context: its teacher sees the student's own prompt, so a
copy of the student would give a zero loss and no gradient (that is why the old comparison showed
`train_loss 0`). Its teacher here is the student with seeded Gaussian noise on every weight (a
stand-in for an aligned model of the same size), which costs exactly what any same-size teacher costs.

What is timed: for the peers, `Trainer.train` from `on_train_begin` to `on_train_end` (sampling,
teacher passes, training; model loading and the trainer's set-up excluded); for this project the
epoch's weight push + sampling + guide scoring + training (`time/*` of the run; model loading,
Lightning's set-up and validation excluded, validation is off). With `--validation` each side does
its defaults: this project validates on the held-out prompts before training and after the epoch
(its seconds are counted), TRL's trainers do not evaluate (`eval_strategy="no"` is their default).
Validation's cache of frozen answers (val.cache_dir) is a fresh directory warmed by one uncounted
run of ours, as every run after a machine's first finds it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LR = 1e-4

# What each side computes per sampled response (y of T tokens after prompt x; x_w = x with the
# principle), besides sampling it: forward passes and full-vocabulary soft-maxes per response token.
WORK = {
    "ours": "2 no-grad guide passes (x_w+y, x+y; the shared system prefix once per batch) + 1 forward/backward (x+y); "
    "log-softmaxes per token: scoring 2 with the one-head principle pass (3 without), training 1",
    "sdft/sampled_token": "1 no-grad student pass (x+y, importance-sampling log-probs of the rollout) + 1 no-grad teacher pass "
    "(x_w+y) + 1 forward/backward (x+y); log-softmaxes per token: 1 + 1 + 2 (loss and IS ratio)",
    "sdft/full_logits": "as sampled_token, with a full-vocabulary KL between teacher and student per token",
    "distillation": "1 no-grad teacher pass (x+y) + 1 forward/backward (x+y); full-vocabulary reverse KL per token",
}


def principle() -> str:
    return common.compose([]).guide.principle


# ---- children: one epoch, one process ---------------------------------------------------------


def run_ours(args) -> dict:
    from iq_lightning.config import build_run_config
    from iq_lightning.run import train
    from iq_lightning.validation import Validation

    overrides = [
        f"model={args.model}", "epochs=1", f"samples_per_epoch={args.samples}", f"sampler.max_new_tokens={args.tokens}",
        f"micro_batch_size={args.micro_batch}", f"lr={LR}", "logger=none", "save_final=false",
        "credit_maps_per_epoch=0", "guide.placement=user",
    ]
    if not args.validation:
        overrides.append("val.every_n_epochs=0")
    cfg = common.compose(overrides)
    val_seconds = [0.0]
    validate = Validation.validate

    def timed_validate(self, *a, **kw):  # the validations before training and after the epoch
        started = time.perf_counter()
        try:
            return validate(self, *a, **kw)
        finally:
            val_seconds[0] += time.perf_counter() - started

    Validation.validate = timed_validate
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(build_run_config(cfg, run_dir), show_progress=False)
    stats = result.datamodule.epoch_stats
    metrics = result.module.trainer.callback_metrics
    phases = {k: float(stats[f"time/{k}_s"]) for k in ("weight_sync", "sample", "score")}
    phases["train"] = float(metrics["time/train_s"])
    if args.validation:
        phases["validation"] = val_seconds[0]
    return {"seconds": sum(phases.values()), "phases": phases}


def peer_dataset(tokenizer, samples: int, with_context: bool):
    from datasets import Dataset

    rows = []
    for p in common.prompts(tokenizer, samples):
        row = {"prompt": [dict(m) for m in p.prompt.messages]}
        if with_context:
            row["privileged_context"] = principle()
        rows.append(row)
    return Dataset.from_list(rows)


def noisy_teacher(model, scale: float = 0.02, seed: int = 0):
    """The student plus seeded noise of `scale` times each tensor's own std: a different teacher
    of exactly the student's cost."""
    from iq_lightning.models import frozen_copy

    teacher = frozen_copy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.float().std() * scale)
    return teacher


def run_peer(args) -> dict:
    from transformers import TrainerCallback

    model, tokenizer = common.load(args.model)
    before = [p.detach().clone() for p in model.parameters()]
    common_args = dict(
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=1, num_train_epochs=1,
        max_completion_length=args.tokens, learning_rate=LR, temperature=1.0, top_k=0, top_p=1.0,
        optim="adamw_torch_fused", gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        report_to="none", save_strategy="no", eval_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, seed=args.seed,
    )
    out = tempfile.mkdtemp()
    if args.peer == "sdft":
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        # SDFT builds its "base" teacher from the student's path (a deep copy would clone empty
        # ZeRO-3 shards); the GGUF-loaded student has none, so it gets one (set-up, not timed).
        model.save_pretrained(Path(out) / "student")
        model.config._name_or_path = str(Path(out) / "student")
        config = SDFTConfig(
            output_dir=out, distillation_mode=args.mode, distillation_alpha=1.0 if args.mode == "sampled_token" else 0.5,
            teacher_model_kind="base", teacher_prompt_template="{privileged_context}\n\n{prompt}",
            num_generations=1, generation_batch_size=args.sdft_generation_batch or args.samples, **common_args,
        )
        trainer_cls, kwargs = SDFTTrainer, {"train_dataset": peer_dataset(tokenizer, args.samples, True)}
    else:
        from trl import DistillationConfig, DistillationTrainer

        config = DistillationConfig(output_dir=out, beta=1.0, **common_args)
        kwargs = {"teacher_model": noisy_teacher(model), "train_dataset": peer_dataset(tokenizer, args.samples, False)}
        trainer_cls = DistillationTrainer

    losses: list[torch.Tensor] = []

    class Recording(trainer_cls):
        def compute_loss(self, *a, **kw):
            loss = super().compute_loss(*a, **kw)
            losses.append(loss.detach())
            return loss

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            clock["begin"] = time.perf_counter()

        def on_train_end(self, *a, **kw):
            clock["end"] = time.perf_counter()

    trainer = Recording(model=model, args=config, processing_class=tokenizer, callbacks=[Clock()], **kwargs)
    phases = time_phases(trainer)
    trainer.train()
    moved = sum((p.detach() - b).pow(2).sum().item() for p, b in zip(model.parameters(), before)) ** 0.5
    seconds = clock["end"] - clock["begin"]
    phases["backward+optimizer+rest"] = seconds - sum(phases.values())
    return {
        "seconds": seconds,
        "phases": phases,
        "steps": trainer.state.global_step,
        "losses": [float(x) for x in losses],
        "weight_movement": moved,
    }


def time_phases(trainer) -> dict[str, float]:
    """Seconds in the peer's sampling, its no-grad passes and its student forward, by wrapping the
    trainer's own methods on the instance (what is left is backward, optimizer step and glue).
    Only the outermost timed call counts, so the forwards inside sampling stay sampling."""
    spent: dict[str, float] = {"sample": 0.0}
    depth = [0]

    def timed(fn, phase):
        def wrapper(*a, **kw):
            name = phase(*a, **kw) if callable(phase) else phase
            if depth[0] or name is None:
                return fn(*a, **kw)
            depth[0] += 1
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= 1
                spent[name] += time.perf_counter() - started
        return wrapper

    trainer._generate = timed(trainer._generate, "sample")
    if hasattr(trainer, "_compute_rollout_logps"):  # SDFT: its passes go through _forward_logits
        spent.update(is_pass=0.0, teacher_fwd=0.0, student_fwd=0.0)
        trainer._compute_rollout_logps = timed(trainer._compute_rollout_logps, "is_pass")
        trainer._forward_logits = timed(
            trainer._forward_logits, lambda model, *a, **kw: "teacher_fwd" if model is trainer.teacher_model else "student_fwd"
        )
    # DistillationTrainer calls its (accelerate-wrapped) modules directly: only its sampling is
    # separated; its teacher pass is inside the rest.
    return spent


# ---- parent: interleave, check, summarise ----------------------------------------------------


def child(side: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        command = [sys.executable, __file__, "--child", side, "--json", result.name, "--peer", args.peer, "--mode", args.mode,
                   "--model", args.model, "--samples", str(args.samples), "--tokens", str(args.tokens),
                   "--micro-batch", str(args.micro_batch), "--seed", str(args.seed)]
        if args.validation:
            command.append("--validation")
        if args.sdft_generation_batch:
            command += ["--sdft-generation-batch", str(args.sdft_generation_batch)]
        # The checkout's package first, whatever the environment has installed.
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "TRL_EXPERIMENTAL_SILENCE": "1", "WANDB_MODE": "disabled"}
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{side} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(Path(result.name).read_text())


def check_trained(name: str, run: dict, expected_steps: int) -> str:
    losses = run["losses"]
    if run["steps"] != expected_steps:
        sys.exit(f"{name} ran {run['steps']} optimizer steps, expected {expected_steps}: not the same work")
    if not any(abs(x) > 0 for x in losses):
        sys.exit(f"{name} did not train: its loss was 0 at every step")
    if not run["weight_movement"] > 0:
        sys.exit(f"{name} did not train: its weights did not move")
    return (f"{name} trained: {run['steps']} steps, loss {losses[0]:.4g} -> {losses[-1]:.4g} "
            f"(|loss| > 0 at {sum(abs(x) > 0 for x in losses)}/{len(losses)} steps), weights moved by {run['weight_movement']:.3g} (L2)")


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):6.1f} s (min {min(values):.1f}, max {max(values):.1f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", default="sdft", choices=["sdft", "distillation"])
    parser.add_argument("--mode", default="sampled_token", choices=["sampled_token", "full_logits"], help="SDFT's distillation_mode")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=3, help="interleaved runs of each side (A B A B ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdft-generation-batch", type=int, default=None,
                        help="SDFT's generation_batch_size (default: --samples, the epoch in one batch, as here; "
                        "--micro-batch samples each step's prompts apart and skips the importance-sampling pass)")
    parser.add_argument("--validation", action="store_true", help="this project validates as by default (counted); the peers do not evaluate, as by default")
    parser.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = run_ours(args) if args.child == "ours" else run_peer(args)
        Path(args.json).write_text(json.dumps(result))
        return

    peer = "distillation" if args.peer == "distillation" else f"sdft/{args.mode}"
    label = "TRL DistillationTrainer" if args.peer == "distillation" else f"TRL SDFTTrainer ({args.mode})"
    times: dict[str, list[float]] = {"peer": [], "ours": []}
    phases: dict[str, list[dict]] = {"peer": [], "ours": []}
    checks = []
    if args.validation:
        os.environ["IQ_LIGHTNING_ANSWER_CACHE"] = tempfile.mkdtemp(prefix="vs_trl_validation_cache_")
        print(f"warm-up (not counted): ours, {child('ours', args)['seconds']:.1f} s", flush=True)
    for i in range(args.pairs):
        for side in ("peer", "ours"):
            run = child(side, args)
            times[side].append(run["seconds"])
            phases[side].append(run["phases"])
            if side == "peer":
                checks.append(check_trained(label, run, args.samples // args.micro_batch))
            detail = ", ".join(f"{k} {v:.1f}" for k, v in run.get("phases", {}).items())
            print(f"pair {i + 1} {side:4s}: {run['seconds']:6.1f} s {('(' + detail + ')') if detail else ''}", flush=True)
    ratios = [p / o for p, o in zip(times["peer"], times["ours"])]
    print(f"\nmodel={args.model} samples={args.samples} new_tokens={args.tokens} micro_batch={args.micro_batch} "
          f"threads={torch.get_num_threads()} pairs={args.pairs} (interleaved, one process per run)")
    print(checks[-1])
    print(f"{label:34s}: {spread(times['peer'])}")
    print(f"{'iq-lightning':34s}: {spread(times['ours'])}")
    print(f"ratio of medians (peer / iq-lightning): {statistics.median(times['peer']) / statistics.median(times['ours']):.2f}x; "
          f"per pair: {', '.join(f'{r:.2f}' for r in ratios)}")
    for side, name in (("peer", label), ("ours", "iq-lightning")):
        keys = phases[side][0]
        print(f"median phases, {name}: " + ", ".join(f"{k} {statistics.median(p[k] for p in phases[side]):.1f} s" for k in keys))
    print(f"per sample, iq-lightning: {WORK['ours']}")
    print(f"per sample, {peer}: {WORK[peer]}")


if __name__ == "__main__":
    main()
