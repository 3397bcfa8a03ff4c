"""The paper's evaluation figures as PNG files (matplotlib, no display needed).

Every figure drawn from the judge's verdicts carries the judge's measured quality in its title
(`note`), in red with "UNRELIABLE JUDGE" when it failed its checks (`warn`)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: evaluation runs on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from iq_lightning.files import atomic_path  # noqa: E402
from iq_lightning.evaluation.ratings import EloIntervals, EloResult, WinRate, gaussian_smooth  # noqa: E402
from iq_lightning.evaluation.reward import RewardCurve  # noqa: E402

WIN, TIE, LOSE = "#3a923a", "#bdbdbd", "#d1495b"
WARN, GREY = "#c00000", "#8c8c8c"


def _judge_title(ax, title: str, note: str | None, warn: bool, width: int = 70) -> None:
    """The plot's title, with the judge's quality line under it, wrapped (red, bold and led by
    UNRELIABLE JUDGE when the judge failed its checks)."""
    lines = [title] if title else []
    if note:
        lines += textwrap.wrap(note, width)
    if lines:
        ax.set_title("\n".join(lines), fontsize=9, color=WARN if warn else "black", fontweight="bold" if warn else "normal")


def _whisker(ax, x: float, y: float, low: float, high: float) -> None:
    """A horizontal interval [low, high] around x (rounding never makes it negative)."""
    ax.errorbar([x], [y], xerr=[[max(0.0, x - low)], [max(0.0, high - x)]], fmt="none", ecolor="black", capsize=3, linewidth=1)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def win_rate_bars(rates: Mapping[str, WinRate], xlabel: str, path: Path, note: str | None = None, warn: bool = False) -> Path:
    """Win / tie / lose rates stacked to 100%, one bar per labelled pairing (Fig. 2: one method
    against each baseline; or each contestant against one reference). Black whiskers: the 95%
    Wilson intervals of the win rate (at the win/tie boundary) and of the lose rate (at the
    tie/lose boundary); each label says whether wins / (wins + losses) differs from 1/2."""
    names = list(rates)
    fig, ax = plt.subplots(figsize=(8, 0.75 * len(names) + 1.8))
    y = np.arange(len(names))
    win = np.array([rates[n].win_rate for n in names]) * 100
    tie = np.array([rates[n].tie_rate for n in names]) * 100
    lose = np.array([rates[n].lose_rate for n in names]) * 100
    for left, width, colour, label in ((0, win, WIN, "win"), (win, tie, TIE, "tie"), (win + tie, lose, LOSE, "lose")):
        bars = ax.barh(y, width, left=left, color=colour, label=label)
        ax.bar_label(bars, labels=[f"{w:.0f}%" if w >= 6 else "" for w in width], label_type="center", fontsize=8)
    for i, n in enumerate(names):
        (win_low, win_high), (lose_low, lose_high) = rates[n].win_interval, rates[n].lose_interval
        if win_low == win_low:  # not NaN: some valid verdicts; drawn low in the bar, clear of the labels
            _whisker(ax, win[i], i + 0.25, win_low * 100, win_high * 100)
            # the lose segment starts at 100 - lose: its interval moves that edge
            _whisker(ax, 100 - lose[i], i + 0.25, 100 - lose_high * 100, 100 - lose_low * 100)

    def label(n: str) -> str:
        r = rates[n]
        verdict = {"a": "better, 95% CI", "b": "worse, 95% CI", None: "no significant difference"}[r.better]
        return f"{n}\n(n={r.valid}, invalid {r.invalid}; {verdict})"

    ax.set_yticks(y, [label(n) for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"{xlabel}; whiskers: 95% Wilson intervals")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8)
    _judge_title(ax, "", note, warn)
    return _save(fig, path)


def radar_layout(counts: Mapping[str, int], min_count: int) -> tuple[list[str], list[str]]:
    """(categories drawn, categories left out): a category needs `min_count` judged prompts to be
    a spoke; with fewer its win rate can only be 0, 50 or 100% and says nothing."""
    shown = sorted(c for c, n in counts.items() if n >= min_count)
    left_out = sorted(c for c, n in counts.items() if n < min_count)
    return shown, left_out


def category_radar(
    win_rate_by_category: Mapping[str, Mapping[str, float]],
    counts: Mapping[str, int],
    reference: str,
    path: Path,
    min_count: int = 5,
    note: str | None = None,
    warn: bool = False,
) -> Path | None:
    """Per-category win rate against the reference, one polygon per contestant (paper's radar).
    Each spoke is labelled with its number of judged prompts; categories under `min_count` are
    left out and named, in grey, under the chart. None (nothing drawn) under 3 spokes."""
    categories, left_out = radar_layout({c: counts.get(c, 0) for c in win_rate_by_category}, min_count)
    if len(categories) < 3:  # a radar of fewer axes is no chart
        return None
    contestants = sorted({n for c in categories for n in win_rate_by_category[c]})
    angles = np.linspace(0, 2 * np.pi, len(categories), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(6.5, 6.8), subplot_kw={"polar": True})
    for name in contestants:
        values = [win_rate_by_category[c].get(name, np.nan) * 100 for c in categories]
        ax.plot(angles + angles[:1], values + values[:1], label=name, linewidth=1.5)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.1)
    ax.set_xticks(angles, [f"{c}\n(n={counts[c]})" for c in categories], fontsize=8)
    ax.set_ylim(0, 100)
    _judge_title(ax, f"win rate (%) against {reference}, by category", note, warn, width=60)
    ax.legend(loc="lower right", bbox_to_anchor=(1.25, -0.12), fontsize=8)
    if left_out:
        listed = ", ".join(f"{c} ({counts.get(c, 0)})" for c in left_out)
        fig.text(0.02, 0.01, f"left out, fewer than {min_count} prompts: {listed}", fontsize=7, color=GREY, wrap=True)
    return _save(fig, path)


def elo_curve(result: EloResult, sigma: float, path: Path, intervals: EloIntervals | None = None, note: str | None = None, warn: bool = False) -> Path:
    """Each contestant's Elo after every match (mean over orderings), Gaussian-smoothed; the
    legend gives the final rating with its 95% interval over prompts when there is one."""
    smoothed = gaussian_smooth(result.progression, sigma)
    fig, ax = plt.subplots(figsize=(7, 4.3))
    for i, name in enumerate(result.players):
        if intervals is not None and name in intervals.players:
            low, high = intervals.interval(name)
            label = f"{name}: {result.mean[i]:.0f} (95% CI over prompts {low:.0f}-{high:.0f})"
        else:
            label = f"{name}: {result.mean[i]:.0f} (spread over orderings {result.std[i]:.0f})"
        ax.plot(smoothed[:, i], label=label)
    ax.set_xlabel("matches played")
    ax.set_ylabel("Elo rating")
    ax.legend(fontsize=8)
    _judge_title(ax, "", note, warn)
    return _save(fig, path)


def win_minus_lose_interval(rate: WinRate, z: float = 1.96) -> tuple[float, float]:
    """A 95% normal interval of win rate - lose rate over n valid verdicts: each verdict scores
    +1, 0 or -1, so Var = (p_win + p_lose - (p_win - p_lose)^2) / n; clipped to [-1, 1]."""
    n = rate.valid
    if n == 0:
        return float("nan"), float("nan")
    d = rate.win_minus_lose
    half = z * np.sqrt(max(rate.win_rate + rate.lose_rate - d * d, 0.0) / n)
    return max(-1.0, d - half), min(1.0, d + half)


def alpha_sweep(points: Sequence[tuple[float, WinRate | float]], reference: str, path: Path, note: str | None = None, warn: bool = False) -> Path:
    """Fig. 7: win rate minus lose rate against the reference, in percentage points, per alpha,
    with 95% whiskers where the verdict counts are given (a WinRate rather than a number). The
    axis is symmetric about 0 and at least +-10 points wide, so no difference is drawn larger
    than it is (a flat 0 once read as a +-0.04 swing)."""
    points = sorted(points, key=lambda p: p[0])
    alphas = [a for a, _ in points]
    values = np.array([r.win_minus_lose if isinstance(r, WinRate) else float(r) for _, r in points]) * 100
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(alphas, values, marker="o", clip_on=False)
    reach = np.abs(values[np.isfinite(values)]).tolist()
    counted = [(a, r) for a, r in points if isinstance(r, WinRate) and r.valid]
    if counted:
        bounds = np.array([win_minus_lose_interval(r) for _, r in counted]) * 100
        centre = np.array([r.win_minus_lose for _, r in counted]) * 100
        ax.errorbar([a for a, _ in counted], centre, yerr=[centre - bounds[:, 0], bounds[:, 1] - centre], fmt="none", ecolor="black", capsize=3,
                    linewidth=1, label=f"95% interval (n={'/'.join(str(r.valid) for _, r in counted)})")
        reach += np.abs(bounds).ravel().tolist()
        ax.legend(fontsize=8)
    limit = min(100.0, max(10.0, 10 * np.ceil(max(reach, default=0.0) * 1.1 / 10)))
    ax.set_ylim(-limit, limit)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(alphas)
    ax.set_xlabel("alpha")
    ax.set_ylabel(f"win - lose rate vs {reference} (percentage points)")
    _judge_title(ax, "", note, warn)
    return _save(fig, path)


def win_rate_vs_beams(
    points: Sequence[tuple[int, WinRate, float]], contestant: str, reference: str, path: Path, note: str | None = None, warn: bool = False
) -> Path:
    """r-to-Q* (Rafailov et al. 2024): one policy's win and lose rates against the reference per
    number of beams (95% Wilson whiskers), and its mean answer length on the right axis.
    `points`: (num_beams, its WinRate against the reference, mean answer tokens)."""
    points = sorted(points, key=lambda p: p[0])
    beams = [k for k, _, _ in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    for attribute, interval, colour, label in (("win_rate", "win_interval", WIN, "win"), ("lose_rate", "lose_interval", LOSE, "lose")):
        rates = np.array([getattr(r, attribute) for _, r, _ in points]) * 100
        bounds = np.array([getattr(r, interval) for _, r, _ in points]) * 100
        errors = np.nan_to_num(np.abs(bounds.T - rates))  # [[below], [above]]
        ax.errorbar(beams, rates, yerr=errors, color=colour, marker="o", capsize=3, label=f"{label} rate vs {reference}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(beams, [str(k) for k in beams])
    ax.minorticks_off()
    ax.set_ylim(0, 100)
    ax.set_xlabel(f"number of beams ({contestant})")
    ax.set_ylabel("% of judged prompts (whiskers: 95% Wilson)")
    length = ax.twinx()
    length.plot(beams, [t for _, _, t in points], color=GREY, marker="s", linestyle="--", label="mean answer length")
    length.set_ylabel("mean answer length (tokens)", color=GREY)
    length.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    extra = length.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper left")
    _judge_title(ax, f"{contestant}: beam search over its likelihood", note, warn, width=60)
    return _save(fig, path)


def judge_free_panels(figures: Sequence, path: Path, check_name: str) -> Path:
    """The judge-free figures of every contestant side by side: principle check rate (95%
    Wilson whiskers), NLL under pi_w, repetition, length. `figures`: JudgeFreeFigures."""
    names = [f.contestant for f in figures]
    y = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(12, 0.5 * len(names) + 1.8), sharey=True)
    rates = [np.nan if f.principle_rate is None else f.principle_rate * 100 for f in figures]
    axes[0].bar_label(axes[0].barh(y, rates, color=WIN), labels=["n/a" if r != r else f"{r:.0f}%" for r in rates], fontsize=8, padding=2)
    for i, f in enumerate(figures):
        if f.rate_interval is not None:
            low, high = f.rate_interval
            _whisker(axes[0], rates[i], i + 0.25, low * 100, high * 100)
    axes[0].set_xlim(0, 100)
    axes[0].set_title(f"principle check (%)\n{check_name}", fontsize=9)
    panels = (
        ([np.nan if f.nll_pi_w is None else f.nll_pi_w for f in figures], "NLL under pi_w (nats/token)", None, "{:.2f}"),
        ([f.repetition for f in figures], "repetition (repeated word 3-grams)", (0, 1), "{:.2f}"),
        ([f.words for f in figures], "length (words)", None, "{:.0f}"),
    )
    for ax, (values, title, limits, fmt) in zip(axes[1:], panels):
        bars = ax.barh(y, values, color="#4c72b0")
        ax.bar_label(bars, labels=["n/a" if v != v else fmt.format(v) for v in values], fontsize=8, padding=2)
        ax.set_title(title, fontsize=9)
        if limits:
            ax.set_xlim(*limits)
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("judge-free figures (no judge involved)", fontsize=10)
    return _save(fig, path)


def reward_curve_plot(curve: RewardCurve, path: Path, baseline: float | None = None, baseline_label: str = "baseline") -> Path:
    """Fig. 6: normalised reward increment over the initial model, per epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve.epochs, curve.increment, marker="o", label="Inverse-Q*")
    if baseline is not None:
        ax.axhline(baseline, color=LOSE, linestyle="--", label=baseline_label)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 0.2 ticks on a 1-epoch curve
    ax.set_xlabel("epoch (0 = initial model)")
    ax.set_ylabel("reward increment / std")
    ax.legend(fontsize=8)
    return _save(fig, path)
