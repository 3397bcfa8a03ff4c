"""Reading a run directory back: per-epoch metrics, rollouts, and token-credit heat maps
(paper Fig. 8) as self-contained HTML."""

from __future__ import annotations

import csv
import hashlib
import html
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from transformers import PreTrainedTokenizerBase

from iq_lightning.files import run_config_path
from iq_lightning.objective import token_credit
from iq_lightning.rollouts import Rollout, read_rollouts


# File systems limit a name to 255 bytes (ext4, APFS, NTFS's 255 UTF-16 units); callers add a
# prefix and a suffix of their own, so names made here stay well below.
MAX_NAME_BYTES = 120


def safe_filename(name: str) -> str:
    """An id or contestant name as a file name: anything but letters, digits and -_.= becomes
    '_'; a name over MAX_NAME_BYTES (UTF-8) keeps its head and ends in a hash of the whole name,
    so long ids stay apart; '.' and '..' never name a directory."""
    safe = "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in name)
    if safe.strip(".") == "":
        safe = safe.replace(".", "_") or "_"
    if len(safe.encode("utf-8")) <= MAX_NAME_BYTES:
        return safe
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]
    head = safe.encode("utf-8")[: MAX_NAME_BYTES - len(digest) - 1].decode("utf-8", "ignore")
    return f"{head}-{digest}"


