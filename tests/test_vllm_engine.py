"""VLLMSampler's CUDA-only engine handling, against a fake engine (no vLLM, no GPU): the options
the engine is built with, and the order of sleep, cache release, wake-up and weight push."""

from __future__ import annotations

import types

import pytest
import torch

from iq_lightning.config import TinySpec
from iq_lightning.models import build_tiny
from iq_lightning.samplers import vllm as vllm_sampler


class FakeLLM:
    def __init__(self, calls: list, **kwargs):
        self.calls, self.kwargs = calls, kwargs

    def sleep(self, level):
        self.calls.append(f"sleep(level={level})")

    def wake_up(self, tags):
        self.calls.append(f"wake_up({','.join(tags)})")

    def collective_rpc(self, method, kwargs=None):
        if kwargs and "weights_iterator" in kwargs:
            list(kwargs["weights_iterator"])  # consumed, as the workers do
        self.calls.append(method)

    def apply_model(self, fn):
        self.calls.append("apply_model")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA machine as the sampler sees it, and a fake vllm whose LLM records every call."""
    calls: list[str] = []
    built: list[FakeLLM] = []

    def make(**kwargs):
        built.append(FakeLLM(calls, **kwargs))
        return built[-1]

    monkeypatch.setattr(vllm_sampler, "_import_vllm", lambda: types.SimpleNamespace(LLM=make))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    return calls, built


def test_sleep_mode_frees_the_cache_before_each_wake_up_and_sleeps_at_level_2(fake_cuda):
    calls, _ = fake_cuda
    policy = build_tiny(TinySpec())[0]
    sampler = vllm_sampler.VLLMSampler([0], {"enable_sleep_mode": True}, show_progress=False)
    sampler.update_weights(policy)  # builds the engine, first push
    calls.clear()
    sampler.sleep()  # the training phase
    sampler.update_weights(policy)  # the next epoch
    assert calls == [
        "sleep(level=2)",
        "empty_cache", "wake_up(weights)",
        "reload_weights", "reset_prefix_cache",
        "empty_cache", "wake_up(kv_cache)",
    ]
    calls.clear()
    sampler.update_weights(policy)  # awake: no wake-up, no cache release
    assert calls == ["reload_weights", "reset_prefix_cache"]


def test_cuda_engine_defaults(fake_cuda):
    _, built = fake_cuda
    policy = build_tiny(TinySpec())[0]
    vllm_sampler.VLLMSampler([0], show_progress=False).update_weights(policy)
    kwargs = built[-1].kwargs
    assert kwargs["enforce_eager"] is False  # CUDA graphs
    assert kwargs["max_num_batched_tokens"] == 4096  # TRL's
    assert kwargs["gpu_memory_utilization"] == 0.3 and kwargs["dtype"] == "bfloat16"
    vllm_sampler.VLLMSampler([0], {"enforce_eager": True, "max_num_batched_tokens": 8192}, show_progress=False).update_weights(policy)
    assert built[-1].kwargs["enforce_eager"] is True and built[-1].kwargs["max_num_batched_tokens"] == 8192


def test_cpu_engine_defaults_unchanged(monkeypatch):
    built = []
    monkeypatch.setattr(vllm_sampler, "_import_vllm", lambda: types.SimpleNamespace(LLM=lambda **kw: built.append(kw) or FakeLLM([])))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    vllm_sampler.VLLMSampler([0], show_progress=False).update_weights(build_tiny(TinySpec())[0])
    assert built[-1]["enforce_eager"] is True and "max_num_batched_tokens" not in built[-1]
    assert built[-1]["kv_cache_memory_bytes"] == 2**30
