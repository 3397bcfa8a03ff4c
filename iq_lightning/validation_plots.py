"""Plots of held-out validation (validation.py): a run's figures against epoch, with the base
policy (epoch -1) and the principle-prompted teacher as reference lines; the training curves
(plots/training.png, from metrics.csv); and, for an alpha sweep, the final figures against alpha
(the shape of the paper's Fig. 7, measured without a judge). Shares are drawn on [0, 1] with 95%
Wilson intervals, every other figure from 0, so a one-token change never looks like a cliff.

    python -m iq_lightning.validation_plots outputs/2026-11-24/10-00-00     # a run
    python -m iq_lightning.validation_plots multirun/2026-11-24/11-00-00    # an alpha sweep
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

from iq_lightning.intervals import wilson_interval
from iq_lightning.files import run_config_path
from iq_lightning.validation import read_summary

# (key, y label, note, lower bound, upper bound or None): every figure is >= 0; shares end at 1.
PANELS = (
    ("principle_rate", "principle rate (share of answers)", "passes the principle check, no principle in the prompt", 0.0, 1.0),
    ("nll_w", "NLL under pi_w (nats/token)", "how plausible the answers are to the teacher", 0.0, None),
    ("kl_pi_hat_exact_heldout", "KL(pi_theta || pi_hat), exact (nats/token)",
     "on held-out greedy answers; train/kl_pi_hat_est_rollouts is on the epoch's own samples, which training fits, and can fall while this rises", 0.0, None),
    ("repetition", "repeated word 3-grams (share)", "looping", 0.0, 1.0),
    ("length", "answer length (tokens)", "", 0.0, None),
    ("truncated", "cut off at max_new_tokens (share)", "answers that hit the token limit", 0.0, 1.0),
)
# Binomial shares of n answers: drawn with 95% Wilson intervals.
RATES = ("principle_rate", "truncated")
NO_CHECK = "no principle check applies to this principle:\nset val.check={kind: regex, pattern: ...}\n(README: Principle checks)"
# Training curves from metrics.csv: (column, y label, lower bound).
TRAINING_PANELS = (
    ("train/loss_epoch", "training loss (epoch mean)", 0.0),
    ("train/kl_pi_hat_est_rollouts", "KL(pi_theta || pi_hat), k3 estimate\non the epoch's own rollouts (nats/token)", 0.0),
    ("train/credit_mean", "token credit beta log(pi_hat / pi_ref)\n(mean per token)", None),
)
PHASE_COLUMNS = (("time/sample_s", "sample"), ("time/score_s", "score"), ("time/train_s", "train"), ("time/val_s", "validate"), ("time/checkpoint_s", "checkpoint"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: runs are often headless
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path | None:
    if fig is None:
        return None
    plt = _pyplot()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bounds(ax, values: list[float], low: float | None, high: float | None) -> None:
    """Limits that do not turn noise into a cliff: shares on [0, 1]; any other figure from 0 (or
    its most negative value) to 10% above the largest value drawn."""
    finite = [v for v in values if _finite(v)]
    if high is None:
        top = max(finite, default=0.0)
        high = top * 1.1 if top > 0 else 1.0
    if low is None:
        bottom = min(finite, default=0.0)
        low = bottom * 1.1 if bottom < 0 else 0.0
    ax.set_ylim(low, high)


def _epoch_axis(ax, epochs: list[int], label: str = "epoch (-1: before training)") -> None:
    """Integer epochs only, half an epoch of margin: one or two epochs never crowd the ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(8, len(epochs) + 1)))
    ax.set_xlabel(label)


