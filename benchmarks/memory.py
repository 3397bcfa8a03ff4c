"""Peak resident memory of one training epoch: full fine-tuning vs LoRA, same model and work.

    python benchmarks/memory.py                      # SmolLM2-135M, 16 samples, 32 new tokens
    python benchmarks/memory.py --model tiny

Each configuration runs `train.py` in its own child process; the peak is that process tree's
maximum resident set size (the kernel's accounting), so the two figures and their ratio come
from the same run of this script on the same machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
rc = subprocess.run(json.loads(sys.argv[1]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - started,
                  "peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
        out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cmd)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    common = [f"model={args.model}", "epochs=1", f"samples_per_epoch={args.samples}",
              f"sampler.max_new_tokens={args.new_tokens}", "logger=none", "save_final=false"]
    full = measure(common)
    lora = measure(common + ["model.lora.enabled=true"])
    for name, r in (("full fine-tuning", full), ("LoRA r=8", lora)):
        status = "" if r["rc"] == 0 else f"  (exit code {r['rc']}!)"
        print(f"{name:17s}: peak RSS {r['peak_mib']:7.0f} MiB, {r['seconds']:5.1f} s{status}")
    print(f"ratio full/LoRA: {full['peak_mib'] / lora['peak_mib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
