"""The evaluation recipe (evaluate.py): answers -> pairwise verdicts -> win rates, Elo, plots;
optionally reward-model curves over a run's epochs and token-credit maps of the answers.

Reads top to bottom; every step writes into `out_dir` so nothing is recomputed on a rerun:
  generations/  answers per contestant (cached)     judgments.jsonl  raw verdicts (cached)
  judge_checks.jsonl  the judge's control and both-order verdicts (cached)
  judge_free/   NLLs under pi_w (cached)            results/  CSV tables, summary.md
  plots/        PNG figures                         credit/   token-credit HTML maps

The judge is measured before its verdicts are used (judge_quality): a judge below the bars of
`judge_check` is named UNRELIABLE at the top of summary.md, in W&B and on every judge plot.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from iq_lightning.analysis import credit_html, safe_filename
from iq_lightning.callbacks import POLICY_DIR
from iq_lightning.data import EncodedPrompt, Prompt, encode_prompt
from iq_lightning.tracking import eval_init_kwargs, eval_metrics
from iq_lightning.errors import ConfigError
from iq_lightning.evaluation import judge_free, plots
from iq_lightning.evaluation.answers import answers, beam_sweep_contestants, sweep_contestants
from iq_lightning.evaluation.endpoint import judge_api_key, official_identity, use_proxy
from iq_lightning.files import write_text_atomic
from iq_lightning.guides import build_guide
from iq_lightning.evaluation.judge_quality import JudgeQuality, control_set, measure_judge, sample_matches, tie_share
from iq_lightning.evaluation.judges import HELPFUL_HARMLESS, Judge, LikelihoodJudge, OpenAIJudge
from iq_lightning.evaluation.matches import Judgment, judge_pairings, pairings, write_judgments
from iq_lightning.evaluation.ratings import (
    EloIntervals,
    WinRate,
    bootstrap_elo,
    elo_ratings,
    flip,
    matches_from_verdicts,
    per_category,
    win_rates,
)
from iq_lightning.evaluation.report import ELO_FIELDS, RATE_FIELDS, elo_rows, log_to_wandb, markdown_summary, rate_row, write_csv
from iq_lightning.evaluation.reward import RewardCurve, RewardModel, reward_curve
from iq_lightning.evaluation.lock import exclusive
from iq_lightning.evaluation.settings import settings_from_runs
from iq_lightning.evaluation.spec import ContestantSpec, EvalSpec
from iq_lightning.models import load_model
from iq_lightning.principle_check import build_check

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    out_dir: Path
    judgments: list[Judgment]
    rates: dict[tuple[str, str], WinRate]
    elo: object | None
    reward_increments: dict[int, float] | None
    files: list[Path] = field(default_factory=list)
    judge_quality: JudgeQuality | None = None
    elo_intervals: EloIntervals | None = None
    judge_free: list = field(default_factory=list)  # JudgeFreeFigures per contestant


def build_judge(spec: EvalSpec) -> Judge:
    j = spec.judge
    criteria = j.criteria or HELPFUL_HARMLESS
    if j.backend == "openai":
        key = judge_api_key(j.base_url, j.api_key_env, os.environ)
        return OpenAIJudge(
            j.model, j.base_url, key, criteria, j.temperature, j.max_tokens, j.extra_body,
            **official_identity(j.base_url, os.environ), proxy=use_proxy(j.base_url, key is not None),
        )
    from iq_lightning.generation import model_spec_for

    model_spec = model_spec_for(None, j.model_path, spec.model)

    def load():
        model, tokenizer = load_model(model_spec)
        return (model.to("cuda") if torch.cuda.is_available() else model), tokenizer

    return LikelihoodJudge(load, model_spec.name_or_path, criteria, j.tie_margin, j.batch_size, j.balanced)


def against(rates: dict[tuple[str, str], WinRate], name: str, reference: str) -> WinRate | None:
    """`name`'s record against `reference`, whichever way round the pair was judged."""
    if (name, reference) in rates:
        return rates[(name, reference)]
    if (reference, name) in rates:
        return flip(rates[(reference, name)])
    return None


