"""What W&B records of a run, read back from the offline run files: the full config with flat keys
to group by, tags, the sweep as the group, the per-epoch rollouts table, and for an evaluation
the judge, the evaluated training runs and the win rates and ratings as numbers."""

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from conftest import CONF, REPO, compose
from iq_lightning.config import TrainSpec, build_run_config
from iq_lightning.rollouts import Rollout, write_rollouts

TINY = ["model=tiny", "lr=1e-4", "logger=none", "alpha=1.2", "samples_per_epoch=4", "sampler.temperature=0.7"]


def _run_config(run_dir: Path, *overrides: str):
    return build_run_config(compose(TINY + list(overrides)), run_dir)


def _sweep_dir(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun" / "2026-11-23" / "11-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}\n")  # Hydra writes it before the first run starts
    return sweep


def test_flat_config_has_the_keys_a_dashboard_groups_by(tmp_path, monkeypatch):
    from iq_lightning.tracking import flat_config, run_tags, sweep_group

    monkeypatch.chdir(tmp_path)
    run = _run_config(_sweep_dir(tmp_path) / "0_alpha=1.2")
    flat = flat_config(run)
    assert flat["alpha"] == 1.2 and flat["beta"] == 0.1 and flat["seed"] == 0 and flat["samples_per_epoch"] == 4
    assert flat["principle"] == run.guide.principle and flat["placement"] == "system"
    assert flat["model_name"] == "tiny" and flat["temperature"] == 0.7 and flat["max_new_tokens"] == run.sampler.max_new_tokens
    assert flat["data_source"] == "bundled" and flat["data_split"] == "train" and flat["reduction"] == "token_mean"
    assert flat["objective"] == "inverse_q" and flat["sweep"] == "multirun/2026-11-23/11-00-00"
    # the full resolved config of every part, as W&B shows nested keys (model.tiny.hidden_size, ...)
    assert flat["model"]["tiny"]["hidden_size"] == run.model.tiny.hidden_size and flat["sampler"]["top_p"] == 1.0
    assert {"data", "guide", "sampler", "strategy", "logger"} <= set(flat)
    assert json.loads(json.dumps(flat)) == flat  # plain JSON: W&B config and hparams.yaml take it as is
    assert run_tags(run) == ["objective:inverse_q", "model:tiny", "guide:principle", "sampler:hf", "reduction:token_mean"]
    assert sweep_group(tmp_path / "outputs" / "2026-11-23" / "10-00-00") is None  # a single run has no group


def _rollouts(tokenizer, epoch: int, n: int) -> list[Rollout]:
    out = []
    for i in range(n):
        ids = tokenizer(f"Bonjour {i}!\nVoila.", add_special_tokens=False)["input_ids"]
        target = [-1.0 - 0.1 * (k % 3) for k in range(len(ids))]
        ref = [-1.2 + 0.05 * k for k in range(len(ids))]
        out.append(Rollout(epoch, f"p{i:03d}", "greeting", [{"role": "user", "content": f"Say hi {i}"}], [1, 2], ids,
                           tokenizer.decode(ids), True, target, target, ref))
    return out


