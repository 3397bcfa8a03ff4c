"""Numerics: non-finite numbers stop a run with one line (or skip a step within the allowance),
leaving the last good checkpoint and no final/; the policy's LM head and log-softmax run in float32
under mixed precision; private torch imports have a working fallback."""

import csv
import importlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from conftest import compose, has_module
from iq_lightning.config import build_run_config
from iq_lightning.errors import NonFiniteError
from iq_lightning.forward import pack, response_logprobs
from iq_lightning.module import InverseQModule
from iq_lightning.run import train

# 2 optimizer steps per epoch (8 samples, micro-batch 4); nothing but training and checkpoints.
TINY = [
    "model=tiny", "lr=1e-4",
    "samples_per_epoch=8",
    "micro_batch_size=4",
    "sampler.max_new_tokens=8",
    "sampler.batch_size=8",
    "alpha=3.0",
    "val.every_n_epochs=0",
    "credit_maps_per_epoch=0",
    "rollout_table_rows=0",
    "logger=none",
]


def _run(tmp: Path, *extra: str):
    return train(build_run_config(compose(TINY + list(extra)), tmp), show_progress=False)


@pytest.fixture
def nan_loss_at(monkeypatch):
    """Make the loss NaN (keeping its graph) in the micro-batches of the given global steps."""

    def inject(*steps: int) -> None:
        original = InverseQModule.batch_metrics

        def batch_metrics(self, batch):
            metrics = original(self, batch)
            if self.trainer.global_step in steps:
                metrics["loss"] = metrics["loss"] * float("nan")
            return metrics

        monkeypatch.setattr(InverseQModule, "batch_metrics", batch_metrics)

    return inject


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_issue_reproduction_lr_1e30_stops_in_epoch_0(tmp_path):
    # Step 0's gradient is finite; AdamW's first update (lr * sign) puts the weights near 1e30,
    # so step 1's forward overflows: the loss is NaN. Before: exit 0 and a non-finite final/.
    with pytest.raises(NonFiniteError) as caught:
        _run(tmp_path, "lr=1e30", "max_grad_norm=null", "epochs=2")
    message = str(caught.value)
    assert message.startswith("non-finite loss at epoch 0, step 1: training stopped"), message
    assert "\n" not in message
    assert not (tmp_path / "final").exists()
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))  # epoch 0 never completed


def test_nan_loss_in_epoch_1_keeps_epoch_0_checkpoint(tmp_path, nan_loss_at):
    nan_loss_at(3)  # epoch 1's second step
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at epoch 1, step 3: training stopped"):
        _run(tmp_path, "epochs=3")
    assert not (tmp_path / "final").exists()
    ckpt = _checkpoint(tmp_path)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 2)  # the last completed epoch
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch000.ckpt", "epoch000.ckpt.sha256", "last.ckpt"]


def test_skip_allowance_skips_counts_and_continues(tmp_path, nan_loss_at):
    nan_loss_at(1)
    result = _run(tmp_path, "epochs=2", "nonfinite_skips=1", "logger=csv")
    assert result.final_dir == tmp_path / "final"
    assert result.trainer.global_step == 4
    # The skipped step changed neither the weights nor AdamW's state: 3 of 4 steps were taken.
    optimizer = result.trainer.optimizers[0]
    assert {int(state["step"]) for state in optimizer.state.values()} == {3}
    assert all(torch.isfinite(p).all() for p in result.module.policy.parameters())
    rows = list(csv.DictReader((tmp_path / "metrics" / "metrics.csv").open()))
    skipped = [float(r["train/nonfinite_skipped"]) for r in rows if r.get("train/nonfinite_skipped")]
    assert skipped == [1.0, 1.0]  # logged once per epoch, cumulative
    assert _checkpoint(tmp_path)["nonfinite_skipped"] == 1


def test_skip_allowance_spent_stops(tmp_path, nan_loss_at):
    nan_loss_at(1, 2)
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at epoch 1, step 2 after 1 skipped steps \(nonfinite_skips=1\)"):
        _run(tmp_path, "epochs=2", "nonfinite_skips=1")
    assert not (tmp_path / "final").exists()
    assert _checkpoint(tmp_path)["global_step"] == 2


def test_nonfinite_guide_targets_stop_before_the_step(tmp_path, monkeypatch):
    from iq_lightning import datamodule

    def collate(rollouts, pad_id):
        batch = datamodule_collate(rollouts, pad_id)
        batch["target_logprobs"][0, 0] = float("-inf")
        return batch

    datamodule_collate = datamodule.collate
    monkeypatch.setattr(datamodule, "collate", collate)
    with pytest.raises(NonFiniteError, match=r"^non-finite guide targets log pi_hat\(y_t\) at epoch 0, step 0: "):
        _run(tmp_path, "epochs=1")


