"""Judge-free figures of every contestant, beside the judge's: the share of answers passing the
principle check (with its 95% Wilson interval), the mean NLL per token of the answers under
pi_w (the guide: the base model given the principle, or the aligned model), repetition and
length. The same functions as training's validation (`principle_check`, `text_quality`).

NLLs are cached in out_dir/judge_free/ per contestant answer set and scoring model, so a rerun
loads no model."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from iq_lightning.analysis import safe_filename
from iq_lightning.data import encode_prompt
from iq_lightning.validation_cache import weights_identity
from iq_lightning.files import write_text_atomic
from iq_lightning.evaluation.ratings import wilson_interval
from iq_lightning.evaluation.spec import EvalSpec
from iq_lightning.guides import with_principle
from iq_lightning.principle_check import PrincipleCheck
from iq_lightning.text_quality import answer_nll_under, repetition, word_length

log = logging.getLogger(__name__)

FIELDS = ["contestant", "answers", "check", "passed", "principle_rate", "rate_low", "rate_high", "nll_pi_w", "repetition", "words", "empty"]


@dataclass(frozen=True)
class JudgeFreeFigures:
    contestant: str
    answers: int
    check: str  # the principle check's name
    passed: int | None  # answers passing it; None when nothing is checked
    nll_pi_w: float | None  # mean over answers of their mean NLL per token under pi_w (nats)
    repetition: float  # mean share of repeated word 3-grams
    words: float  # mean length in words
    empty: int  # answers without a word

    @property
    def principle_rate(self) -> float | None:
        return None if self.passed is None or not self.answers else self.passed / self.answers

    @property
    def rate_interval(self) -> tuple[float, float] | None:
        return None if self.passed is None else wilson_interval(self.passed, self.answers)

    def row(self) -> dict:
        interval = self.rate_interval or (None, None)

        def r(x: float | None, digits: int = 4):
            return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)

        return {
            "contestant": self.contestant, "answers": self.answers, "check": self.check, "passed": self.passed,
            "principle_rate": r(self.principle_rate), "rate_low": r(interval[0]), "rate_high": r(interval[1]),
            "nll_pi_w": r(self.nll_pi_w), "repetition": r(self.repetition), "words": r(self.words, 2), "empty": self.empty,
        }


def figures_for(name: str, texts: Sequence[str], check: PrincipleCheck, nlls: Sequence[float] | None = None) -> JudgeFreeFigures:
    """The figures of one contestant's answers (pure)."""
    results = [check(t) for t in texts]
    passed = None if any(r is None for r in results) else sum(bool(r) for r in results)
    known = [x for x in (nlls or []) if x is not None and not math.isnan(x)]
    return JudgeFreeFigures(
        contestant=name, answers=len(texts), check=check.name, passed=passed,
        nll_pi_w=float(np.mean(known)) if known else None,
        repetition=float(np.mean([repetition(t) for t in texts])) if texts else float("nan"),
        words=float(np.mean([word_length(t) for t in texts])) if texts else float("nan"),
        empty=sum(word_length(t) == 0 for t in texts),
    )


def scorer_description(spec: EvalSpec) -> str:
    g = spec.guide
    if g.kind == "aligned_model" and g.model is not None:
        return f"{g.model.name_or_path} (aligned guide), plain prompt"
    return f"{spec.model.name_or_path} given the principle ({g.placement}): {g.principle!r}"


def _scorer_key(spec: EvalSpec) -> str:
    g = spec.guide
    aligned = g.kind == "aligned_model" and g.model is not None
    decided_by = {
        **weights_identity(g.model if aligned else spec.model),
        "principle": None if aligned else g.principle,
        "placement": None if aligned else g.placement,
    }
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _read_cache(path) -> dict | None:
    """A cached NLL file, or None when there is none or it cannot be read (an older version wrote
    it in place, so a kill could leave half of one): then it is scored again."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: unreadable (an interrupted write?); scoring those answers again", path)
        return None


def answer_nlls(
    spec: EvalSpec, rows_by_name: Mapping[str, Mapping[str, dict]], keys: Mapping[str, str], show_progress: bool = True
) -> dict[str, dict[str, float]]:
    """contestant -> prompt id -> mean NLL per token of its answer under pi_w; loads the scoring
    model only when some contestant's answers are not in the cache."""
    from iq_lightning.models import load_model

    scorer = _scorer_key(spec)
    paths = {n: spec.out_dir / "judge_free" / f"nll-{safe_filename(n)}-{keys[n]}-{scorer}.json" for n in rows_by_name}
    found = {n: cached for n, p in paths.items() if (cached := _read_cache(p)) is not None}
    missing = [n for n in rows_by_name if n not in found]
    if not missing:
        return found
    g = spec.guide
    aligned = g.kind == "aligned_model" and g.model is not None
    model, tokenizer = load_model(g.model if aligned else spec.model)
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    for name in missing:
        rows = list(rows_by_name[name].values())
        prompts = []
        for r in rows:
            messages = r["messages"] if aligned or not g.principle else with_principle(r["messages"], g.principle, g.placement)
            prompts.append(encode_prompt(tokenizer, messages))
        responses = [list(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows]
        values = answer_nll_under(model, tokenizer, prompts, responses, spec.judge_free.batch_size)
        found[name] = {r["id"]: v for r, v in zip(rows, values)}
        write_text_atomic(paths[name], json.dumps(found[name]))
        log.info("%s: NLL under pi_w scored for %d answers", name, len(rows))
    del model
    return found


def judge_free_figures(
    spec: EvalSpec, rows_by_name: Mapping[str, Mapping[str, dict]], keys: Mapping[str, str], check: PrincipleCheck, show_progress: bool = True
) -> list[JudgeFreeFigures]:
    nlls = answer_nlls(spec, rows_by_name, keys, show_progress)
    figures = []
    for name, rows in rows_by_name.items():
        texts = [r["response"] for r in rows.values()]
        figures.append(figures_for(name, texts, check, [nlls[name].get(pid) for pid in rows]))
    return figures


def markdown(figures: Sequence[JudgeFreeFigures], check: PrincipleCheck, scorer: str) -> list[str]:
    """The judge-free table of summary.md."""
    lines = [
        "## Judge-free figures",
        "",
        f"Principle check: `{check.name}`. NLL: mean negative log-likelihood per token of the answers under pi_w = {scorer} "
        "(lower: closer to what the guide would write). Repetition: mean share of repeated word 3-grams (0: none, "
        "a looped phrase approaches 1). Length: mean words per answer.",
        "",
        "| contestant | principle check | 95% CI | NLL under pi_w | repetition | words | empty | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        rate = "n/a" if f.principle_rate is None else f"{f.passed}/{f.answers} ({f.principle_rate:.0%})"
        ci = "" if f.rate_interval is None else f"{f.rate_interval[0]:.0%}-{f.rate_interval[1]:.0%}"
        nll = "n/a" if f.nll_pi_w is None else f"{f.nll_pi_w:.3f}"
        lines.append(f"| {f.contestant} | {rate} | {ci} | {nll} | {f.repetition:.3f} | {f.words:.1f} | {f.empty} | {f.answers} |")
    return lines + [""]
