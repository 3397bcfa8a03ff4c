"""What a contestant run was trained with, read from the record the run itself wrote when it
really started (`run_fingerprint.json`, iq_lightning.run.RunStarted), never from Hydra's
per-invocation `.hydra/config.yaml`: a refused restart rewrites that file with the values it was
refused for, and a run labelled from it (alpha=2 for a run trained at 1.5) silently moves its
point on the alpha-sweep figure."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from iq_lightning.config import DataSpec, GuideSpec, TrainSpec, ValSpec
from iq_lightning.errors import ConfigError

FINGERPRINT_FILE = "run_fingerprint.json"  # written by iq_lightning.run.RunStarted


@dataclass(frozen=True)
class TrainedWith:
    """The settings an evaluation takes from a run. `settings`: the compared ones as flat keys
    named as on evaluate.py's command line (guide.principle, data.source, principle_check, ...)."""

    run_dir: str
    alpha: float
    beta: float
    settings: Mapping[str, Any] = field(default_factory=dict)
    train_split: str | None = "train"  # the split of `data` it trained on


def _unflat(flat: Mapping[str, Any], prefix: str) -> dict | None:
    """The keys under `prefix.` of a flat record as a nested mapping; None when the record holds
    the prefix itself as null (an unset optional group)."""
    if flat.get(prefix, ...) is None:
        return None
    nested: dict = {}
    for key, value in flat.items():
        if not key.startswith(prefix + "."):
            continue
        node = nested
        *parents, leaf = key[len(prefix) + 1 :].split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _check(flat: Mapping[str, Any]) -> dict:
    check = _unflat(flat, "val.check") or {}
    return {"kind": check.get("kind", "auto"), "language": check.get("language"), "pattern": check.get("pattern"), "flags": check.get("flags") or ""}


def read_trained(run_dir: str | Path) -> TrainedWith | None:
    """The run's record, None when it has none (a directory from elsewhere, or a run that never
    started); ConfigError (one line) for a record that does not parse."""
    path = Path(run_dir) / FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} does not parse ({exc}): cannot tell what this run was trained with") from None
    try:
        return _trained_with(str(run_dir), stored)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a run record this version reads ({type(exc).__name__}: {exc})") from None


def _trained_with(run_dir: str, stored: dict) -> TrainedWith:
    if "settings" not in stored:  # runs started before the whole config was recorded
        kind, principle, placement = stored["guide"]
        source, data_path, train_split = stored["data"]
        settings = {
            "guide.kind": kind, "guide.principle": principle, "guide.placement": placement, "guide.model": None,
            "data.source": source, "data.path": data_path, "data.split": ValSpec().split, "principle_check": _check({}),
        }
        return TrainedWith(run_dir, float(stored["alpha"]), TrainSpec().beta, settings, train_split)
    flat = stored["settings"]
    guide_model = _unflat(flat, "guide.model")
    settings = {
        "guide.kind": flat.get("guide.kind", GuideSpec().kind),
        "guide.principle": flat.get("guide.principle"),
        "guide.placement": flat.get("guide.placement", GuideSpec().placement),
        "guide.model": guide_model or None,
        "data.source": flat.get("data.source", DataSpec().source),
        "data.path": flat.get("data.path"),
        "data.hh_subsets": list(flat.get("data.hh_subsets") or []),
        "data.split": flat.get("val.split", ValSpec().split),  # the run's held-out split
        "principle_check": _check(flat),
    }
    return TrainedWith(run_dir, float(flat["alpha"]), float(flat.get("beta", TrainSpec().beta)), settings, flat.get("data.split", DataSpec().split))
