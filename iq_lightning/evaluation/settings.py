"""The settings an evaluation runs with, taken from the contestant runs themselves.

A run trained with "Answer in exactly one sentence." on the user's own prompts at alpha 1.0 must
not be measured against a Prompting baseline given another principle, on other prompts, with the
principle check and credit maps of another run. So the principle (guide.*), the held-out data
(data.source, path, hh_subsets, split), the principle check and each run's alpha and beta come
from the runs' own records (trained.py); a key given on the command line wins and is said to;
runs that disagree on a shared setting are refused in one line naming each run's value, unless
the command line says which to use. Alpha and beta stay per run (a sweep differs in alpha by
design): each run's credit maps use its own; the baselines use the runs' common value, else the
config's. summary.md lists every setting with where it came from (`markdown`)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from iq_lightning.config import DataSpec, ModelSpec, build_spec
from iq_lightning.data import load_prompts
from iq_lightning.errors import ConfigError
from iq_lightning.evaluation.spec import ContestantSpec, EvalSpec, is_explicit
from iq_lightning.evaluation.trained import FINGERPRINT_FILE, TrainedWith, read_trained
from iq_lightning.principle_check import CheckSpec

log = logging.getLogger(__name__)

# Settings every run must share (or the command line choose), as named on the command line.
SHARED = (
    "guide.kind", "guide.principle", "guide.placement", "guide.model",
    "data.source", "data.path", "data.hh_subsets", "data.split",
    "principle_check",
)
PER_RUN = ("alpha", "beta")


@dataclass(frozen=True)
class Origin:
    value: Any
    source: str  # where the value came from, in words


@dataclass
class Settings:
    """The evaluation's spec and contestants with the runs' settings applied."""

    spec: EvalSpec
    contestants: list[ContestantSpec]
    credit: dict[str, tuple[float, float]]  # contestant -> (alpha, beta) of its credit maps
    origins: dict[str, Origin] = field(default_factory=dict)
    unrecorded: list[str] = field(default_factory=list)  # run contestants without a record
    notes: list[str] = field(default_factory=list)  # what the reader must know about the data

    def markdown(self) -> list[str]:
        lines = [
            "## Settings",
            "",
            f"Taken from each contestant run's own record ({FINGERPRINT_FILE}, written when the run started), unless given on "
            "the command line.",
            "",
            "| setting | value | from |",
            "|---|---|---|",
        ]
        for key, origin in self.origins.items():
            lines.append(f"| {key} | {_cell(origin.value)} | {_cell(origin.source)} |")
        for name in self.unrecorded:
            lines.append(f"| ({name}) | no {FINGERPRINT_FILE} | its settings are unknown: the evaluation's own are used |")
        return lines + [""] + [f"> {note}" for note in self.notes] + ([""] if self.notes else [])


def _cell(value: Any) -> str:
    text = "(none)" if value is None else value if isinstance(value, str) else repr(value) if not isinstance(value, (int, float)) else f"{value:g}"
    return text.replace("|", "\\|").replace("\n", " ")


def _current(spec: EvalSpec, key: str) -> Any:
    if key == "principle_check":
        return asdict(spec.principle_check)
    group, leaf = key.split(".")
    value = getattr(getattr(spec, group), leaf)
    if key == "guide.model":
        return None if value is None else asdict(value)
    return list(value) if isinstance(value, tuple) else value


def _apply(spec: EvalSpec, values: dict[str, Any]) -> EvalSpec:
    guide, data, check = {}, {}, spec.principle_check
    for key, value in values.items():
        if key == "principle_check":
            check = CheckSpec(**value)
        elif key == "guide.model":
            guide["model"] = None if value is None else build_spec(ModelSpec, value, "guide.model")
        elif key.startswith("guide."):
            guide[key.split(".")[1]] = value
        else:
            data[key.split(".")[1]] = tuple(value) if key == "data.hh_subsets" else value
    return replace(spec, guide=replace(spec.guide, **guide), data=replace(spec.data, **data), principle_check=check)


def _listing(values: dict[str, Any]) -> str:
    return "; ".join(f"{name}: {_cell(value)}" for name, value in values.items())


def settings_from_runs(spec: EvalSpec, contestants: Sequence[ContestantSpec]) -> Settings:
    """Apply the contestant runs' recorded settings to `spec` (module docstring); ConfigError
    (one line) where the runs disagree and the command line does not choose."""
    trained: dict[str, TrainedWith] = {}
    unrecorded = []
    for c in contestants:
        if c.run_dir:
            record = read_trained(c.run_dir)
            if record is None:
                unrecorded.append(c.name)
                log.warning("%s: %s has no %s, so what it was trained with is unknown; the evaluation's own settings are used", c.name, c.run_dir, FINGERPRINT_FILE)
            else:
                trained[c.name] = record
    runs = ", ".join(trained)
    origins: dict[str, Origin] = {}
    chosen: dict[str, Any] = {}
    for key in SHARED:
        mine = _current(spec, key)
        recorded = {name: t.settings[key] for name, t in trained.items() if key in t.settings}
        distinct = {repr(v) for v in recorded.values()}
        if is_explicit(key, spec.explicit):
            differ = {n: v for n, v in recorded.items() if v != mine}
            source = "command line" + (f" (the runs were trained with {_listing(differ)})" if differ else "")
            if differ:
                log.warning("%s=%s from the command line, while the runs were trained with %s", key, _cell(mine), _listing(differ))
            origins[key] = Origin(mine, source)
        elif not recorded:
            origins[key] = Origin(mine, "the evaluation's config (no contestant run records it)")
        elif len(distinct) > 1:
            raise ConfigError(
                f"the contestant runs were trained with different {key} ({_listing(recorded)}); "
                f"say which to evaluate with on the command line ({key}=...)"
            )
        else:
            value = next(iter(recorded.values()))
            chosen[key] = value
            origins[key] = Origin(value, f"the runs ({', '.join(recorded)})")
    resolved = _apply(spec, chosen)
    if resolved.data.source == "local" and not (resolved.data.path and Path(resolved.data.path).is_file()):
        raise ConfigError(f"data.path={resolved.data.path} (from {origins['data.path'].source}): no such file here; give data.path=...")

    credit: dict[str, tuple[float, float]] = {}
    for key in PER_RUN:
        mine = getattr(spec, key)
        recorded = {name: getattr(t, key) for name, t in trained.items()}
        if is_explicit(key, spec.explicit):
            common, shown, source = mine, mine, "command line, for every contestant"
        elif len(set(recorded.values())) == 1:
            common = shown = next(iter(recorded.values()))
            source = f"the runs ({runs})"
        elif recorded:
            common, shown = mine, _listing({**recorded, "the others": mine})
            source = "each run's own record; the others: the evaluation's config"
        else:
            common = shown = mine
            source = "the evaluation's config (no contestant run records it)"
        resolved = replace(resolved, **{key: common})
        origins[f"{key} (credit maps)"] = Origin(shown, source)
    for c in contestants:
        t = trained.get(c.name)
        use_runs = t is not None
        credit[c.name] = (
            t.alpha if use_runs and not is_explicit("alpha", spec.explicit) else resolved.alpha,
            t.beta if use_runs and not is_explicit("beta", spec.explicit) else resolved.beta,
        )

    notes = [note] if (note := _trained_on(resolved.data, trained)) else []
    if notes:
        log.warning(notes[0])

    # The Prompting baseline follows the guide's principle unless it was given its own.
    following = [
        replace(c, principle=resolved.guide.principle, placement=resolved.guide.placement) if c.follows_guide else c for c in contestants
    ]
    return Settings(resolved, following, credit, origins, unrecorded, notes)


def _trained_on(data: DataSpec, trained: dict[str, TrainedWith]) -> str | None:
    """A note when evaluation prompts of a local file are among the prompts a run trained on: a
    file without a split column gives its every row to each split (the run held out only
    `val.prompts` of them for its validation)."""
    if data.source != "local":
        return None
    evaluated = {p.id for p in load_prompts(replace(data, limit=None))[0]}
    for name, t in trained.items():
        same_file = (t.settings.get("data.source"), t.settings.get("data.path")) == ("local", data.path)
        if not same_file or t.train_split == data.split:
            continue
        shared = evaluated & {p.id for p in load_prompts(replace(data, split=t.train_split, limit=None))[0]}
        if shared:
            which = f"split {t.train_split!r}" if t.train_split else "all rows"
            return (
                f"{len(shared)} of the {len(evaluated)} evaluation prompts (split {data.split!r}) are among those {name} trained on "
                f"({which} of {data.path}, which keeps no split apart): these results are on training prompts; give the file a "
                "split column (train/test) and train with data.split=train"
            )
    return None