def test_nonfinite_gradient_with_finite_loss_stops(tmp_path, monkeypatch):
    original = InverseQModule.batch_metrics

    def batch_metrics(self, batch):
        metrics = original(self, batch)
        if self.trainer.global_step == 1 and metrics["loss"].requires_grad:
            metrics["loss"].register_hook(lambda grad: grad * float("inf"))
        return metrics

    monkeypatch.setattr(InverseQModule, "batch_metrics", batch_metrics)
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient norm at epoch 0, step 1: "):
        _run(tmp_path, "epochs=1")


def test_nonfinite_parameters_stop_before_the_epoch_checkpoint(tmp_path, monkeypatch):
    original = InverseQModule.on_train_batch_end

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step == 2:  # after epoch 0's last step
            with torch.no_grad():
                next(self.policy.parameters()).view(-1)[0] = math.inf
        original(self, outputs, batch, batch_idx)

    monkeypatch.setattr(InverseQModule, "on_train_batch_end", on_train_batch_end)
    with pytest.raises(NonFiniteError, match=r"^non-finite policy parameters at epoch 0, step 2: "):
        _run(tmp_path, "epochs=2")
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))  # epoch 0 never completed


def test_nonfinite_skips_is_validated():
    from iq_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="nonfinite_skips must be >= 0"):
        build_run_config(compose(TINY + ["nonfinite_skips=-1"]), "/tmp/unused")


# --- float32 head under mixed precision ----------------------------------------------------------


def _batch(tokenizer, vocab):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 7, 9)]
    responses = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (6, 4, 8)]
    return pack(prompts, responses, tokenizer.pad_token_id)


def test_bf16_mixed_policy_logprobs_use_a_float32_head(tiny):
    """Under bf16 autocast, log pi_theta(y_t) is log_softmax(W h)[y_t] computed in float32 from the
    final hidden states h; before, the head ran in bf16 (1e-3-scale errors even on tiny)."""
    model, tokenizer = tiny
    batch = _batch(tokenizer, model.config.vocab_size)
    mask = batch["response_mask"].bool()
    hidden = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, args: hidden.append(args[0]))
    try:
        with torch.no_grad():
            reference = response_logprobs(model, batch)
            hidden.clear()
            # What Lightning's precision="bf16-mixed" wraps training_step in (torch.autocast on CPU).
            with MixedPrecision("bf16-mixed", "cpu").forward_context():
                mixed = response_logprobs(model, batch, float32_logits=True)
    finally:
        handle.remove()
    assert mixed.dtype == torch.float32
    (h,) = hidden
    width = batch["response_ids"].shape[1]
    logits = h.double()[:, -(width + 1) : -1] @ model.get_output_embeddings().weight.double().T
    exact = torch.log_softmax(logits, -1).gather(-1, batch["response_ids"][..., None]).squeeze(-1)
    torch.testing.assert_close(mixed[mask].double(), exact[mask], atol=1e-5, rtol=0)
    # End to end the bf16 body remains: on tiny its error stays within 1e-3 on average.
    assert (mixed - reference)[mask].abs().mean() < 1e-3
    # The head is back to its own forward afterwards (nothing stays patched).
    assert "forward" not in model.get_output_embeddings().__dict__


def _exact_logprobs(hidden: torch.Tensor, weight: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    """log_softmax(W h)[y] in float64 from the head's inputs, response-aligned."""
    width = response_ids.shape[1]
    logits = hidden.double()[:, -(width + 1) : -1] @ weight.double().T
    return torch.log_softmax(logits, -1).gather(-1, response_ids[..., None]).squeeze(-1)


def test_bf16_weights_policy_logprobs_use_a_float32_head(tiny):
    """Weights in bf16 without autocast (DeepSpeed's bf16): the head still runs in float32 on the
    bf16 hidden states upcast, instead of rounding logits to bf16; guides' calls are unchanged."""
    import copy

    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    batch = _batch(tiny[1], model.config.vocab_size)
    mask = batch["response_mask"].bool()
    head = model.get_output_embeddings()
    hidden = []
    handle = head.register_forward_pre_hook(lambda m, args: hidden.append(args[0]))
    try:
        with torch.no_grad():
            policy = response_logprobs(model, batch, float32_logits=True)
            plain = response_logprobs(model, batch)
    finally:
        handle.remove()
    exact = _exact_logprobs(hidden[0], head.weight, batch["response_ids"])
    torch.testing.assert_close(policy[mask].double(), exact[mask], atol=1e-5, rtol=0)
    assert (plain - exact)[mask].abs().max() > 1e-4  # the bf16 logits' rounding, still there by default


def test_bf16_mixed_run_trains_through_the_float32_head(tmp_path):
    """precision=bf16-mixed end to end (backward through the patched head, non-fused AdamW)."""
    result = _run(tmp_path, "epochs=1", "precision=bf16-mixed", "save_final=false")
    assert result.trainer.global_step == 2
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in result.module.policy.parameters())
    assert "forward" not in result.module.policy.get_output_embeddings().__dict__


