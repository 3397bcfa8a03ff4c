"""What held-out validation costs a 2-point alpha sweep of the default run, and how much of it is
work that cannot change between its members: `python train.py -m alpha=1.2,1.5` in a fresh
process per sweep, each sweep with a fresh validation cache (val.cache_dir), so its first member
decodes the teacher's and the untrained policy's answers and the second may reuse them. With
`--vs <clone>` (say one without the cache) the sweeps alternate A B A B ..., so a drift of the
machine's speed moves both sides alike.

    python benchmarks/validation_cost.py --vs ../iq-lightning-before --runs 2
    python benchmarks/validation_cost.py -- epochs=2      # overrides after -- go to every member

Per sweep it prints the total wall clock and, per member, its wall clock (from its first to its
last metrics row's neighbours: the member's own train.log times) and validation's seconds
(metrics.csv's time/val_s, summed) and share. The GGUF conversion is warmed first.
"""

from __future__ import annotations

import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_run import clones_from_command_line  # noqa: E402

ALPHAS = "1.2,1.5"


def validation_seconds(run_dir: Path) -> float:
    with open(run_dir / "metrics" / "metrics.csv", newline="") as f:
        return sum(float(row["time/val_s"]) for row in csv.DictReader(f) if row.get("time/val_s"))


def member_wall(run_dir: Path) -> float:
    """Seconds from the member's first to its last log line (its process start-up excluded)."""
    stamps = []
    for line in (run_dir / "train.log").read_text(encoding="utf-8").splitlines():
        if line.startswith("[20"):
            stamps.append(datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f"))
    return (stamps[-1] - stamps[0]).total_seconds()


def one_sweep(clone: Path, overrides: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="validation_cost_"))
    env = {**os.environ, "IQ_LIGHTNING_ANSWER_CACHE": str(out / "cache"), "WANDB_MODE": "offline"}
    try:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "train.py", "-m", f"alpha={ALPHAS}", f"hydra.sweep.dir={out / 'sweep'}", *overrides],
            cwd=clone, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{clone}: the sweep failed:\n{done.stderr[-3000:]}")
        members = sorted((p for p in (out / "sweep").iterdir() if p.is_dir()), key=lambda p: int(p.name))
        return {"wall": wall, "members": [(member_wall(m), validation_seconds(m)) for m in members]}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    args, clones = clones_from_command_line(__doc__, 2, "sweeps per clone")
    sweeps: dict[str, list[dict]] = {k: [] for k in clones}
    for i in range(args.runs):
        for key, clone in clones.items():
            sweep = one_sweep(clone, args.overrides)
            sweeps[key].append(sweep)
            members = "; ".join(
                f"member {j} ({a}): {w:.1f} s, validation {v:.1f} s ({v / w:.0%})" for j, ((w, v), a) in enumerate(zip(sweep["members"], ALPHAS.split(",")))
            )
            print(f"sweep {i + 1} {key} ({clone}): {sweep['wall']:.1f} s; {members}", flush=True)
    for key, clone in clones.items():
        walls = [s["wall"] for s in sweeps[key]]
        shares = [v / w for s in sweeps[key] for w, v in s["members"]]
        print(f"{key} = {clone}: sweep wall median {statistics.median(walls):.1f} s (min {min(walls):.1f}, max {max(walls):.1f}); "
              f"validation's share per member median {statistics.median(shares):.0%} (min {min(shares):.0%}, max {max(shares):.0%})")
    if "B" in clones:
        ratios = [a["wall"] / b["wall"] for a, b in zip(sweeps["A"], sweeps["B"])]
        print(f"A/B sweep wall, pair by pair: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