def epoch_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """One row per epoch from metrics/metrics.csv (the epoch-level figures only)."""
    rows = []
    with open(Path(run_dir) / "metrics" / "metrics.csv", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("train/loss_epoch"):
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def rollouts(run_dir: str | Path) -> list[Rollout]:
    """Every stored rollout of a run, all epochs and ranks, in epoch order."""
    found = []
    for path in sorted((Path(run_dir) / "rollouts").glob("epoch_*.jsonl")):
        found.extend(read_rollouts(path))
    return found


CREDIT_QUANTILE = 0.98
SCALE_FILE = "scale.json"  # credit/scale.json: a training run's one colour scale
_GREEN, _RED = "40,160,60", "210,50,50"


def credit_scale(credits: Iterable[float], quantile: float = CREDIT_QUANTILE) -> float:
    """One symmetric colour scale for a set of token credits: the `quantile` of |credit| (so one
    outlier does not wash out every other token), rounded up to two significant digits."""
    values = sorted(abs(float(c)) for c in credits if c == c)
    if not values:
        return 1.0
    top = values[min(len(values) - 1, int(quantile * len(values)))] or values[-1] or 1.0
    digits = 1 - math.floor(math.log10(top))
    return math.ceil(top * 10**digits) / 10**digits


def rollout_credits(rollouts: Iterable[Rollout], beta: float) -> list[float]:
    """Every token credit beta * (log pi_hat - log pi_ref) of the given rollouts."""
    return [beta * (t - r) for x in rollouts for t, r in zip(x.target_logprobs, x.ref_logprobs)]


def _colour(c: float, scale: float) -> str:
    strength = min(abs(c) / scale, 1.0) * 0.85
    return f"rgba({_GREEN if c >= 0 else _RED},{strength:.2f})"


def _decimals(scale: float) -> int:
    """Decimals that show a token's credit to within a few percent of the scale."""
    return max(2, 1 - math.floor(math.log10(scale))) if scale > 0 else 2


def _legend(scale: float, note: str) -> str:
    d = _decimals(scale)
    ticks = "".join(
        f"<span style='position:absolute; left:{100 * (v + scale) / (2 * scale):.0f}%; transform:translateX(-50%)'>"
        f"{'0' if v == 0 else f'{v:+.{d + 1}g}'}</span>"
        for v in (-scale, -scale / 2, 0.0, scale / 2, scale)
    )
    bar = (
        f"linear-gradient(to right, rgba({_RED},0.85), rgba({_RED},0) 50%, rgba({_GREEN},0) 50%, rgba({_GREEN},0.85))"
    )
    return (
        "<div class='legend'>"
        f"<div style='height:14px; border:1px solid #999; background:{bar}'></div>"
        f"<div style='position:relative; height:1.3em; font-size:80%'>{ticks}</div>"
        f"<div style='font-size:80%; color:#444'>{html.escape(note)}</div></div>"
    )


def credit_html(
    tokenizer: PreTrainedTokenizerBase,
    response_ids: Sequence[int],
    target_logprobs: Sequence[float],
    ref_logprobs: Sequence[float],
    prompt: str,
    heading: str,
    beta: float = 1.0,
    alpha: float | None = None,
    scale: float | None = None,
    scale_note: str | None = None,
) -> str:
    """Paper Fig. 8: the response's tokens coloured by credit_t = beta * (log pi_hat - log pi_ref),
    green where the estimated better policy favours the token over the reference, red where it
    disfavours it. A self-contained HTML page: alpha and beta in its header, a legend of the
    colour scale, and each token's value printed under it (and on hover).

    `scale`: the |credit| drawn at full colour, the same for every page to be compared (a training
    run passes its one scale, see CreditMaps); None scales this page alone, and says so."""
    import torch

    credit = token_credit(torch.tensor(list(target_logprobs)), torch.tensor(list(ref_logprobs)), beta).tolist()
    if scale is None:
        scale = credit_scale(credit)
        scale_note = scale_note or f"colour scale ±{scale:g}: this page's own ({CREDIT_QUANTILE:.0%} of |credit|); other pages differ"
    note = scale_note or f"colour scale ±{scale:g}"
    note += "; beyond it the colour saturates"
    boxes, d = [], _decimals(scale)
    for token_id, c in zip(response_ids, credit):
        text = tokenizer.decode([token_id])
        newline = "\n" in text
        shown = html.escape(text.replace("\n", "\u21b5")) or "&nbsp;"
        boxes.append(
            f'<span title="{c:+.3f}" class="tok" style="background: {_colour(c, scale)}">'
            f"<span class='t'>{shown}</span><span class='v'>{c:+.{d}f}</span></span>" + ("<br>" if newline else "")
        )
    total = sum(credit)
    settings = f"alpha = {alpha:g}, beta = {beta:g}" if alpha is not None else f"beta = {beta:g}"
    style = (
        "body{font-family:sans-serif; max-width:60em; margin:1em}"
        ".tok{display:inline-block; margin:1px 0; padding:1px 1px; text-align:center; vertical-align:top; border-radius:2px}"
        ".tok .t{display:block; white-space:pre; font-size:105%}"
        ".tok .v{display:block; font-family:monospace; font-size:62%; color:#333}"
        ".legend{width:26em; margin:0.3em 1.5em 0.8em}"
    )
    return (
        "<!doctype html><meta charset='utf-8'><title>token credit</title>"
        f"<style>{style}</style><body>"
        f"<p><b>Token credit</b> ({html.escape(heading)}): {settings}; "
        "credit<sub>t</sub> = beta &middot; (log &pi;&#770;(y<sub>t</sub>) &minus; log &pi;<sub>ref</sub>(y<sub>t</sub>)), "
        f"&pi;&#770; &prop; &pi;<sub>w</sub><sup>alpha</sup> &pi;<sub>l</sub><sup>1&minus;alpha</sup></p>"
        f"{_legend(scale, note)}"
        f"<p><b>Prompt</b>: {html.escape(prompt)}</p>"
        f"<p><b>Response</b> ({len(credit)} tokens; credit sum {total:+.3f}, mean {total / max(len(credit), 1):+.3f}), "
        "each token's credit under it:</p>"
        f"<div style='line-height:1.1'>{''.join(boxes)}</div></body>"
    )


def rollout_credit_html(
    rollout: Rollout,
    tokenizer: PreTrainedTokenizerBase,
    beta: float = 1.0,
    alpha: float | None = None,
    scale: float | None = None,
    scale_note: str | None = None,
) -> str:
    """The credit map of a stored training sample (its targets were computed when it was drawn)."""
    return credit_html(
        tokenizer,
        rollout.response_ids,
        rollout.target_logprobs,
        rollout.ref_logprobs,
        rollout.messages[-1]["content"],
        f"{rollout.prompt_id}, epoch {rollout.epoch}",
        beta,
        alpha=alpha,
        scale=scale,
        scale_note=scale_note,
    )


# Reading a run back (notebooks/inspect_run.ipynb): its settings, tokenizer and credit scale.


def run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's config as the run recorded it (config.yaml; before, Hydra's .hydra/config.yaml),
    with every setting the run recorded when it started (run_fingerprint.json: alpha, beta, the
    principle, ...) put back: a refused restart rewrote .hydra/config.yaml with the values it was
    refused for."""
    import json

    from omegaconf import OmegaConf

    path = run_config_path(run_dir)
    if path is None:
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a train.py run directory")
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    record = Path(run_dir) / "run_fingerprint.json"
    settings = json.loads(record.read_text(encoding="utf-8")).get("settings", {}) if record.is_file() else {}
    for key, value in settings.items():  # flat keys as on the command line, as train.yaml nests them
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[leaf] = value
    return config


def run_tokenizer(run_dir: str | Path) -> PreTrainedTokenizerBase:
    """The run's tokenizer: final/'s if exported, else the model group's, as training loaded it."""
    from iq_lightning.config import ModelSpec, build_spec
    from iq_lightning.models import load_tokenizer

    final = Path(run_dir) / "final"
    if (final / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(final)
    return load_tokenizer(build_spec(ModelSpec, run_config(run_dir)["model"], "model"))


def run_credit_scale(run_dir: str | Path, beta: float) -> tuple[float, str]:
    """(scale, note) of a training run's credit maps: the one its CreditMaps fixed
    (credit/scale.json), else one computed now over its first epoch's rollouts."""
    import json

    path = Path(run_dir) / "credit" / SCALE_FILE
    if path.is_file():
        stored = json.loads(path.read_text())
        return float(stored["scale"]), stored["note"]
    first = sorted((Path(run_dir) / "rollouts").glob("epoch_*.jsonl"))[:1]
    scale = credit_scale(rollout_credits(read_rollouts(first[0]), beta) if first else [])
    return scale, scale_note(scale, first[0].stem if first else "no rollouts")


def scale_note(scale: float, source: str) -> str:
    return f"colour scale ±{scale:g}, fixed for this run ({CREDIT_QUANTILE:.0%} of |credit| over {source}'s tokens)"


def newest(paths: Iterable[Path]) -> Path | None:
    """The most recently modified of `paths`, or None."""
    found = [p for p in paths if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def find_runs(*roots: str | Path) -> list[Path]:
    """train.py run directories under `roots` (outputs/<date>/<time>, multirun/<date>/<time>/<n_...>)."""
    runs = []
    for root in map(Path, roots):
        for pattern in ("outputs/*/*/rollouts", "multirun/*/*/*/rollouts", "*/rollouts"):
            runs += [p.parent for p in root.glob(pattern) if p.is_dir() and run_config_path(p.parent) is not None]
    return sorted(set(runs))


def find_evaluations(*roots: str | Path) -> list[Path]:
    """evaluate.py output directories under `roots` (outputs/evaluate/<name>, or any out_dir
    two levels below outputs/)."""
    found = []
    for root in map(Path, roots):
        for pattern in ("outputs/evaluate/*/results/summary.md", "outputs/*/results/summary.md", "*/results/summary.md"):
            found += [p.parent.parent for p in root.glob(pattern)]
    return sorted(set(found))
