"""Typed evaluation config, built once from Hydra's `conf/evaluate.yaml` and validated."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from iq_lightning.config import (
    DATA_SOURCES,
    PLACEMENTS,
    DataSpec,
    DecodingSpec,
    GuideSpec,
    LoggerSpec,
    ModelSpec,
    SamplerSpec,
    build_spec,
    principle_from_file,
    validate_decoding,
    validate_sampler,
)
from iq_lightning.errors import ConfigError
from iq_lightning.evaluation.endpoint import check_key_variable, is_official, judge_api_key, parse_base_url
from iq_lightning.principle_check import CHECK_KINDS, CheckSpec

JUDGE_BACKENDS = ("likelihood", "openai")
PAIRINGS = ("all", "reference")


@dataclass(frozen=True)
class ContestantSpec:
    """One answer source: a training run's final/, any save_pretrained directory, or (neither)
    the `model` group's model; with `principle` set, the Prompting baseline of that model;
    `decoding`: how its answers are decoded (num_beams > 1: beam search over its likelihood)."""

    name: str
    run_dir: str | None = None
    model_path: str | None = None
    principle: str | None = None
    placement: str = "system"
    alpha: float | None = None  # a sweep run's alpha (Fig. 7)
    decoding: DecodingSpec = DecodingSpec()
    # principle and placement are the guide's (`${guide.principle}`): they follow the principle
    # the contestant runs were trained with (evaluation/settings.py)
    follows_guide: bool = False


@dataclass(frozen=True)
class BeamSweepSpec:
    """r-to-Q*: win rate against the number of beams of one contestant. `contestant` answers
    again with each count of `num_beams` (as contestant <name>@beams=k; the contestant itself
    stands for its own count), and plots/win_rate_vs_beams.png draws each one's win rate against
    the reference."""

    contestant: str | None = None
    num_beams: tuple[int, ...] = (1, 2, 4, 8)


@dataclass(frozen=True)
class JudgeSpec:
    backend: str = "likelihood"
    criteria: str | None = None  # None: helpfulness and harmlessness (judges.HELPFUL_HARMLESS)
    # likelihood: a local model (null: the `model` group's model)
    model_path: str | None = None
    tie_margin: float = 0.1  # likelihood: |log-odds| below this (nats) is a tie (judges.LikelihoodJudge)
    batch_size: int = 4
    balanced: bool = True  # likelihood: average both orders within each match
    # openai: any OpenAI-compatible endpoint
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int = 512
    extra_body: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EloSpec:
    k: float = 16.0
    initial: float = 1000.0
    permutations: int = 1000
    smoothing_sigma: float = 3.0
    bootstrap: int = 1000  # rounds of resampling prompts for the 95% intervals (0: none)
    bootstrap_orderings: int = 20  # orderings averaged within each round


@dataclass(frozen=True)
class JudgeCheckSpec:
    """How the judge is measured, and the bars it must clear (judge_quality's docstring says why these bars)."""

    matches: int = 50  # real matches judged in both orders, one order at a time
    controls: int = 30  # intact answers, each corrupted three ways
    min_words: int = 8  # an answer needs this many words to be corrupted
    max_repetition: float = 0.2  # intact answers must not loop themselves
    min_control_accuracy: float = 0.8
    min_consistency: float = 0.6
    max_position_bias: float = 0.2  # |share of position A - 0.5|, both orders together
    min_checked: int = 10  # fewer comparisons than this: not measured


@dataclass(frozen=True)
class JudgeFreeSpec:
    """Figures of each contestant's answers that need no judge: principle check rate, NLL under
    pi_w (the guide: the base model given the principle), repetition, length."""

    enabled: bool = True
    batch_size: int = 8  # answers per forward pass when scoring the NLL


@dataclass(frozen=True)
class RewardSpec:
    """Fig. 6: a sequence-classification reward model scores each epoch's policy of `run_dir`
    (trained with save_epoch_policies=true) against the initial `model`."""

    model: str | None = None
    run_dir: str | None = None
    baseline_run_dir: str | None = None  # e.g. a PPO run: drawn as a horizontal line
    baseline_model_path: str | None = None
    baseline_label: str = "baseline"
    batch_size: int = 8
    trust_remote_code: bool = False


@dataclass(frozen=True)
class EvalSpec:
    model: ModelSpec
    data: DataSpec
    sampler: SamplerSpec
    guide: GuideSpec
    logger: LoggerSpec
    judge: JudgeSpec
    elo: EloSpec
    reward: RewardSpec
    contestants: tuple[ContestantSpec, ...]
    out_dir: Path
    judge_check: JudgeCheckSpec = JudgeCheckSpec()
    principle_check: CheckSpec = CheckSpec()
    judge_free: JudgeFreeSpec = JudgeFreeSpec()
    reference: str = "sft"
    # a contestant whose results against every other one are plotted (Fig. 2); None: each added
    # contestant (a run_dir or model_path of `contestants`)
    focus: str | None = None
    min_category_count: int = 5  # the radar leaves out categories with fewer judged prompts
    pairs: str = "all"
    sweep_dir: str | None = None
    alpha: float = 1.5
    beta: float = 0.1
    credit_maps: int = 3
    seed: int = 0
    beam_sweep: BeamSweepSpec = BeamSweepSpec()
    # the machine's answer cache, shared with training's validation (validation_cache.py); None: off
    answer_cache_dir: str | None = None
    # keys set on the command line: they win over what the contestant runs were trained with
    explicit: tuple[str, ...] = ()


_TOP = {"reference", "focus", "pairs", "sweep_dir", "alpha", "beta", "credit_maps", "seed", "name", "out_dir", "min_category_count", "answer_cache_dir"}
_GROUPS = {
    "model", "data", "sampler", "guide", "logger", "judge", "elo", "reward", "contestants", "judge_check", "principle_check", "judge_free",
    "beam_sweep",
}


def explicit_keys(overrides: Sequence[str]) -> tuple[str, ...]:
    """The keys a command line sets (`+guide.principle=...` -> guide.principle, `data=local` -> data;
    guide.principle_file=... sets guide.principle)."""
    keys = {text.split("=", 1)[0].lstrip("+~") for text in overrides if "=" in text or text.startswith("~")}
    return tuple(sorted({"guide.principle" if key == "guide.principle_file" else key for key in keys}))


def is_explicit(setting: str, explicit: Sequence[str]) -> bool:
    return any(setting == k or setting.startswith(k + ".") or k.startswith(setting + ".") for k in explicit)


def _contestants(node: Any, raw: Any = None) -> tuple[ContestantSpec, ...]:
    if not isinstance(node, Mapping):
        raise ConfigError(f"contestants must be a mapping of name -> settings, got {node!r}")
    found = []
    for name, settings in node.items():
        if settings is None:  # `~contestants.prompting` or `contestants.prompting=null` removes one
            continue
        if not isinstance(settings, Mapping):
            raise ConfigError(f"contestants.{name} must be a mapping (run_dir, model_path, principle, placement, decoding)")
        unresolved = (raw or {}).get(name) or {}
        follows = isinstance(unresolved, Mapping) and unresolved.get("principle") == "${guide.principle}"
        found.append(build_spec(ContestantSpec, {"name": str(name), **settings, "follows_guide": follows}, f"contestants.{name}"))
    return tuple(found)


def build_eval_spec(cfg: DictConfig | Mapping[str, Any], overrides: Sequence[str] = ()) -> EvalSpec:
    """Hydra config -> validated EvalSpec; ConfigError (one line) on a mistake. `overrides`: the
    command line's (they win over the settings the contestant runs were trained with)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        raw = OmegaConf.to_container(cfg.get("contestants") or {}, resolve=False) if isinstance(cfg, DictConfig) else None
    except Exception as exc:
        raise ConfigError(f"cannot resolve the config: {exc}") from None
    stray = sorted(set(plain) - _TOP - _GROUPS - {"hydra"})
    if stray:
        raise ConfigError(f"unknown top-level key {stray[0]!r} (known: {', '.join(sorted(_TOP | _GROUPS))})")
    judge = dict(plain.get("judge") or {})
    judge["extra_body"] = dict(judge.get("extra_body") or {})
    beam_sweep = dict(plain.get("beam_sweep") or {})
    if isinstance(beam_sweep.get("num_beams"), (list, tuple)):
        beam_sweep["num_beams"] = tuple(beam_sweep["num_beams"])
    try:
        spec = EvalSpec(
            model=build_spec(ModelSpec, plain.get("model"), "model"),
            data=build_spec(DataSpec, plain.get("data"), "data"),
            sampler=validate_sampler(build_spec(SamplerSpec, plain.get("sampler"), "sampler")),
            guide=principle_from_file(build_spec(GuideSpec, plain.get("guide"), "guide")),
            logger=build_spec(LoggerSpec, plain.get("logger"), "logger"),
            judge=build_spec(JudgeSpec, judge, "judge"),
            elo=build_spec(EloSpec, plain.get("elo"), "elo"),
            reward=build_spec(RewardSpec, plain.get("reward"), "reward"),
            contestants=_contestants(plain.get("contestants") or {}, raw),
            out_dir=Path(plain["out_dir"]),
            judge_check=build_spec(JudgeCheckSpec, plain.get("judge_check"), "judge_check"),
            principle_check=build_spec(CheckSpec, plain.get("principle_check"), "principle_check"),
            judge_free=build_spec(JudgeFreeSpec, plain.get("judge_free"), "judge_free"),
            beam_sweep=build_spec(BeamSweepSpec, beam_sweep, "beam_sweep"),
            **{k: plain[k] for k in _TOP - {"name", "out_dir"} if k in plain},
            explicit=explicit_keys(overrides),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config: {exc}") from None
    validate_eval(spec)
    return spec


def validate_eval(spec: EvalSpec) -> None:
    """Mistakes found before any model is loaded."""
    j = spec.judge
    check_key_variable(j.api_key_env)  # whichever backend: a pasted key is refused, not repeated
    if j.base_url is not None:
        parse_base_url(j.base_url)
    if j.backend not in JUDGE_BACKENDS:
        raise ConfigError(f"judge.backend must be one of {', '.join(JUDGE_BACKENDS)}, got {j.backend!r}")
    if j.backend == "openai":
        if not j.model:
            raise ConfigError("judge=openai needs judge.model (the endpoint's model name)")
        if is_official(j.base_url) and j.api_key_env and not os.environ.get(j.api_key_env):
            raise ConfigError(f"judge=openai: set the API key in ${j.api_key_env} (it is read from the environment only)")
        judge_api_key(j.base_url, j.api_key_env, os.environ, warn=False)  # which endpoint may get which key
    if spec.data.source not in DATA_SOURCES:
        raise ConfigError(f"data.source must be one of {', '.join(DATA_SOURCES)}, got {spec.data.source!r}")
    if spec.data.source == "local" and not (spec.data.path and Path(spec.data.path).is_file()):
        raise ConfigError(f"data.path={spec.data.path}: no such file")
    if spec.pairs not in PAIRINGS:
        raise ConfigError(f"pairs must be one of {', '.join(PAIRINGS)}, got {spec.pairs!r}")
    names = [c.name for c in spec.contestants]
    if len(names) + (1 if spec.sweep_dir else 0) < 2 and not spec.reward.model:
        raise ConfigError("need at least two contestants to compare (add one with +contestants.NAME.run_dir=...)")
    if spec.reference not in names and names:
        raise ConfigError(f"reference={spec.reference!r} is not a contestant (contestants: {', '.join(names)})")
    if spec.focus is not None and spec.focus not in names and not spec.sweep_dir:
        raise ConfigError(f"focus={spec.focus!r} is not a contestant (contestants: {', '.join(names)})")
    for c in spec.contestants:
        if c.run_dir and c.model_path:
            raise ConfigError(f"contestants.{c.name}: give run_dir or model_path, not both")
        for key, path in (("run_dir", c.run_dir), ("model_path", c.model_path)):
            if path and not Path(path).is_dir():
                raise ConfigError(f"contestants.{c.name}.{key}={path}: no such directory")
        if c.placement not in PLACEMENTS:
            raise ConfigError(f"contestants.{c.name}.placement must be system or user, got {c.placement!r}")
        validate_decoding(c.decoding, spec.sampler.backend, f"contestants.{c.name}.decoding")
    validate_beam_sweep(spec, names)
    if spec.sweep_dir and not Path(spec.sweep_dir).is_dir():
        raise ConfigError(f"sweep_dir={spec.sweep_dir}: no such directory")
    r = spec.reward
    if r.model and not r.run_dir:
        raise ConfigError("reward.model needs reward.run_dir (a run trained with save_epoch_policies=true)")
    if r.run_dir and not (Path(r.run_dir) / "policies").is_dir():
        raise ConfigError(f"reward.run_dir={r.run_dir} has no policies/ (train it with save_epoch_policies=true)")
    if spec.elo.permutations < 1:
        raise ConfigError(f"elo.permutations must be >= 1, got {spec.elo.permutations}")
    if spec.elo.bootstrap < 0 or spec.elo.bootstrap_orderings < 1:
        raise ConfigError(f"elo.bootstrap must be >= 0 and elo.bootstrap_orderings >= 1, got {spec.elo.bootstrap}, {spec.elo.bootstrap_orderings}")
    if j.tie_margin < 0:
        raise ConfigError(f"judge.tie_margin must be >= 0 (nats), got {j.tie_margin}")
    c = spec.judge_check
    if c.matches < 0 or c.controls < 0 or c.min_checked < 1:
        raise ConfigError("judge_check.matches and judge_check.controls must be >= 0, judge_check.min_checked >= 1")
    for key in ("min_control_accuracy", "min_consistency"):
        if not 0 <= getattr(c, key) <= 1:
            raise ConfigError(f"judge_check.{key} must be in [0, 1], got {getattr(c, key)}")
    if not 0 <= c.max_position_bias <= 0.5:
        raise ConfigError(f"judge_check.max_position_bias must be in [0, 0.5], got {c.max_position_bias}")
    if spec.principle_check.kind not in CHECK_KINDS:
        raise ConfigError(f"principle_check.kind must be one of {', '.join(CHECK_KINDS)}, got {spec.principle_check.kind!r}")
    if spec.min_category_count < 1:
        raise ConfigError(f"min_category_count must be >= 1, got {spec.min_category_count}")
    if spec.judge_free.batch_size < 1:
        raise ConfigError(f"judge_free.batch_size must be >= 1, got {spec.judge_free.batch_size}")


def validate_beam_sweep(spec: EvalSpec, names: list[str]) -> None:
    sweep = spec.beam_sweep
    if sweep.contestant is None:
        return
    if sweep.contestant not in names:
        raise ConfigError(f"beam_sweep.contestant={sweep.contestant!r} is not a contestant (contestants: {', '.join(names)})")
    if sweep.contestant == spec.reference:
        raise ConfigError(f"beam_sweep.contestant={sweep.contestant!r} is the reference its win rates are measured against: set another reference")
    counts = sweep.num_beams
    if not isinstance(counts, tuple) or not counts:
        raise ConfigError(f"beam_sweep.num_beams must be a list of beam counts, e.g. [1,2,4,8], got {counts!r}")
    if len(set(counts)) != len(counts):
        raise ConfigError(f"beam_sweep.num_beams names a count twice: {list(counts)}")
    base = next(c for c in spec.contestants if c.name == sweep.contestant)
    for k in counts:
        validate_decoding(replace(base.decoding, num_beams=k), spec.sampler.backend, "beam_sweep")
