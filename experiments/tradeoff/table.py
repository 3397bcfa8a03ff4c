"""The trade-off table and figures of a tradeoff run (run.sh): per setting, the held-out validation
after its last epoch, pooled over its seeds: principle rate and clean-pass rate (choose_lr.py's
definition: passes, does not loop, 8 words or more, no less plausible to pi_w than pi_w's own
least plausible answer) with 95% Wilson intervals over the pooled answers, and NLL under pi_w
and repetition as the seeds' mean (min-max). The base policy (epoch -1) and the teacher (the
principle-prompted base) are points too, pooled over one run per seed (the seed draws the
held-out prompts). A setting is on the front when no other setting has at least its clean-pass
rate at no more NLL under pi_w, one of the two strictly.

    python experiments/tradeoff/table.py outputs/tradeoff                  # the markdown table
    python experiments/tradeoff/table.py outputs/tradeoff --front          # the front's names (run.sh's seeds 1, 2)
    python experiments/tradeoff/table.py outputs/tradeoff --figures DIR    # also DIR/tradeoff_nll.png, tradeoff_repetition.png
    python experiments/tradeoff/table.py outputs/tradeoff --rate principle # principle rate instead of clean passes
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "principle_baselines"))
from choose_lr import clean_passes, teacher_bar  # noqa: E402

from iq_lightning.evaluation.ratings import wilson_interval  # noqa: E402
from iq_lightning.files import read_jsonl  # noqa: E402
from iq_lightning.validation import VALIDATION_DIR, read_summary  # noqa: E402


@dataclass
class Point:
    """One setting (or the base, or the teacher), its seeds' validations pooled."""

    name: str
    overrides: str = ""
    seeds: list[str] = field(default_factory=list)
    passes: int = 0  # answers passing the principle check
    clean: int = 0  # of them, clean passes
    answers: int = 0
    nll: list[float] = field(default_factory=list)  # per seed
    repetition: list[float] = field(default_factory=list)

    def add(self, seed: str, summary: dict, answers: Path, nll_bar: float | None) -> None:
        counted = clean_passes(answers, nll_bar)
        if counted is None:  # no principle check: nothing to pool
            return
        self.seeds.append(seed)
        self.passes += round(summary["principle_rate"] * summary["answers"])
        self.clean += counted[0]
        self.answers += counted[1]
        self.nll.append(summary["nll_w"])
        self.repetition.append(summary["repetition"])

    def rate(self, which: str) -> float:
        return (self.clean if which == "clean" else self.passes) / max(self.answers, 1)

    def interval(self, which: str) -> tuple[float, float]:
        return wilson_interval(self.clean if which == "clean" else self.passes, self.answers)

    @property
    def mean_nll(self) -> float:
        return sum(self.nll) / len(self.nll)

    @property
    def mean_repetition(self) -> float:
        return sum(self.repetition) / len(self.repetition)


