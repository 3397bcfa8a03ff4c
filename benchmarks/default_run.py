"""The default run (`python train.py`), start to `final/`, as a user meets it: one fresh process
per run, W&B offline, validation on. With two clones (say the last release and your branch) the
runs alternate, A B A B ..., and the medians and the median of the pairwise ratios are printed,
so a drift of the machine's speed moves both sides alike.

    python benchmarks/default_run.py                       # this clone, 3 runs
    python benchmarks/default_run.py --vs ../iq-lightning-main --runs 3
    python benchmarks/default_run.py -- epochs=2           # overrides after -- go to train.py

Each run writes into a temporary directory that is removed afterwards. Peak RSS is the run's own
(os.wait4). The GGUF conversion cache (model.gguf_cache) is warmed before the first counted run,
since only a machine's first run pays it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(clone: Path, overrides: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of `python train.py` in `clone`."""
    out = Path(tempfile.mkdtemp(prefix="default_run_"))
    try:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "train.py", f"hydra.run.dir={out}", *overrides],
            cwd=clone,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
        if os.waitstatus_to_exitcode(status) != 0 or not (out / "final" / "config.json").exists():
            raise SystemExit(f"{clone}: train.py failed:\n{stderr[-3000:]}")
        return wall, usage.ru_maxrss / 2**20
    finally:
        shutil.rmtree(out, ignore_errors=True)


def warm_conversion(clone: Path) -> None:
    code = (
        "from hydra import compose, initialize_config_dir\n"
        "from iq_lightning.config import build_run_config\n"
        "from iq_lightning.models import load_tokenizer\n"
        "with initialize_config_dir(config_dir=__import__('os').path.abspath('conf'), version_base=None):\n"
        "    cfg = compose('train')\n"
        "spec = build_run_config(cfg, '/tmp/unused').model\n"
        "getattr(spec, 'gguf_cache', None) and load_tokenizer(spec)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=clone, check=True, capture_output=True)


def describe(name: str, values: list[float], unit: str, digits: int = 1) -> str:
    f = lambda v: f"{v:.{digits}f}"  # noqa: E731
    return f"{name} median {f(statistics.median(values))}{unit} (min {f(min(values))}, max {f(max(values))})"


def clones_from_command_line(description: str, runs: int, runs_help: str) -> tuple[argparse.Namespace, dict[str, Path]]:
    """(arguments, {"A": this clone, "B": --vs}) of a benchmark that runs two clones in turn, each
    clone's GGUF conversion warmed first."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vs", type=Path, help="a second clone, run in turn with this one")
    parser.add_argument("--runs", type=int, default=runs, help=runs_help)
    parser.add_argument("overrides", nargs="*", help="train.py overrides (after --)")
    args = parser.parse_args()
    clones = {"A": REPO} | ({"B": args.vs.resolve()} if args.vs else {})
    for clone in clones.values():
        warm_conversion(clone)
    return args, clones


def main() -> None:
    args, clones = clones_from_command_line(__doc__, 3, "counted runs per clone")
    walls: dict[str, list[float]] = {k: [] for k in clones}
    peaks: dict[str, list[float]] = {k: [] for k in clones}
    for i in range(args.runs):
        for key, clone in clones.items():
            wall, peak = one_run(clone, args.overrides)
            walls[key].append(wall)
            peaks[key].append(peak)
            print(f"run {i + 1} {key} ({clone}): {wall:.1f} s, peak RSS {peak:.2f} GiB", flush=True)
    for key, clone in clones.items():
        print(f"{key} = {clone}: {describe('wall', walls[key], ' s')}; {describe('peak RSS', peaks[key], ' GiB', 2)}")
    if "B" in clones:
        ratios = [a / b for a, b in zip(walls["A"], walls["B"])]
        print(f"A/B wall, pair by pair: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