class _Trivial(L.LightningModule):
    """Stands in for InverseQModule: the callbacks under test read only the rollouts on disk."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        loss = ((self.w - batch) ** 2).mean()
        self.log("train/loss", loss, on_epoch=True, batch_size=1)
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(2, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_training_run_config_tags_group_and_rollouts_table_read_back_offline(tmp_path, monkeypatch, tiny):
    """The pieces run.py wires (wandb_init_kwargs, RunTracking, CreditMaps) on a trivial module."""
    from lightning.pytorch.loggers import WandbLogger

    from iq_lightning.callbacks import CreditMaps
    from iq_lightning.logging_csv import ResumableCSVLogger
    from iq_lightning.tracking import ROLLOUT_COLUMNS, RunTracking, read_offline_run, wandb_init_kwargs

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    _, tokenizer = tiny
    run_dir = _sweep_dir(tmp_path) / "0_alpha=1.2"
    run_dir.mkdir()
    run = _run_config(run_dir)
    rollout_path = lambda epoch: run_dir / "rollouts" / f"epoch_{epoch:03d}.jsonl"  # noqa: E731
    for epoch in (0, 1):
        write_rollouts(rollout_path(epoch), _rollouts(tokenizer, epoch, 5))
    loggers = [
        WandbLogger(project="iq-lightning", name=run_dir.name, save_dir=str(run_dir), offline=True, id="trk0001", **wandb_init_kwargs(run)),
        ResumableCSVLogger(save_dir=str(run_dir)),
    ]
    callbacks = [RunTracking(run, rollout_path, tokenizer, table_rows=3), CreditMaps(run_dir, rollout_path, tokenizer, 1, run.train.beta, alpha=1.2)]
    trainer = L.Trainer(max_epochs=2, logger=loggers, callbacks=callbacks, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(run_dir))
    trainer.fit(_Trivial())
    loggers[0].experiment.finish()

    recorded = read_offline_run(run_dir)
    assert recorded.id == "trk0001" and recorded.job_type == "train"
    assert recorded.group == "multirun/2026-11-23/11-00-00"
    assert "objective:inverse_q" in recorded.tags and "model:tiny" in recorded.tags
    config = recorded.config
    assert config["alpha"] == 1.2 and config["model_name"] == "tiny" and config["principle"] == run.guide.principle
    assert config["samples_per_epoch"] == 4 and config["temperature"] == 0.7 and config["seed"] == 0
    assert config["model"]["source"] == "tiny" and config["sampler"]["backend"] == "hf"
    tables = recorded.tables("rollouts")
    assert len(tables) == 2  # one per epoch
    assert tables[0]["columns"] == ROLLOUT_COLUMNS and len(tables[0]["data"]) == 3  # sized by table_rows
    row = dict(zip(ROLLOUT_COLUMNS, tables[1]["data"][0]))
    assert row["epoch"] == 1 and row["prompt"] == "Say hi 0" and row["response"].startswith("Bonjour 0")
    first = run.train.beta * (-1.0 - -1.2)
    assert row["length"] == len(tokenizer("Bonjour 0!\nVoila.", add_special_tokens=False)["input_ids"])
    assert row["token_credits"].startswith(f"B:{first:+.3f}") and abs(row["credit_max"] - max(row["credit_max"], first)) < 1e-9
    # the same config in the run directory (the CSV logger's hparams.yaml)
    hparams = yaml.safe_load((run_dir / "metrics" / "hparams.yaml").read_text())
    assert hparams["alpha"] == 1.2 and hparams["principle"] == run.guide.principle and hparams["sweep"] == recorded.group
    # credit maps: one scale for the run, stated with alpha and beta on every page
    scale = json.loads((run_dir / "credit" / "scale.json").read_text())
    pages = [(run_dir / "credit" / f"epoch_{e:03d}").glob("*.html") for e in (0, 1)]
    for page in [next(iter(p)) for p in pages]:
        text = page.read_text()
        assert "alpha = 1.2, beta = 0.1" in text and f"colour scale ±{scale['scale']:g}, fixed for this run" in text


def _eval_spec(tmp_path: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from iq_lightning.evaluation.spec import build_eval_spec

    trained = tmp_path / "outputs" / "2026-11-23" / "10-00-00"
    trained.mkdir(parents=True)
    (trained / "wandb_run_id").write_text("abc123def456\n")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = hydra_compose(config_name="evaluate", overrides=["model=tiny", f"+contestants.iq.run_dir='{trained}'", "data.limit=6"])
    return build_eval_spec(cfg)


RATES = [
    {"a": "iq", "b": "sft", "wins": 4, "ties": 1, "losses": 1, "invalid": 0, "win_rate": 0.6667, "win_low": 0.3, "win_high": 0.9,
     "tie_rate": 0.1667, "lose_rate": 0.1667, "lose_low": 0.03, "lose_high": 0.56, "win_minus_lose": 0.5, "significant": "no"},
    {"a": "prompting", "b": "alpha=1.2 (0_alpha=1.2)", "wins": 2, "ties": 0, "losses": 4, "invalid": 0, "win_rate": 0.3333,
     "win_low": 0.1, "win_high": 0.7, "tie_rate": 0.0, "lose_rate": 0.6667, "lose_low": 0.3, "lose_high": 0.9, "win_minus_lose": -0.3333,
     "significant": "no"},
]
ELO = [{"contestant": "iq", "elo": 1012.5, "low": 995.0, "high": 1030.0, "std": 4.2}, {"contestant": "sft", "elo": 987.5, "low": float("nan"), "high": float("nan"), "std": 4.2}]


def test_eval_metrics_are_numbers_per_pair():
    from iq_lightning.tracking import eval_metrics

    metrics = eval_metrics(RATES, ELO, {"judge/control_accuracy": 0.9, "position_bias": 0.1, "note": "text"}, reference="sft")
    assert metrics["win_rate/iq vs sft"] == 0.6667 and metrics["lose_rate/iq vs sft"] == 0.1667
    assert metrics["win_minus_lose/prompting vs alpha=1.2 (0_alpha=1.2)"] == -0.3333 and metrics["wins/iq vs sft"] == 4
    assert metrics["elo/iq"] == 1012.5 and metrics["elo_low/iq"] == 995.0 and "elo_low/sft" not in metrics  # no NaN
    assert metrics["judge/control_accuracy"] == 0.9 and metrics["judge/position_bias"] == 0.1 and "judge/note" not in metrics
    # against the reference, from the other contestant's side: iq (judged as a against sft)
    assert metrics["vs_reference/win_rate/iq"] == 0.6667 and metrics["vs_reference/win_minus_lose/iq"] == 0.5
    assert all(isinstance(v, float) for v in metrics.values())


def test_eval_metrics_against_the_reference_take_the_other_side():
    from iq_lightning.tracking import eval_metrics

    row = {**RATES[0], "a": "sft", "b": "alpha=1.2"}  # the reference judged as a: flip to alpha=1.2's side
    metrics = eval_metrics([row], reference="sft")
    assert metrics["vs_reference/win_rate/alpha=1.2"] == row["lose_rate"] and metrics["vs_reference/lose_rate/alpha=1.2"] == row["win_rate"]
    assert metrics["vs_reference/win_minus_lose/alpha=1.2"] == -row["win_minus_lose"]


def test_evaluation_run_names_its_judge_and_training_runs_offline(tmp_path, monkeypatch):
    import wandb

    from iq_lightning.tracking import eval_init_kwargs, eval_metrics, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = _eval_spec(tmp_path)
    kwargs = eval_init_kwargs(spec, spec.contestants)
    run = wandb.init(project="iq-lightning", dir=str(tmp_path), id="evl0001", mode="offline", **kwargs)
    run.log(eval_metrics(RATES, ELO, {"judge/control_accuracy": 0.9}))
    run.finish()

    recorded = read_offline_run(tmp_path)
    assert recorded.job_type == "evaluation" and recorded.group == ""
    assert "evaluation" in recorded.tags and "train:abc123def456" in recorded.tags and "judge:likelihood:tiny" in recorded.tags
    config = recorded.config
    assert config["judge"] == "likelihood:tiny" and config["judge_backend"] == "likelihood" and config["reference"] == "sft"
    assert config["training_runs"] == {"iq": "abc123def456"} and config["training_run_ids"] == ["abc123def456"]
    assert set(config["contestants"]) == {"sft", "prompting", "iq"} and config["data_limit"] == 6
    assert config["spec"]["judge"]["tie_margin"] == spec.judge.tie_margin
    history = recorded.history[-1]
    assert history["win_rate/iq vs sft"] == 0.6667 and history["elo/iq"] == 1012.5 and history["judge/control_accuracy"] == 0.9


def test_evaluating_a_sweep_joins_the_sweeps_group(tmp_path, monkeypatch):
    from dataclasses import replace

    from iq_lightning.tracking import eval_init_kwargs, sweep_group

    monkeypatch.chdir(tmp_path)
    sweep = _sweep_dir(tmp_path)
    spec = replace(_eval_spec(tmp_path), sweep_dir=str(sweep))
    assert eval_init_kwargs(spec, spec.contestants)["group"] == sweep_group(sweep / "0_alpha=1.2") == "multirun/2026-11-23/11-00-00"


WIRED = "rollout_table_rows" in {f.name for f in fields(TrainSpec)}


@pytest.mark.skipif(not WIRED, reason="run.py does not wire iq_lightning.tracking yet (TrainSpec.rollout_table_rows)")
def test_a_wandb_sweep_end_to_end_can_be_told_apart(tmp_path):
    from iq_lightning.tracking import read_offline_run

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra.sweep.dir=multirun/sweep", "alpha=1.0,1.2", "model=tiny", "epochs=2",
           "samples_per_epoch=4", "micro_batch_size=2", "sampler.max_new_tokens=6", "val.every_n_epochs=0", "rollout_table_rows=3",
           "logger=wandb", "save_final=false"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "multirun" / "sweep").iterdir() if p.is_dir())
    recorded = [read_offline_run(r) for r in runs]
    assert [r.config["alpha"] for r in recorded] == [1.0, 1.2]
    assert {r.group for r in recorded} == {"multirun/sweep"}
    for r in recorded:
        assert "model:tiny" in r.tags and r.config["model_name"] == "tiny" and r.config["principle"]
        tables = r.tables("rollouts")
        assert len(tables) == 2 and len(tables[0]["data"]) == 3


def test_wandb_init_gets_no_anonymous_setting_unless_asked(tmp_path):
    """wandb warns on every run that `anonymous` has no effect; Lightning passes it always."""
    from iq_lightning.tracking import WandbLogger

    assert "anonymous" not in WandbLogger(save_dir=str(tmp_path), offline=True)._wandb_init
    assert WandbLogger(save_dir=str(tmp_path), offline=True, anonymous=True)._wandb_init["anonymous"] == "allow"