def settings(out: Path) -> list[tuple[str, str]]:
    """(name, overrides) in the order of the run's settings.tsv, else the run's folders."""
    listed = out / "settings.tsv"
    if listed.exists():
        rows = [line.split("\t", 1) for line in listed.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
        return [(r[0], r[1] if len(r) > 1 else "") for r in rows]
    return [(d.name, "") for d in sorted(out.iterdir()) if d.is_dir() and any(d.glob("seed*"))]


@dataclass
class Passing:
    """The teacher's own passing answers, pooled over seeds: for a language principle the fair bar
    for NLL under pi_w and repetition (its failing answers are in the base's language, which pi_w
    finds more plausible than its own French)."""

    tokens: int = 0
    nll_sum: float = 0.0
    repetition: list[float] = field(default_factory=list)

    def add(self, answers: Path) -> None:
        for r in read_jsonl(answers):
            if r.get("passes"):
                self.tokens += r["tokens"]
                self.nll_sum += r["nll_w"] * r["tokens"]
                self.repetition.append(r["repetition"])

    @property
    def nll(self) -> float | None:
        return self.nll_sum / self.tokens if self.tokens else None

    @property
    def mean_repetition(self) -> float | None:
        return sum(self.repetition) / len(self.repetition) if self.repetition else None


def collect(out: Path) -> tuple[list[Point], Point, Point, Passing]:
    """The settings' points (those with a finished validation), the base's and the teacher's, and
    the teacher's passing answers."""
    points, base, teacher, passing = [], Point("base"), Point("teacher"), Passing()
    reference_seeds: set[str] = set()
    for name, overrides in settings(out):
        point = Point(name, overrides)
        for run in sorted((out / name).glob("seed*")):
            rows = read_summary(run)
            policy = [r for r in rows if r["who"] == "policy" and r["epoch"] >= 0]
            if not policy:
                continue
            last = max(policy, key=lambda r: r["epoch"])
            bar = teacher_bar(run)
            point.add(run.name, last, run / VALIDATION_DIR / f"epoch_{last['epoch']:03d}.jsonl", bar)
            if run.name in reference_seeds:
                continue
            reference_seeds.add(run.name)
            first = next((r for r in rows if r["who"] == "policy" and r["epoch"] == -1), None)
            if first is not None:
                base.add(run.name, first, run / VALIDATION_DIR / "epoch_-01.jsonl", bar)
            taught = next((r for r in rows if r["who"] == "teacher"), None)
            if taught is not None:
                teacher.add(run.name, taught, run / VALIDATION_DIR / "teacher.jsonl", bar)
                passing.add(run / VALIDATION_DIR / "teacher.jsonl")
        if point.seeds:
            points.append(point)
    return points, base, teacher, passing


def front(points: list[Point], which: str, cost: str = "nll") -> list[Point]:
    """The settings no other dominates: at least its rate at no more cost, one strictly; by cost."""
    def key(p: Point) -> tuple[float, float]:
        return (p.mean_nll if cost == "nll" else p.mean_repetition, p.rate(which))

    kept = []
    for p in points:
        x, y = key(p)
        dominated = any(kx <= x and ky >= y and (kx, ky) != (x, y) for kx, ky in map(key, points))
        if not dominated:
            kept.append(p)
    return sorted(kept, key=key)


def spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def table(points: list[Point], base: Point, teacher: Point, which: str, passing: Passing | None = None) -> str:
    on_front = {p.name for p in front(points, which)}
    label = "clean passes" if which == "clean" else "principle rate"
    lines = [
        "| setting | overrides | seeds | principle rate (95% CI) | clean passes (95% CI) | NLL under pi_w | repetition | front |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(p: Point, mark: str) -> str:
        rate = f"{p.rate('principle'):.2f} ({p.interval('principle')[0]:.2f}-{p.interval('principle')[1]:.2f}, n={p.answers})"
        clean = f"{p.rate('clean'):.2f} ({p.interval('clean')[0]:.2f}-{p.interval('clean')[1]:.2f})"
        return f"| {p.name} | {p.overrides} | {len(p.seeds)} | {rate} | {clean} | {spread(p.nll)} | {spread(p.repetition)} | {mark} |"

    for ref in (base, teacher):
        if ref.seeds:
            lines.append(row(ref, ""))
    for p in sorted(points, key=lambda p: (-p.rate(which), p.mean_nll)):
        lines.append(row(p, "yes" if p.name in on_front else ""))
    lines.append("")
    lines.append(f"base: the untrained policy (epoch -1); teacher: the base with the principle in its prompt. Sorted by {label}, then NLL under pi_w; front: {label} against NLL under pi_w.")
    if teacher.seeds:
        beat = [
            p.name
            for p in points
            if p.rate("principle") > teacher.rate("principle") and p.mean_nll <= teacher.mean_nll and p.mean_repetition <= teacher.mean_repetition
        ]
        verdict = ", ".join(beat) if beat else "none"
        lines.append(f"Above the teacher's principle rate at or below its NLL under pi_w and repetition: {verdict}.")
    if passing is not None and passing.nll is not None:
        fair = [
            p.name
            for p in points
            if p.rate("principle") > teacher.rate("principle") and p.mean_nll <= passing.nll and p.mean_repetition <= passing.mean_repetition
        ]
        lines.append(
            f"The teacher's passing answers alone ({len(passing.repetition)}): NLL under pi_w {passing.nll:.3f}, repetition "
            f"{passing.mean_repetition:.3f}; above the teacher's principle rate at or below these: {', '.join(fair) if fair else 'none'}."
        )
    return "\n".join(lines)


def figures(points: list[Point], base: Point, teacher: Point, which: str, out_dir: Path, passing: Passing | None = None) -> list[Path]:
    """tradeoff_nll.png and tradeoff_repetition.png: rate against each cost, one point per setting
    (error bars: the rate's Wilson interval, the cost's seed range), base and teacher, the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = "clean-pass rate" if which == "clean" else "principle rate"
    written = []
    for cost, xlabel in (("nll", "NLL under pi_w (nats/token)"), ("repetition", "repeated word 3-grams (share)")):
        fig, ax = plt.subplots(figsize=(7.5, 5.5))

        def xs(p: Point) -> list[float]:
            return p.nll if cost == "nll" else p.repetition

        def draw(p: Point, **style) -> None:
            x = sum(xs(p)) / len(xs(p))
            y = p.rate(which)
            lo, hi = p.interval(which)
            ax.errorbar(x, y, xerr=[[x - min(xs(p))], [max(xs(p)) - x]], yerr=[[y - lo], [hi - y]], elinewidth=0.6, capsize=2, **style)
            ax.annotate(p.name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)

        for p in points:
            draw(p, fmt="o", color="tab:blue", markersize=5)
        for ref, colour, marker in ((base, "black", "s"), (teacher, "tab:red", "*")):
            if ref.seeds:
                draw(ref, fmt=marker, color=colour, markersize=10)
        bar = None if passing is None else (passing.nll if cost == "nll" else passing.mean_repetition)
        if bar is not None:
            ax.axvline(bar, color="tab:red", linestyle=":", linewidth=1, label="the teacher's passing answers")
        kept = front(points, which, cost)
        if kept:
            fx = [sum(xs(p)) / len(xs(p)) for p in kept]
            ax.step(fx, [p.rate(which) for p in kept], where="post", color="tab:green", linewidth=1.2, label="Pareto front")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_xlabel(xlabel + ", lower is better")
        ax.set_ylabel(f"{label} on held-out prompts, higher is better")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.set_title(f"Inverse-Q* on held-out prompts: {label} against {'NLL under pi_w' if cost == 'nll' else 'repetition'}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"tradeoff_{cost}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rate", choices=("clean", "principle"), default="clean")
    parser.add_argument("--front", action="store_true", help="print the front's setting names only")
    parser.add_argument("--figures", type=Path, help="write the two figures into this folder")
    args = parser.parse_args()
    points, base, teacher, passing = collect(args.out)
    if not points:
        sys.exit(f"error: no finished validation under {args.out}")
    if args.front:
        print(" ".join(p.name for p in front(points, args.rate)))
        return
    print(table(points, base, teacher, args.rate, passing))
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        for path in figures(points, base, teacher, args.rate, args.figures, passing):
            print(f"\n![{path.stem}]({path.name})")


if __name__ == "__main__":
    main()