def plot_validation(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """plots/validation.png of a run; None if it has no validation yet."""
    return _save(validation_figure(run_dir), Path(out) if out else Path(run_dir) / "plots" / "validation.png")


def validation_figure(run_dir: str | Path):
    """The figure of plot_validation (a matplotlib Figure), or None. The principle-rate panel is
    always drawn: it says so when no check applies to the principle."""
    plt = _pyplot()
    rows = read_summary(run_dir)
    policy = [r for r in rows if r["who"] == "policy"]
    teacher = next((r for r in rows if r["who"] == "teacher"), None)
    if not policy:
        return None
    base = next((r for r in policy if r["epoch"] == -1), None)
    panels = [p for p in PANELS if p[0] == "principle_rate" or any(_finite(r.get(p[0])) for r in policy)]
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.5 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    epochs = [r["epoch"] for r in policy]
    for ax, (key, label, note, low, high) in zip(axes.flat, panels):
        values = [r.get(key, math.nan) for r in policy]
        drawn = list(values)
        if not any(_finite(v) for v in values):
            ax.text(0.5, 0.5, NO_CHECK, ha="center", va="center", fontsize=8, transform=ax.transAxes, color="tab:red")
        else:
            ax.plot(epochs, values, marker="o", color="tab:blue", label="policy (no principle)", clip_on=False)
        if key in RATES:
            _rate_intervals(ax, epochs, policy, teacher, key)
        if teacher is not None and _finite(teacher.get(key)):
            ax.axhline(teacher[key], color="tab:green", linestyle="--", label="teacher (base + principle)")
            drawn.append(teacher[key])
        if base is not None and _finite(base.get(key)):
            ax.axhline(base[key], color="tab:gray", linestyle=":", label="base (epoch -1)")
        _bounds(ax, drawn, low, high)
        _epoch_axis(ax, epochs)
        ax.set_ylabel(label, fontsize=9)
        ax.set_title("\n".join(textwrap.wrap(note, 60)), fontsize=7)
        ax.grid(alpha=0.3)
    legend_ax = next((ax for ax in axes.flat if ax.get_legend_handles_labels()[0]), axes[0][0])
    legend_ax.legend(fontsize=7)
    fig.suptitle(f"held-out validation: {Path(run_dir).name}", fontsize=10)
    return fig


def plot_training(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """plots/training.png: the training loss, the KL estimate, the mean token credit and the
    seconds of each phase against epoch, from metrics/metrics.csv; None before the first epoch."""
    return _save(training_figure(run_dir), Path(out) if out else Path(run_dir) / "plots" / "training.png")


def training_figure(run_dir: str | Path):
    """The figure of plot_training, or None."""
    plt = _pyplot()
    rows = _epoch_rows(Path(run_dir) / "metrics" / "metrics.csv")
    if not rows:
        return None
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, len(TRAINING_PANELS) + 1, figsize=(4.4 * (len(TRAINING_PANELS) + 1), 3.5), squeeze=False)
    for ax, (key, label, low) in zip(axes[0], TRAINING_PANELS):
        values = [r.get(key, math.nan) for r in rows]
        ax.plot(epochs, values, marker="o")
        if low is None:
            ax.axhline(0, color="grey", linewidth=0.8)
        _bounds(ax, values, low, None)
        _epoch_axis(ax, epochs, "epoch")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    bottom = [0.0] * len(rows)
    for key, label in PHASE_COLUMNS:
        seconds = [r.get(key, 0.0) for r in rows]
        if any(seconds):
            ax.bar(epochs, seconds, bottom=bottom, label=label)
            bottom = [b + s for b, s in zip(bottom, seconds)]
    _epoch_axis(ax, epochs, "epoch")
    ax.set_ylim(0, max(bottom, default=1.0) * 1.1 or 1.0)
    ax.set_ylabel("seconds per phase")
    ax.legend(fontsize=7)
    fig.suptitle(f"training: {Path(run_dir).name}", fontsize=10)
    return fig


def _trained_alpha(run_dir: Path) -> float | None:
    """The alpha a run trained with, from the record it wrote when it started (run.RunStarted's
    run_fingerprint.json), not Hydra's .hydra/config.yaml, which a refused restart rewrites with
    the value it was refused for. None without a readable record."""
    try:
        stored = json.loads((run_dir / "run_fingerprint.json").read_text(encoding="utf-8"))
        return float(stored["settings"]["alpha"] if "settings" in stored else stored["alpha"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
        alpha = _trained_alpha(run_dir)
        if alpha is None:  # no record (a run from elsewhere): Hydra's file is all there is
            alpha = yaml.safe_load(config.read_text()).get("alpha")
        teacher = next((r for r in rows if r["who"] == "teacher"), None)
        points.append({"alpha": float(alpha), "run_dir": str(run_dir), "final": policy[-1], "teacher": teacher})
    return sorted(points, key=lambda p: p["alpha"])


def plot_sweep(sweep_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """plots/alpha_sweep_validation.png: final principle rate and NLL under pi_w against alpha."""
    return _save(sweep_figure(sweep_dir), Path(out) if out else Path(sweep_dir) / "plots" / "alpha_sweep_validation.png")


def sweep_figure(sweep_dir: str | Path):
    """The figure of plot_sweep (95% Wilson intervals on the rate), or None."""
    plt = _pyplot()
    points = sweep_points(sweep_dir)
    if not points:
        return None
    alphas = [p["alpha"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (key, label, _, low, high) in zip(axes, PANELS[:2]):
        values = [p["final"].get(key, math.nan) for p in points]
        drawn = list(values)
        ax.plot(alphas, values, marker="o", label="trained policy (no principle)", clip_on=False)
        if key in RATES:
            counted = [(a, p["final"]) for a, p in zip(alphas, points) if "answers" in p["final"] and _finite(p["final"].get(key))]
            if counted:
                bounds = [_interval(f, key) for _, f in counted]
                ax.errorbar([a for a, _ in counted], [f[key] for _, f in counted],
                            yerr=[[f[key] - lo for (_, f), (lo, _) in zip(counted, bounds)], [hi - f[key] for (_, f), (_, hi) in zip(counted, bounds)]],
                            fmt="none", ecolor="tab:blue", alpha=0.5, capsize=3, label="95% Wilson interval")
            elif not any(_finite(v) for v in values):
                ax.text(0.5, 0.5, NO_CHECK, ha="center", va="center", fontsize=8, transform=ax.transAxes, color="tab:red")
        teacher = next((p["teacher"] for p in points if p["teacher"] and _finite(p["teacher"].get(key))), None)
        if teacher is not None:
            ax.axhline(teacher[key], color="tab:green", linestyle="--", label="teacher (base + principle)")
            drawn.append(teacher[key])
        _bounds(ax, drawn, low, high)
        ax.set_xlabel("alpha")
        ax.set_ylabel(label)
        ax.set_xticks(alphas)
        ax.set_xlim(min(alphas) - 0.1, max(alphas) + 0.1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("alpha sweep, held-out validation after the last epoch", fontsize=10)
    return fig


def _epoch_rows(path: Path) -> list[dict[str, float]]:
    """metrics.csv merged into one row per trained epoch: Lightning's epoch-end row and the rows
    validation and the checkpoint log on their own (time/val_s) share the epoch column."""
    import csv

    if not path.exists():
        return []
    merged: dict[int, dict[str, float]] = {}
    with open(path, encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if not row.get("epoch"):
                continue
            values = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "epoch"}
            merged.setdefault(int(float(row["epoch"])), {}).update(values)
    return [{"epoch": e, **merged[e]} for e in sorted(merged) if "train/loss_epoch" in merged[e]]


def _interval(row: dict, key: str) -> tuple[float, float]:
    return wilson_interval(round(row[key] * row["answers"]), row["answers"])


def _rate_intervals(ax, epochs: list[int], policy: list[dict], teacher: dict | None, key: str = "principle_rate") -> None:
    """95% Wilson intervals of a share of n answers: with a few dozen held-out prompts a rate
    moves by more than 0.1 from sampling alone, and the plot should say so."""
    if not all("answers" in r and _finite(r.get(key)) for r in policy):
        return  # no check, or summaries written before the answer count was recorded
    bounds = [_interval(r, key) for r in policy]
    rates = [r[key] for r in policy]
    ax.errorbar(epochs, rates, yerr=[[p - lo for p, (lo, _) in zip(rates, bounds)], [hi - p for p, (_, hi) in zip(rates, bounds)]],
                fmt="none", ecolor="tab:blue", alpha=0.5, capsize=3, label=f"95% interval (n={policy[-1]['answers']})")
    if teacher is not None and "answers" in teacher and _finite(teacher.get(key)):
        lo, hi = _interval(teacher, key)
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
    else:
        training = plot_training(target)
        if training is not None:
            print(training)
    print(path)


if __name__ == "__main__":
    main()