def credit_maps(spec: EvalSpec, rows_by_name: dict[str, dict[str, dict]], credit: dict[str, tuple[float, float]], show_progress: bool) -> list[Path]:
    """Token-credit maps of the first `credit_maps` answers of each contestant, scored by the
    configured guides over the `model` group's model (pi_l = pi_ref = that model), at the alpha
    and beta of `credit` (a run's own: settings.py)."""
    if spec.credit_maps <= 0:
        return []
    model, tokenizer = load_model(spec.model)
    if torch.cuda.is_available():
        model.to("cuda")
    guides: dict[float, object] = {}
    written = []
    for name, rows in rows_by_name.items():
        alpha, beta = credit.get(name, (spec.alpha, spec.beta))
        if alpha not in guides:
            guides[alpha] = build_guide(spec.guide, alpha, model, tokenizer, show_progress=False, policy_name=spec.model.name_or_path)
        guide = guides[alpha]
        chosen = list(rows.values())[: spec.credit_maps]
        prompts = [EncodedPrompt(Prompt(r["id"], tuple(r["messages"]), r.get("category")), tuple(encode_prompt(tokenizer, r["messages"]))) for r in chosen]
        responses = [list(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) or [tokenizer.eos_token_id] for r in chosen]
        scores = guide.score(prompts, responses, desc=f"credit {name}")
        for i, (r, ids, s) in enumerate(zip(chosen, responses, scores)):
            page = credit_html(tokenizer, ids, s.target_logprobs, s.ref_logprobs, r["messages"][-1]["content"], f"{name}, {r['id']}", beta)
            path = spec.out_dir / "credit" / safe_filename(name) / f"{i:02d}.html"
            written.append(write_text_atomic(path, page))
    return written


def reward_increments(spec: EvalSpec, show_progress: bool) -> tuple[RewardCurve, float | None]:
    """Fig. 6: per epoch (mean reward - initial mean) / initial std, and the baseline's value."""
    r = spec.reward
    policies = sorted(p for p in (Path(r.run_dir) / POLICY_DIR).iterdir() if p.is_dir())
    if not policies:
        raise ConfigError(f"reward.run_dir={r.run_dir}: policies/ is empty")
    # Epoch 0 is the initial model (the `model` group); policies/epoch_000 is the policy after it.
    sources = {0: ContestantSpec("initial")}
    for p in policies:
        epoch = int(p.name.removeprefix("epoch_")) + 1
        sources[epoch] = ContestantSpec(f"epoch_{epoch}", model_path=str(p / "merged" if (p / "merged").is_dir() else p))
    if r.baseline_run_dir or r.baseline_model_path:
        sources[-1] = ContestantSpec(r.baseline_label, run_dir=r.baseline_run_dir, model_path=r.baseline_model_path)
    rows = {e: answers(spec, c, show_progress)[1] for e, c in sources.items()}
    model = RewardModel(r.model, r.batch_size, r.trust_remote_code)
    scores = {e: model.score([(tuple(x["messages"]), x["response"]) for x in rs.values()], desc=f"reward {sources[e].name}") for e, rs in rows.items()}
    baseline_scores = scores.pop(-1, None)
    curve = reward_curve(scores)
    baseline = None
    if baseline_scores is not None:
        baseline = reward_curve({0: scores[0], 1: baseline_scores}).increment[1]
    return curve, baseline


def added_contestants(spec: EvalSpec) -> list[str]:
    """The contestants a user added (a run_dir or model_path), as opposed to the baselines made
    from the `model` group's model (sft, prompting); sweep runs have their own plot."""
    return [c.name for c in spec.contestants if c.run_dir or c.model_path]


def mean_tokens(rows: dict[str, dict]) -> float:
    """Mean answer length in tokens of one contestant's answer rows (NaN for none)."""
    lengths = [r["num_tokens"] for r in rows.values() if "num_tokens" in r]
    return sum(lengths) / len(lengths) if lengths else float("nan")


def _planned_matches(names: list[str], spec: EvalSpec, rows: dict[str, dict[str, dict]]) -> list[tuple[str, str, str]]:
    return [(a, b, pid) for a, b in pairings(names, spec.reference, spec.pairs) for pid in rows[a] if pid in rows[b]]


def evaluate(spec: EvalSpec, show_progress: bool = True) -> EvalResult:
    """The whole evaluation, holding out_dir's lock (one evaluation per out_dir at a time)."""
    with exclusive(spec.out_dir, "evaluation"):
        return _evaluate(spec, show_progress)


