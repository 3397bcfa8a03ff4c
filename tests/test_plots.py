"""Plots that cannot mislead: limits, labels, intervals and ticks read back from the Axes."""

import json

import matplotlib
import pytest

matplotlib.use("Agg")
from matplotlib.container import ErrorbarContainer  # noqa: E402

from iq_lightning.validation_plots import sweep_figure, training_figure, validation_figure  # noqa: E402


def _summary(run_dir, rows):
    (run_dir / "validation").mkdir(parents=True)
    (run_dir / "validation" / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(epoch, who="policy", **figures):
    base = {"epoch": epoch, "who": who, "kl_pi_hat_exact_heldout": 0.3, "kl_pi_w": 0.2, "nll_w": 1.41, "repetition": 0.1,
            "length": 31.0, "truncated": 0.5, "answers": 16, "principle_rate": 0.25}
    return {**base, **figures}


def _axes(fig):
    return {ax.get_ylabel(): ax for ax in fig.axes if ax.get_ylabel()}


def _has_interval(ax) -> bool:
    return any(isinstance(c, ErrorbarContainer) for c in ax.containers)


def test_validation_axes_start_at_sensible_bounds_with_intervals_on_rates(tmp_path):
    # A 1-epoch run: length 31 -> 32 and NLL 1.41 -> 1.40 are noise, not cliffs.
    _summary(tmp_path, [_row(-1), _row(-1, "teacher", nll_w=0.9, principle_rate=0.5), _row(0, length=32.0, nll_w=1.40, principle_rate=0.3125)])
    axes = _axes(validation_figure(tmp_path))
    rate = axes["principle rate (share of answers)"]
    assert rate.get_ylim() == (0.0, 1.0) and _has_interval(rate)
    truncated = axes["cut off at max_new_tokens (share)"]
    assert truncated.get_ylim() == (0.0, 1.0) and _has_interval(truncated)
    assert axes["repeated word 3-grams (share)"].get_ylim() == (0.0, 1.0)
    length = axes["answer length (tokens)"]
    assert length.get_ylim() == pytest.approx((0.0, 32.0 * 1.1))
    nll = axes["NLL under pi_w (nats/token)"]
    assert nll.get_ylim() == pytest.approx((0.0, 1.41 * 1.1))
    kl = axes["KL(pi_theta || pi_hat), exact (nats/token)"]
    assert kl.get_ylim()[0] == 0.0 and "held-out" in kl.get_title() and "train/kl_pi_hat_est_rollouts" in kl.get_title()
    # Integer epochs only, never crowded: -1 and 0, half an epoch of margin.
    assert [t for t in rate.get_xticks() if rate.get_xlim()[0] <= t <= rate.get_xlim()[1]] == [-1.0, 0.0]
    assert rate.get_xlim() == (-1.5, 0.5)


def test_a_principle_without_a_check_says_so_in_its_panel(tmp_path):
    rows = [{k: v for k, v in _row(e).items() if k != "principle_rate"} for e in (-1, 0)]
    _summary(tmp_path, rows)
    rate = _axes(validation_figure(tmp_path))["principle rate (share of answers)"]
    assert "no principle check applies" in " ".join(t.get_text() for t in rate.texts)
    assert not rate.lines  # nothing drawn as if it were a rate


def test_sweep_plot_shares_on_zero_one_with_intervals_and_nll_from_zero(tmp_path):
    for i, (alpha, rate, nll) in enumerate(((1.0, 0.0, 1.40), (1.5, 0.0625, 1.41))):
        run = tmp_path / str(i)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(f"alpha: {alpha}\n")
        _summary(run, [_row(-1), _row(-1, "teacher", nll_w=0.9, principle_rate=0.5), _row(0, principle_rate=rate, nll_w=nll)])
    axes = _axes(sweep_figure(tmp_path))
    rate_ax = axes["principle rate (share of answers)"]
    assert rate_ax.get_ylim() == (0.0, 1.0) and _has_interval(rate_ax)  # not -0.04
    assert axes["NLL under pi_w (nats/token)"].get_ylim() == pytest.approx((0.0, 1.41 * 1.1))  # not +-0.02


def test_training_curves_from_metrics_csv(tmp_path):
    (tmp_path / "metrics").mkdir()
    header = "epoch,step,train/loss_epoch,train/kl_pi_hat_est_rollouts,train/credit_mean,time/sample_s,time/train_s,time/val_s,time/checkpoint_s"
    lines = [header, "-1,0,,,,,,5.0,", "0,3,0.5,0.4,-0.01,10.0,20.0,,1.0", "0,3,,,,,,6.0,", "1,7,0.2,0.1,0.02,9.0,18.0,,1.0", "1,7,,,,,,6.5,"]
    (tmp_path / "metrics" / "metrics.csv").write_text("\n".join(lines) + "\n")
    fig = training_figure(tmp_path)
    axes = _axes(fig)
    loss = axes["training loss (epoch mean)"]
    assert loss.get_ylim() == pytest.approx((0.0, 0.55)) and list(loss.lines[0].get_ydata()) == [0.5, 0.2]
    kl = next(ax for label, ax in axes.items() if label.startswith("KL(pi_theta || pi_hat), k3 estimate"))
    assert "own rollouts" in kl.get_ylabel()
    credit = next(ax for label, ax in axes.items() if label.startswith("token credit"))
    assert credit.get_ylim() == pytest.approx((-0.011, 0.022))
    phases = axes["seconds per phase"]
    # Stacked: sample + train + validate + checkpoint, validation time merged from its own row.
    tops = {round(bar.get_x() + bar.get_width() / 2): bar.get_y() + bar.get_height() for bar in phases.patches}
    assert tops == {0: pytest.approx(37.0), 1: pytest.approx(34.5)}
    assert [t.get_text() for t in phases.get_legend().get_texts()] == ["sample", "train", "validate", "checkpoint"]


def test_evaluation_alpha_sweep_is_in_percentage_points_with_intervals(tmp_path, monkeypatch):
    from iq_lightning.evaluation import plots
    from iq_lightning.evaluation.ratings import WinRate

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.alpha_sweep([(1.0, 0.0), (1.5, 0.0)], "sft", tmp_path / "a.png")  # a flat 0 once drew as +-0.04
    ax = figures[-1].axes[0]
    assert ax.get_ylim() == (-10.0, 10.0) and "percentage points" in ax.get_ylabel()
    plots.alpha_sweep([(1.5, WinRate(6, 2, 2, 0)), (1.0, WinRate(3, 4, 3, 0))], "sft", tmp_path / "b.png")
    ax = figures[-1].axes[0]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.0, 40.0])
    low, high = plots.win_minus_lose_interval(WinRate(6, 2, 2, 0))
    # Independently: scores +1 x6, 0 x2, -1 x2 over n = 10; var = E[s^2] - E[s]^2 = 0.8 - 0.16.
    half = 1.96 * ((0.8 - 0.16) / 10) ** 0.5
    assert (low, high) == pytest.approx((0.4 - half, 0.4 + half))
    # Symmetric, wide enough for the widest whisker (89.6 points), in steps of 10.
    assert _has_interval(ax) and ax.get_ylim() == (-100.0, 100.0)


