"""Two-process DDP on CPU (gloo): every rank samples its own share, all rollouts are kept, and
the loss is the single-process loss on the union of the ranks' samples."""

import csv

import pytest
import torch

from iq_lightning.config import TinySpec
from iq_lightning.models import build_tiny
from iq_lightning.objective import inverse_q_loss
from iq_lightning.forward import response_logprobs
from iq_lightning.rollouts import collate, read_rollouts
from test_cli import _train


def test_ddp_two_processes_match_single_process_on_the_union(tmp_path):
    # One optimizer step: 8 samples, 4 per rank, micro-batch 4. sequence_mean makes the
    # average over ranks equal to the union's loss whatever the response lengths.
    result = _train(
        tmp_path, "model=tiny", "strategy=ddp", "strategy.devices=2", "strategy.accelerator=cpu", "epochs=1",
        "samples_per_epoch=8", "micro_batch_size=4", "sampler.max_new_tokens=8", "reduction=sequence_mean",
        "alpha=3.0", "logger=csv",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [read_rollouts(tmp_path / "rollouts" / f"epoch_000.rank{r}.jsonl") for r in (0, 1)]
    assert [len(r) for r in ranks] == [4, 4]
    assert {r.prompt_id for r in ranks[0]}.isdisjoint({r.prompt_id for r in ranks[1]})
    union = ranks[0] + ranks[1]

    initial, tokenizer = build_tiny(TinySpec())
    batch = collate(union, tokenizer.pad_token_id)
    with torch.no_grad():
        policy_lp = response_logprobs(initial, batch)
    want = inverse_q_loss(policy_lp, batch["target_logprobs"], batch["response_mask"], "sequence_mean").item()

    rows = list(csv.DictReader(open(tmp_path / "metrics" / "metrics.csv")))
    logged = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert logged and logged[0] == pytest.approx(want, rel=1e-5)
    assert (tmp_path / "final" / "model.safetensors").exists()