# --- private imports ------------------------------------------------------------------------------


def test_fused_kernel_devices_fallback_without_torch_private(monkeypatch):
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    private = set(_get_fused_kernels_supported_devices())
    monkeypatch.setitem(sys.modules, "torch.utils._foreach_utils", None)  # import now fails
    monkeypatch.delitem(sys.modules, "iq_lightning.module")
    fresh = importlib.import_module("iq_lightning.module")  # the package imports without it
    expected = {d for d in ("cpu", "cuda") if d in private and (d != "cuda" or torch.cuda.is_available())}
    assert fresh.fused_kernel_devices() == expected


# --- DDP: ranks agree ----------------------------------------------------------------------------

_NAN_ON_RANK_1 = '''
import sys
sys.path.insert(0, {repo!r})
from iq_lightning.module import InverseQModule

original = InverseQModule.batch_metrics

def batch_metrics(self, batch):
    metrics = original(self, batch)
    if self.global_rank == 1 and self.trainer.global_step == 1:
        metrics["loss"] = metrics["loss"] * float("nan")
    return metrics

InverseQModule.batch_metrics = batch_metrics
# Not runpy.run_path: it sets sys.argv[0] to train.py, and Lightning starts rank 1 from argv[0].
exec(compile(open({train!r}).read(), {train!r}, "exec"), {{"__name__": "__main__", "__file__": {train!r}}})
'''


def test_ddp_nan_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1 alone sees a NaN loss (epoch 1, step 1): both ranks stop together, with one line
    and exit code 2, instead of rank 0 waiting forever in its next collective."""
    import os
    import subprocess

    from conftest import REPO

    script = tmp_path / "train_nan_rank1.py"
    script.write_text(_NAN_ON_RANK_1.format(repo=str(REPO), train=str(REPO / "train.py")))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = [
        f"hydra.run.dir={run_dir}", "model=tiny", "samples_per_epoch=8", "micro_batch_size=4", "sampler.max_new_tokens=8",
        "alpha=3.0", "logger=none", "val.every_n_epochs=0", "credit_maps_per_epoch=0", "strategy=ddp",
        "strategy.devices=2", "strategy.accelerator=cpu", "epochs=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), *overrides], capture_output=True, text=True, env=env, timeout=300, cwd=run_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith("error: non-finite loss at epoch 1, step 1: training stopped"), result.stderr[-3000:]
    assert not (run_dir / "final").exists()
    ckpt = _checkpoint(run_dir)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 1)


@pytest.mark.parametrize(
    "strategy, error",
    [
        # ZeRO-3's engine steps from its own gradient partitions: no skip, the run stops at once.
        pytest.param("deepspeed_zero3", r"non-finite loss at epoch 0, step 1 \(this strategy cannot skip a step\): ",
                     marks=pytest.mark.skipif(not has_module("deepspeed"), reason="deepspeed is not installed")),
        # FSDP skips the first (its gradient shards dropped); the second step leaves finite weights
        # of ~1e30 whose next-token logits are NaN: the sampler of every rank stops epoch 1.
        ("fsdp", r"epoch 1 sampling: the policy's next-token logits hold NaN at response token 1 in \d of 4 rows"),
    ],
    ids=["deepspeed_zero3", "fsdp"],
)
def test_sharded_strategies_skip_or_stop_together(strategy, error, tmp_path):
    """lr=1e30 without clipping under ZeRO-3 and FSDP on 2 CPU processes: each rank checks the
    gradient and parameter shards it holds, and both ranks stop with the same line, exit code 2."""
    from test_cli import _train

    result = _train(
        tmp_path, "model=tiny", "lr=1e30", "max_grad_norm=null", "epochs=2", "logger=none", "samples_per_epoch=8",
        "micro_batch_size=2", "sampler.max_new_tokens=8", "val.every_n_epochs=0", "credit_maps_per_epoch=0",
        f"strategy={strategy}", "strategy.devices=2", "strategy.accelerator=cpu", "nonfinite_skips=1",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = {line for line in result.stderr.splitlines() if line.startswith("error: ")}
    # One line per rank; their row counts may differ.
    assert 1 <= len(errors) <= 2 and all(re.match("error: " + error, e) for e in errors), result.stderr[-3000:]
    assert not (tmp_path / "final").exists()
