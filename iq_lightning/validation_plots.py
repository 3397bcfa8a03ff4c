"""Plots of held-out validation (validation.py): a run's figures against epoch, with the base
policy (epoch -1) and the principle-prompted teacher as reference lines; and, for an alpha sweep,
the final figures against alpha (the shape of the paper's Fig. 7, measured without a judge).

    python -m iq_lightning.validation_plots outputs/2026-11-24/10-00-00     # a run
    python -m iq_lightning.validation_plots multirun/2026-11-24/11-00-00    # an alpha sweep
"""

from __future__ import annotations

import math
from pathlib import Path

from iq_lightning.evaluation.ratings import wilson_interval
from iq_lightning.files import run_config_path
from iq_lightning.validation import read_summary

PANELS = (
    ("principle_rate", "principle rate (share of answers)", "passes the principle check, no principle in the prompt"),
    ("nll_w", "NLL under pi_w (nats/token)", "how plausible the answers are to the teacher"),
    ("kl_pi_hat", "KL(pi_theta || pi_hat) (nats/token)", "what the objective drives to 0"),
    ("repetition", "repeated word 3-grams (share)", "looping"),
    ("length", "answer length (tokens)", ""),
)


def plot_validation(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """plots/validation.png of a run; None if it has no validation yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_summary(run_dir)
    policy = [r for r in rows if r["who"] == "policy"]
    teacher = next((r for r in rows if r["who"] == "teacher"), None)
    if not policy:
        return None
    base = next((r for r in policy if r["epoch"] == -1), None)
    panels = [p for p in PANELS if any(_finite(r.get(p[0])) for r in policy)]
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.4 * cols, 3.4 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    epochs = [r["epoch"] for r in policy]
    for ax, (key, label, note) in zip(axes.flat, panels):
        ax.plot(epochs, [r.get(key, math.nan) for r in policy], marker="o", color="tab:blue", label="policy (no principle)")
        if key == "principle_rate":
            _rate_intervals(ax, epochs, policy, teacher)
        if teacher is not None and _finite(teacher.get(key)):
            ax.axhline(teacher[key], color="tab:green", linestyle="--", label="teacher (base + principle)")
        if base is not None and _finite(base.get(key)):
            ax.axhline(base[key], color="tab:gray", linestyle=":", label="base (epoch -1)")
        ax.set_xlabel("epoch (-1: before training)")
        ax.set_ylabel(label)
        ax.set_xticks(epochs)
        ax.set_title(note, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"held-out validation: {Path(run_dir).name}", fontsize=10)
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "plots" / "validation.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_points(sweep_dir: str | Path) -> list[dict]:
    """(alpha, final figures, teacher figures) of every run of a Hydra multirun that validated."""
    import yaml

    points = []
    for run_dir in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir()):
        config = run_config_path(run_dir)
        if config is None:
            continue
        rows = read_summary(run_dir)
        policy = [r for r in rows if r["who"] == "policy"]
        if not policy:
            continue
        alpha = yaml.safe_load(config.read_text()).get("alpha")
        teacher = next((r for r in rows if r["who"] == "teacher"), None)
        points.append({"alpha": float(alpha), "run_dir": str(run_dir), "final": policy[-1], "teacher": teacher})
    return sorted(points, key=lambda p: p["alpha"])


def plot_sweep(sweep_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """plots/alpha_sweep_validation.png: final principle rate and NLL under pi_w against alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sweep_points(sweep_dir)
    if not points:
        return None
    alphas = [p["alpha"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (key, label, _) in zip(axes, PANELS[:2]):
        ax.plot(alphas, [p["final"].get(key, math.nan) for p in points], marker="o", label="trained policy (no principle)")
        teacher = next((p["teacher"] for p in points if p["teacher"] and _finite(p["teacher"].get(key))), None)
        if teacher is not None:
            ax.axhline(teacher[key], color="tab:green", linestyle="--", label="teacher (base + principle)")
        ax.set_xlabel("alpha")
        ax.set_ylabel(label)
        ax.set_xticks(alphas)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("alpha sweep, held-out validation after the last epoch", fontsize=10)
    fig.tight_layout()
    path = Path(out) if out else Path(sweep_dir) / "plots" / "alpha_sweep_validation.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rate_intervals(ax, epochs: list[int], policy: list[dict], teacher: dict | None) -> None:
    """95% Wilson intervals of a share of n answers: with a few dozen held-out prompts a rate
    moves by more than 0.1 from sampling alone, and the plot should say so."""
    if not all("answers" in r and _finite(r.get("principle_rate")) for r in policy):
        return  # summaries written before the answer count was recorded
    bounds = [wilson_interval(round(r["principle_rate"] * r["answers"]), r["answers"]) for r in policy]
    rates = [r["principle_rate"] for r in policy]
    ax.errorbar(epochs, rates, yerr=[[p - lo for p, (lo, _) in zip(rates, bounds)], [hi - p for p, (_, hi) in zip(rates, bounds)]],
                fmt="none", ecolor="tab:blue", alpha=0.5, capsize=3, label=f"95% interval (n={policy[-1]['answers']})")
    if teacher is not None and "answers" in teacher and _finite(teacher.get("principle_rate")):
        lo, hi = wilson_interval(round(teacher["principle_rate"] * teacher["answers"]), teacher["answers"])
        ax.axhspan(lo, hi, color="tab:green", alpha=0.1)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def main(argv: list[str] | None = None) -> None:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        sys.exit("usage: python -m iq_lightning.validation_plots RUN_DIR | SWEEP_DIR")
    target = Path(args[0])
    sweep = not (target / "validation").is_dir()
    path = plot_sweep(target) if sweep else plot_validation(target)
    if path is None:
        sys.exit(f"error: no validation figures under {target} (val.every_n_epochs=0, or the run has not validated yet)")
    if sweep:
        for p in sweep_points(target):
            f = p["final"]
            print(f"alpha {p['alpha']:.2f}: principle_rate {f.get('principle_rate', math.nan):.3f}, nll_w {f['nll_w']:.3f}  ({p['run_dir']})")
    print(path)


if __name__ == "__main__":
    main()
