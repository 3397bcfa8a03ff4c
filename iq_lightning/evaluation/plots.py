"""The paper's evaluation figures as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: evaluation runs on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from iq_lightning.evaluation.ratings import EloResult, WinRate, gaussian_smooth  # noqa: E402
from iq_lightning.evaluation.reward import RewardCurve  # noqa: E402

WIN, TIE, LOSE = "#3a923a", "#bdbdbd", "#d1495b"


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def win_rate_bars(rates: Mapping[str, WinRate], xlabel: str, path: Path) -> Path:
    """Win / tie / lose rates stacked to 100%, one bar per labelled pairing (Fig. 2: one method
    against each baseline; or each contestant against one reference)."""
    names = list(rates)
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.2))
    y = np.arange(len(names))
    win = np.array([rates[n].win_rate for n in names]) * 100
    tie = np.array([rates[n].tie_rate for n in names]) * 100
    lose = np.array([rates[n].lose_rate for n in names]) * 100
    for left, width, colour, label in ((0, win, WIN, "win"), (win, tie, TIE, "tie"), (win + tie, lose, LOSE, "lose")):
        bars = ax.barh(y, width, left=left, color=colour, label=label)
        ax.bar_label(bars, labels=[f"{w:.0f}%" if w >= 6 else "" for w in width], label_type="center", fontsize=8)
    ax.set_yticks(y, [f"{n}\n(n={rates[n].valid}, invalid {rates[n].invalid})" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(xlabel)
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _save(fig, path)


def category_radar(win_rate_by_category: Mapping[str, Mapping[str, float]], reference: str, path: Path) -> Path:
    """Per-category win rate against the reference, one polygon per contestant (paper's radar)."""
    categories = sorted(win_rate_by_category)
    contestants = sorted({n for per in win_rate_by_category.values() for n in per})
    angles = np.linspace(0, 2 * np.pi, len(categories), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(6, 6), subplot_kw={"polar": True})
    for name in contestants:
        values = [win_rate_by_category[c].get(name, np.nan) * 100 for c in categories]
        ax.plot(angles + angles[:1], values + values[:1], label=name, linewidth=1.5)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.1)
    ax.set_xticks(angles, categories, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_title(f"win rate (%) against {reference}, by category", fontsize=10)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=8)
    return _save(fig, path)


def elo_curve(result: EloResult, sigma: float, path: Path) -> Path:
    """Each contestant's Elo after every match (mean over orderings), Gaussian-smoothed."""
    smoothed = gaussian_smooth(result.progression, sigma)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(result.players):
        ax.plot(smoothed[:, i], label=f"{name}: {result.mean[i]:.0f} ± {result.std[i]:.0f}")
    ax.set_xlabel("matches played")
    ax.set_ylabel("Elo rating")
    ax.legend(fontsize=8)
    return _save(fig, path)


def alpha_sweep(points: Sequence[tuple[float, float]], reference: str, path: Path) -> Path:
    """Fig. 7: win rate minus lose rate against the reference, per alpha."""
    alphas, values = zip(*sorted(points))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(alphas, np.array(values) * 100, marker="o")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("alpha")
    ax.set_ylabel(f"win - lose rate vs {reference} (%)")
    return _save(fig, path)


def reward_curve_plot(curve: RewardCurve, path: Path, baseline: float | None = None, baseline_label: str = "baseline") -> Path:
    """Fig. 6: normalised reward increment over the initial model, per epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve.epochs, curve.increment, marker="o", label="Inverse-Q*")
    if baseline is not None:
        ax.axhline(baseline, color=LOSE, linestyle="--", label=baseline_label)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("epoch (0 = initial model)")
    ax.set_ylabel("reward increment / std")
    ax.legend(fontsize=8)
    return _save(fig, path)
