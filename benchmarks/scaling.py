"""How an epoch's phases grow with the work: seconds and peak RSS of weight push, sampling, guide
scoring and training against `samples_per_epoch` and `sampler.max_new_tokens`, on SmolLM2.

    python benchmarks/scaling.py                 # samples 32/64/128 at 32 tokens, tokens 32/64/128 at 32 samples
    python benchmarks/scaling.py --model tiny --values 8 16 32

Each configuration is one epoch of a real run (validation and export off) in a fresh process, so
each pays the same one-off warm-up. Prints a markdown table and, per phase, the growth exponent
k of seconds ~ work^k between the smallest and largest setting (k = 1: linear; above 1: faster
than linear), and writes the figure to benchmarks/scaling.png (or --plot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compose  # noqa: E402
from epoch_breakdown import PHASES, RSSPoller, epoch_rows, traced_datamodule  # noqa: E402


def one_epoch(model: str, samples: int, tokens: int) -> dict:
    import iq_lightning.run as run_module
    from iq_lightning.config import build_run_config

    overrides = [f"model={model}", "epochs=1", f"samples_per_epoch={samples}", f"sampler.max_new_tokens={tokens}",
                 "logger=csv", "save_final=false", "val.every_n_epochs=0", "credit_maps_per_epoch=0"]
    poller = RSSPoller()
    run_module.OnPolicyDataModule = traced_datamodule(poller)
    with tempfile.TemporaryDirectory() as tmp:
        poller.start()
        run_module.train(build_run_config(compose(overrides), tmp), show_progress=False)
        poller.stop()
        seconds = epoch_rows(Path(tmp))[0]
    return {
        "samples": samples,
        "tokens": tokens,
        "seconds": seconds,
        "peak_mib": {p: poller.peaks.get((0, p), 0) / 2**20 for p in PHASES},
        "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_child(model: str, samples: int, tokens: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(samples), str(tokens), "--model", model, "--json", out.name],
            cwd=REPO, env={**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled"}, capture_output=True, text=True,
        )
        if done.returncode != 0:
            sys.exit(f"samples={samples} tokens={tokens} failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def exponent(small: dict, large: dict, key: str, phase: str) -> float:
    ratio_work = large[key] / small[key]
    a, b = small["seconds"][phase], large["seconds"][phase]
    return math.log(b / a) / math.log(ratio_work) if a > 0 and b > 0 else float("nan")


def plot(rows: list[dict], values: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (key, other, label) in enumerate([("samples", "tokens", "samples_per_epoch"), ("tokens", "samples", "sampler.max_new_tokens")]):
        series = sorted((r for r in rows if r[other] == values[0]), key=lambda r: r[key])
        xs = [r[key] for r in series]
        for phase in PHASES[1:]:
            axes[0][col].plot(xs, [r["seconds"][phase] for r in series], marker="o", label=phase)
            axes[1][col].plot(xs, [r["peak_mib"][phase] for r in series], marker="o", label=phase)
        axes[0][col].plot(xs, [x / xs[0] * series[0]["seconds"]["train"] for x in xs], "k:", label="linear from train's first point")
        for row, ylabel in ((0, "seconds per epoch"), (1, "peak RSS in phase (MiB)")):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_xticks(xs, [str(x) for x in xs])
            axes[row][col].set_xlabel(f"{label} ({other} = {values[0]})")
            axes[row][col].set_ylabel(ylabel)
            axes[row][col].grid(alpha=0.3)
        axes[0][col].set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("One epoch on SmolLM2-135M, 2 CPU threads (each point one fresh process)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--values", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "scaling.png"))
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.json).write_text(json.dumps(one_epoch(args.model, *args.child)))
        return

    base = args.values[0]
    configs = [(s, base) for s in args.values] + [(base, t) for t in args.values[1:]]
    rows = []
    for samples, tokens in configs:
        rows.append(run_child(args.model, samples, tokens))
        r = rows[-1]
        print(f"samples={samples} tokens={tokens}: " + ", ".join(f"{p} {r['seconds'][p]:.1f} s" for p in PHASES), flush=True)

    print(f"\nmodel={args.model}, one epoch per row, 2 CPU threads")
    print("| samples | new tokens | sample s | score s | train s | epoch s | peak RSS MiB (sample / score / train) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        s, m = r["seconds"], r["peak_mib"]
        print(f"| {r['samples']} | {r['tokens']} | {s['sample']:.1f} | {s['score']:.1f} | {s['train']:.1f} | {sum(s.values()):.1f} "
              f"| {m['sample']:.0f} / {m['score']:.0f} / {m['train']:.0f} |")
    by = {(r["samples"], r["tokens"]): r for r in rows}
    top = args.values[-1]
    for key, large in (("samples", by[(top, base)]), ("tokens", by[(base, top)])):
        small = by[(base, base)]
        print(f"growth exponent k (seconds ~ {key}^k, {base} -> {top}): "
              + ", ".join(f"{p} {exponent(small, large, key, p):.2f}" for p in PHASES[1:]))
    plot(rows, args.values, Path(args.plot))
    print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()