def test_judge_table_names_too_few_matches_as_the_reason(tmp_path):
    from iq_lightning.evaluation.judge_quality import JudgeCheckSpec, JudgeQuality

    spec = JudgeCheckSpec()
    quality = JudgeQuality(judge="j", spec=spec, matches=4, position_a_first=0.5, position_a_second=0.5, position_a=0.5, decided=8,
                           position_log_odds=None, consistency=1.0, controls=40, control_correct=40)
    row = next(line for line in quality.markdown() if line.startswith("| swap consistency"))
    assert row.endswith(f"| **FAIL**: too few to measure (4 < {spec.min_checked}) |")
    assert "100%" in row


def test_reward_curve_of_one_epoch_has_integer_ticks(tmp_path, monkeypatch):
    from iq_lightning.evaluation import plots
    from iq_lightning.evaluation.reward import RewardCurve

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    curve = RewardCurve(epochs=[0, 1], mean=[1.0, 1.3], increment=[0.0, 0.3])
    plots.reward_curve_plot(curve, tmp_path / "r.png")
    ax = figures[-1].axes[0]
    shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert shown and all(float(t).is_integer() for t in shown)


def test_sweep_points_take_alpha_from_the_runs_record_not_hydras_rewritten_config(tmp_path):
    """B7 on the validation side: `python train.py alpha=2.0 hydra.run.dir=<the alpha 1.5 run>`,
    refused, rewrites that run's .hydra/config.yaml, and alpha_sweep_validation.png then drew the
    run at alpha 2 (evaluate.py's sweep already reads run_fingerprint.json)."""
    from iq_lightning.validation_plots import sweep_points

    for i, (trained, hydra_says) in enumerate(((1.0, 1.0), (1.5, 2.0))):
        run = tmp_path / str(i)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(f"alpha: {hydra_says}\n")
        (run / "run_fingerprint.json").write_text(json.dumps({"settings": {"alpha": trained, "beta": 0.1}}))
        _summary(run, [_row(-1), _row(0)])
    legacy = tmp_path / "2"  # a run recorded before the whole config was (alpha at the top level)
    (legacy / ".hydra").mkdir(parents=True)
    (legacy / ".hydra" / "config.yaml").write_text("alpha: 9.0\n")
    (legacy / "run_fingerprint.json").write_text(json.dumps({"alpha": 1.2, "seed": 0}))
    _summary(legacy, [_row(-1), _row(0)])
    assert [(p["alpha"], p["run_dir"][-1]) for p in sweep_points(tmp_path)] == [(1.0, "0"), (1.2, "2"), (1.5, "1")]
