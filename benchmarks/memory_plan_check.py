"""The memory plan (iq_lightning/memory_plan.py) against the measured peak RSS of real CPU runs.

    python benchmarks/memory_plan_check.py                      # tiny and SmolLM2; 1 process, DDP x2, ZeRO-3 x2
    python benchmarks/memory_plan_check.py --models tiny --strategies cpu ddp
    python benchmarks/memory_plan_check.py --models smollm2 -- micro_batch_size=8   # more overrides after --

Each case runs `train.py` in a subprocess with small settings (1 epoch of 8 samples, 16 new
tokens, no logger, no final export) and reads every rank's peak resident set size from the
kernel (VmHWM in /proc/<pid>/status, polled at 20 Hz for every train.py process of the tree:
Lightning starts rank 1 as a child of rank 0). The plan is computed for the same Hydra overrides
(composed as train.py composes them) with `plan_memory`, per rank (rank zero also writes the
checkpoint). data.max_prompt_tokens is set to the longest prompt of the data set as the model
tokenizes it, which skips no prompt, so the plan's worst case is the run's real one. A case that
fails (ZeRO-3 needs the CPU support being added to run.py) is reported and skipped.

Exit status 1 when a rank's plan is off by more than --tolerance (25%) of its measured peak.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMON = ["epochs=1", "samples_per_epoch=8", "sampler.max_new_tokens=16", "logger=none", "save_final=false"]
STRATEGIES = {
    "cpu": ["strategy=cpu"],
    "ddp": ["strategy=ddp", "strategy.devices=2", "strategy.accelerator=cpu"],
    "zero3": ["strategy=deepspeed_zero3", "strategy.devices=2", "strategy.accelerator=cpu"],
}
GIB = 2**30


@dataclass
class Measured:
    rc: int
    seconds: float
    peaks: dict[int, int]  # rank -> peak RSS bytes
    tail: str


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return hydra_compose(config_name="train", overrides=overrides)


def longest_prompt(model: str) -> int:
    """Tokens of the longest training prompt as the model's tokenizer encodes it (chat template included)."""
    from iq_lightning.config import build_run_config
    from iq_lightning.data import prepare_prompts
    from iq_lightning.models import build_tiny_tokenizer, locate_package_gguf

    run = build_run_config(compose([f"model={model}", "logger=none"]), tempfile.gettempdir())
    if run.model.source == "tiny":
        tokenizer = build_tiny_tokenizer()
    elif run.model.source == "package_gguf":
        from transformers import AutoTokenizer

        path = locate_package_gguf(run.model.name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run.model.name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts, _ = prepare_prompts(run.data, tokenizer)
    return max(len(p.input_ids) for p in prompts)


def _rank_of(proc) -> int | None:
    """A train.py process's rank: Lightning starts ranks > 0 with LOCAL_RANK in their environment."""
    try:
        if not any(part.endswith("train.py") for part in proc.cmdline()):
            return None
        return int(proc.environ().get("LOCAL_RANK", 0))
    except Exception:
        return None


def _hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(overrides: list[str], timeout_s: float) -> Measured:
    """Run train.py; the peak RSS of each rank's process (VmHWM, the kernel's high-water mark)."""
    import psutil

    with tempfile.TemporaryDirectory() as run_dir, tempfile.TemporaryFile("w+") as log:
        cmd = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
        started = time.perf_counter()
        root = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        ranks: dict[int, int] = {}  # pid -> rank
        peaks: dict[int, int] = {}
        while root.poll() is None:
            if time.perf_counter() - started > timeout_s:
                root.kill()
                break
            try:
                tree = [psutil.Process(root.pid), *psutil.Process(root.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = []
            for proc in tree:
                if proc.pid not in ranks:
                    rank = _rank_of(proc)
                    if rank is None:
                        continue
                    ranks[proc.pid] = rank
                hwm = _hwm(proc.pid)
                if hwm is not None:
                    peaks[ranks[proc.pid]] = max(peaks.get(ranks[proc.pid], 0), hwm)
            time.sleep(0.05)
        rc = root.wait()
        log.seek(0)
        tail = "\n".join(line for line in log.read().splitlines()[-15:])
        return Measured(rc, time.perf_counter() - started, peaks, tail)


def planned(overrides: list[str]):
    from iq_lightning.memory_plan import plan_memory, world_size_of
    from iq_lightning.run import configure

    with tempfile.TemporaryDirectory() as run_dir:
        run = configure(compose(overrides), run_dir)
    return plan_memory(run, world_size_of(run.strategy), None, run.strategy.accelerator)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--tolerance", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs (the machine is shared)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--show-plans", action="store_true", help="print each case's full plan")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every case")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    rows, failed = [], False
    for model in args.models:
        prompt_tokens = longest_prompt(model)
        for strategy in args.strategies:
            name = f"{model} {strategy}"
            overrides = [f"model={model}", *COMMON, *STRATEGIES[strategy], f"data.max_prompt_tokens={prompt_tokens}", *args.overrides]
            plan = planned(overrides)
            if args.show_plans:
                print(f"\n== {name}: {' '.join(overrides)}\n{plan.render()}", flush=True)
            result = measure(overrides, args.timeout)
            if result.rc != 0 or not result.peaks:
                print(f"\n{name}: train.py exited {result.rc}; skipped. Last lines:\n{result.tail}\n", flush=True)
                rows.append((name, "-", plan.total / GIB, None, None, f"skipped (exit {result.rc})"))
                continue
            for rank in sorted(result.peaks):
                want = plan.total_for_rank(rank)
                got = result.peaks[rank]
                ratio = want / got
                ok = abs(ratio - 1) <= args.tolerance
                failed |= not ok
                rows.append((name, rank, want / GIB, got / GIB, ratio, f"{plan.peak_phase(rank)}; {result.seconds:.0f} s" + ("" if ok else "  OUT OF TOLERANCE")))
            print(f"{name}: done in {result.seconds:.0f} s", flush=True)

    print(f"\n{'case':<16} {'rank':>4} {'plan GiB':>9} {'RSS GiB':>8} {'plan/RSS':>8}  peak phase")
    for name, rank, want, got, ratio, note in rows:
        got_text = f"{got:8.2f}" if got is not None else f"{'-':>8}"
        ratio_text = f"{ratio:8.2f}" if ratio is not None else f"{'-':>8}"
        print(f"{name:<16} {rank!s:>4} {want:9.2f} {got_text} {ratio_text}  {note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