def _evaluate(spec: EvalSpec, show_progress: bool) -> EvalResult:
    out = spec.out_dir
    contestants = list(spec.contestants) + (sweep_contestants(spec.sweep_dir) if spec.sweep_dir else [])
    beam_sweep = beam_sweep_contestants(spec)
    contestants += [c for c in beam_sweep if c not in spec.contestants]
    names = [c.name for c in contestants]
    if len(set(names)) != len(names):
        raise ConfigError(f"contestant names must be unique, got {names}")
    settings = settings_from_runs(spec, contestants)  # the principle, data, check, alpha, beta the runs trained with
    spec, contestants = settings.spec, settings.contestants
    for key, origin in settings.origins.items():
        log.info("%s = %s (%s)", key, origin.value, origin.source)
    files: list[Path] = []

    # 1. answers (cached per contestant)
    log.info("[1/4] answers of %d contestants: %s", len(contestants), ", ".join(names))
    keys, rows = {}, {}
    for c in contestants:
        keys[c.name], rows[c.name] = answers(spec, c, show_progress)

    # 2. judge-free figures: principle check, NLL under pi_w, repetition, length
    check = build_check(spec.principle_check, spec.guide.principle if spec.guide.kind == "principle" else None)
    free = []
    if spec.judge_free.enabled:
        log.info("[2/4] judge-free figures (%s check, NLL under pi_w, repetition, length) of %d answer sets", check.name, len(rows))
        free = judge_free.judge_free_figures(spec, rows, keys, check, show_progress)
        files.append(write_csv(out / "results" / "judge_free.csv", judge_free.FIELDS, [f.row() for f in free]))
        files.append(plots.judge_free_panels(free, out / "plots" / "judge_free.png", check.name))
    free_block = judge_free.markdown(free, check, judge_free.scorer_description(spec)) if free else []

    # 3. the judge, measured before use, then the verdicts (cached per judge, answer set, prompt and shown order)
    judgments: list[Judgment] = []
    rates: dict[tuple[str, str], WinRate] = {}
    elo = intervals = quality = None
    judge_block: list[str] = []
    if len(contestants) >= 2:
        judge = build_judge(spec)
        bars = spec.judge_check
        log.info("[3/4] measuring the judge %s: %d position-bias matches, %d corrupted-answer controls", type(judge).__name__, bars.matches, bars.controls)
        quality = measure_judge(
            judge,
            sample_matches(_planned_matches(names, spec, rows), rows, bars.matches, spec.seed),
            control_set(rows, bars.controls, bars.min_words, bars.max_repetition, spec.seed),
            bars, spec.seed, out / "judge_checks.jsonl", show_progress,
        )
        note, warn = quality.note(), not quality.reliable
        if warn:
            log.warning("UNRELIABLE JUDGE %s: %s", quality.judge, "; ".join(quality.problems))
        log.info("[4/4] judging %d pairings", len(pairings(names, spec.reference, spec.pairs)))
        judgments = judge_pairings(judge, pairings(names, spec.reference, spec.pairs), rows, keys, spec.seed, out / "judgments.jsonl", show_progress)
        del judge
        write_judgments(judgments, out / "results" / "verdicts.jsonl")
        verdicts = [(j.a, j.b, j.verdict) for j in judgments]
        rates = win_rates(verdicts)
        invalid = sum(r.invalid for r in rates.values())
        if invalid:
            log.warning("%d of %d verdicts could not be parsed; they are counted as invalid and left out of the rates", invalid, len(judgments))
        ties = tie_share([j.log_odds for j in judgments], spec.judge.tie_margin) if spec.judge.backend == "likelihood" else None
        judge_block = quality.markdown(spec.judge.criteria or "helpfulness and harmlessness (the paper's default)", spec.judge.tie_margin, ties)
        files.append(write_csv(out / "results" / "judge_quality.csv", ["metric", "value"], [{"metric": k, "value": v} for k, v in quality.metrics().items()]))

        # 4. tables and plots
        files.append(write_csv(out / "results" / "win_rates.csv", RATE_FIELDS, [rate_row(a, b, r) for (a, b), r in rates.items()]))
        versus = {n: against(rates, n, spec.reference) for n in names if n != spec.reference}
        versus = {n: r for n, r in versus.items() if r is not None and r.valid}
        if versus:
            files.append(plots.win_rate_bars(versus, f"% of judged prompts against {spec.reference}", out / "plots" / "win_rates.png", note, warn))
        # Fig. 2: the method against every baseline; by default each added contestant
        for focus in [spec.focus] if spec.focus else added_contestants(spec):
            of_focus = {f"vs {n}": r for n in names if n != focus and (r := against(rates, focus, n)) is not None and r.valid}
            if of_focus:
                files.append(plots.win_rate_bars(of_focus, f"% of {focus}'s judged prompts", out / "plots" / f"win_rates_{safe_filename(focus)}.png", note, warn))
        by_category = per_category((j.category or "all", j.a, j.b, j.verdict) for j in judgments)
        prompts_per_category: dict[str, set] = {}
        for j in judgments:
            prompts_per_category.setdefault(j.category or "all", set()).add(j.prompt_id)
        counts = {cat: len(ids) for cat, ids in prompts_per_category.items()}
        category_rows, radar = [], {}
        for category, cat_rates in by_category.items():
            for (a, b), r in cat_rates.items():
                category_rows.append({"category": category, "prompts": counts[category], **rate_row(a, b, r)})
            radar[category] = {n: r.win_rate for n in names if (r := against(cat_rates, n, spec.reference)) is not None and r.valid}
        files.append(write_csv(out / "results" / "win_rates_by_category.csv", ["category", "prompts", *RATE_FIELDS], category_rows))
        radar_png = plots.category_radar(radar, counts, spec.reference, out / "plots" / "category_radar.png", spec.min_category_count, note, warn)
        if radar_png is not None:
            files.append(radar_png)
        else:
            log.info("no category radar: fewer than 3 categories with %d+ judged prompts (min_category_count); per-category rates are in results/", spec.min_category_count)
        matches = matches_from_verdicts(verdicts)
        if matches:
            e = spec.elo
            elo = elo_ratings(matches, e.k, e.initial, e.permutations, spec.seed)
            if e.bootstrap:
                by_prompt: dict[str, list] = {}
                for j in judgments:
                    by_prompt.setdefault(j.prompt_id, []).extend(matches_from_verdicts([(j.a, j.b, j.verdict)]))
                intervals = bootstrap_elo(by_prompt, e.k, e.initial, e.bootstrap, e.bootstrap_orderings, spec.seed)
            files.append(write_csv(out / "results" / "elo.csv", ELO_FIELDS, elo_rows(elo, intervals)))
            files.append(plots.elo_curve(elo, e.smoothing_sigma, out / "plots" / "elo_curve.png", intervals, note, warn))
        sweep = [(c.alpha, r) for c in contestants if c.alpha is not None and (r := versus.get(c.name)) is not None]
        if sweep:
            files.append(plots.alpha_sweep(sweep, spec.reference, out / "plots" / "alpha_sweep.png", note, warn))
        # r-to-Q*: one policy's win rate against the number of beams it searches its likelihood with
        beams = [(c.decoding.num_beams, c.name, r, mean_tokens(rows[c.name])) for c in beam_sweep if (r := versus.get(c.name)) is not None]
        if beams:
            table = [{"num_beams": k, "mean_tokens": round(length, 2), **rate_row(name, spec.reference, r)} for k, name, r, length in beams]
            files.append(write_csv(out / "results" / "beam_sweep.csv", ["num_beams", "mean_tokens", *RATE_FIELDS], table))
            points = [(k, r, length) for k, _, r, length in beams]
            plot = out / "plots" / "win_rate_vs_beams.png"
            files.append(plots.win_rate_vs_beams(points, spec.beam_sweep.contestant, spec.reference, plot, note, warn))

    # 5. reward-model curve over a run's epochs
    increments = None
    if spec.reward.model:
        curve, baseline = reward_increments(spec, show_progress)
        increments = dict(zip(curve.epochs, curve.increment))
        files.append(write_csv(out / "results" / "reward_curve.csv", ["epoch", "increment"], [{"epoch": k, "increment": round(v, 4)} for k, v in increments.items()]))
        files.append(plots.reward_curve_plot(curve, out / "plots" / "reward_curve.png", baseline, spec.reward.baseline_label))

    # 6. token-credit maps of the answers
    credit_pages = credit_maps(spec, rows, settings.credit, show_progress)
    files.extend(credit_pages)

    unreliable = quality is not None and not quality.reliable
    summary = markdown_summary(rates, elo, increments, judge_block, free_block, intervals, unreliable, settings.markdown())
    write_text_atomic(out / "results" / "summary.md", summary)
    log.info("evaluation written to %s\n%s", out, summary)
    log_to_wandb(
        spec.logger, out, judgments, rows, [rate_row(a, b, r) for (a, b), r in rates.items()], elo,
        [f for f in files if f.suffix == ".png"], credit_pages,
        elo_table=elo_rows(elo, intervals) if elo is not None else (),
        judge_metrics=quality.metrics() if quality is not None else None,
        judge_problems=quality.problems if quality is not None else (),
        judge_free_rows=[f.row() for f in free],
        init_kwargs=eval_init_kwargs(spec, contestants),
        metrics=eval_metrics(
            [rate_row(a, b, r) for (a, b), r in rates.items()],
            elo_rows(elo, intervals) if elo is not None else (),
            quality.metrics() if quality is not None else None,
            reference=spec.reference,
        ),
    )
    return EvalResult(out, judgments, rates, elo, increments, files, quality, intervals, free)
