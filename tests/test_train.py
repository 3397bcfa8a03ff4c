"""End to end on the tiny model: weights move, rollouts/checkpoints/final are written, the loss on
fixed samples goes down, and a restart in the same directory resumes after the last epoch."""

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import compose
from iq_lightning.config import TinySpec, build_run_config
from iq_lightning.models import build_tiny
from iq_lightning.rollouts import collate, read_rollouts
from iq_lightning.forward import response_logprobs
from iq_lightning.run import train

TINY = [
    "model=tiny",
    "samples_per_epoch=8",
    "micro_batch_size=4",
    "sampler.max_new_tokens=12",
    "sampler.batch_size=8",
    "alpha=3.0",  # a random tiny model barely reacts to a principle; extrapolate harder
    "lr=1e-4",
]


def _run(tmp: Path, *extra: str):
    cfg = compose(TINY + list(extra))
    return train(build_run_config(cfg, tmp), show_progress=False)


def _loss_on(policy_module, rollouts, pad_id):
    with torch.no_grad():
        return policy_module.batch_metrics(collate(rollouts, pad_id))["loss_token_mean"].item()


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return _run(run_dir, "epochs=2", "logger=csv")


def test_run_directory_layout(two_epochs):
    run_dir = two_epochs.run_dir
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    for epoch in (0, 1):
        rows = [json.loads(l) for l in (run_dir / "rollouts" / f"epoch_{epoch:03d}.jsonl").read_text().splitlines()]
        assert len(rows) == 8
        for row in rows:
            assert row["epoch"] == epoch
            n = len(row["response_ids"])
            assert 1 <= n <= 12
            assert len(row["target_logprobs"]) == len(row["ref_logprobs"]) == len(row["sampling_logprobs"]) == n
            assert all(v <= 0 for v in row["target_logprobs"] + row["sampling_logprobs"])
            assert row["messages"][-1]["role"] == "user" and row["prompt_ids"]
    metrics = (run_dir / "metrics" / "metrics.csv").read_text()
    header = metrics.splitlines()[0].split(",")
    for name in ("train/loss_epoch", "train/loss_token_mean", "train/kl_pi_hat_est_rollouts", "train/log_ratio_mean",
                 "train/credit_mean", "train/response_length", "time/weight_sync_s", "time/sample_s",
                 "time/score_s", "time/train_s", "time/checkpoint_s"):
        assert name in header, name


def test_policy_weights_change_and_final_is_plain_transformers(two_epochs):
    initial, _ = build_tiny(TinySpec())
    trained = two_epochs.module.policy
    changed = [
        name for name, p in trained.named_parameters() if not torch.equal(p.detach(), initial.state_dict()[name])
    ]
    assert len(changed) == len(list(trained.parameters()))
    final = two_epochs.run_dir / "final"
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template
    for name, p in trained.named_parameters():
        torch.testing.assert_close(reloaded.state_dict()[name], p.detach())
    # The guides stay frozen at the initial weights.
    guide = two_epochs.module.guide.model
    torch.testing.assert_close(guide.state_dict()["lm_head.weight"], initial.state_dict()["lm_head.weight"])


def test_loss_on_fixed_samples_goes_down(two_epochs):
    rollouts = read_rollouts(two_epochs.run_dir / "rollouts" / "epoch_000.jsonl")
    module = two_epochs.module
    pad = two_epochs.datamodule.tokenizer.pad_token_id
    after = _loss_on(module, rollouts, pad)
    trained = module.policy
    module.policy = build_tiny(TinySpec())[0]
    try:
        before = _loss_on(module, rollouts, pad)
    finally:
        module.policy = trained
    assert after < 0.5 * before, (before, after)


def test_resume_continues_after_last_completed_epoch(tmp_path):
    first = _run(tmp_path, "epochs=1", "logger=none", "save_final=false")
    steps_per_epoch = first.trainer.global_step
    assert steps_per_epoch == 2
    epoch0 = (tmp_path / "rollouts" / "epoch_000.jsonl").read_bytes()
    weights_after_1 = {k: v.clone() for k, v in first.module.policy.state_dict().items()}

    second = _run(tmp_path, "epochs=2", "logger=none")
    assert second.trainer.current_epoch == 2
    assert second.trainer.global_step == 2 * steps_per_epoch
    assert (tmp_path / "rollouts" / "epoch_000.jsonl").read_bytes() == epoch0
    assert (tmp_path / "rollouts" / "epoch_001.jsonl").exists()
    # The resumed run started from epoch 1's weights, not from scratch: epoch 1's rollouts were
    # sampled by that policy, so its sampling log-probs match it (not the initial model).
    rollouts = read_rollouts(tmp_path / "rollouts" / "epoch_001.jsonl")
    module = second.module
    trained = module.policy
    module.policy = build_tiny(TinySpec())[0]
    module.policy.load_state_dict(weights_after_1)
    batch = collate(rollouts, second.datamodule.tokenizer.pad_token_id)
    with torch.no_grad():
        lp = response_logprobs(module.policy, batch)
    module.policy = trained
    mask = batch["response_mask"].bool()
    sampling = torch.zeros_like(lp)
    for i, r in enumerate(rollouts):
        sampling[i, : len(r.sampling_logprobs)] = torch.tensor(r.sampling_logprobs)
    torch.testing.assert_close(lp[mask], sampling[mask], atol=1e-4, rtol=1e-4)


def test_interrupted_epoch_reuses_its_stored_rollouts(tmp_path):
    _run(tmp_path, "epochs=1", "logger=none", "save_final=false")
    # As if the run had sampled epoch 1 and died before finishing it.
    stored = (tmp_path / "rollouts" / "epoch_000.jsonl").read_text().replace('"epoch": 0', '"epoch": 1')
    (tmp_path / "rollouts" / "epoch_001.jsonl").write_text(stored)
    resumed = _run(tmp_path, "epochs=2", "logger=none", "save_final=false")
    assert (tmp_path / "rollouts" / "epoch_001.jsonl").read_text() == stored
    assert resumed.datamodule.epoch_stats["time/sample_s"] == 0.0


@pytest.mark.vllm
@pytest.mark.skipif(not __import__("importlib").util.find_spec("vllm"), reason="needs vllm")
def test_two_epoch_run_with_vllm_sampler(tmp_path):
    result = _run(tmp_path, "epochs=2", "logger=csv", "sampler=vllm", "sampler.options.kv_cache_gib=0.25")
    for epoch in (0, 1):
        rows = read_rollouts(tmp_path / "rollouts" / f"epoch_{epoch:03d}.jsonl")
        assert len(rows) == 8 and all(r.response_ids for r in rows)
    # Epoch 0 was sampled with the initial weights, epoch 1 after a weight sync: vLLM's own
    # log-probs match the initial model on epoch 0 (float32 on the same CPU agree to ~1e-6) and
    # must not on epoch 1, or the engine kept sampling from stale weights.
    initial = build_tiny(TinySpec())[0]
    pad = result.datamodule.tokenizer.pad_token_id
    gaps = []
    for epoch in (0, 1):
        rows = read_rollouts(tmp_path / "rollouts" / f"epoch_{epoch:03d}.jsonl")
        batch = collate(rows, pad)
        with torch.no_grad():
            lp = response_logprobs(initial, batch)
        mask = batch["response_mask"].bool()
        sampled = torch.zeros_like(lp)
        for i, r in enumerate(rows):
            sampled[i, : len(r.sampling_logprobs)] = torch.tensor(r.sampling_logprobs)
        gaps.append((lp - sampled)[mask].abs().max().item())
    assert gaps[0] < 1e-4 and gaps[1] > 1e-3, gaps
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert result.trainer.global_step == 4


def test_run_can_be_read_back_for_analysis(two_epochs):
    from iq_lightning.analysis import rollout_credit_html, epoch_metrics, rollouts

    metrics = epoch_metrics(two_epochs.run_dir)
    assert [int(m["epoch"]) for m in metrics] == [0, 1]
    stored = rollouts(two_epochs.run_dir)
    assert [r.epoch for r in stored] == [0] * 8 + [1] * 8
    page = rollout_credit_html(stored[0], two_epochs.datamodule.tokenizer, beta=0.5)
    assert page.count("<span title=") == len(stored[0].response_ids)
    first = 0.5 * (stored[0].target_logprobs[0] - stored[0].ref_logprobs[0])
    assert f'title="{first:+.3f}"' in page


def test_restart_with_changed_settings_is_refused(tmp_path):
    from iq_lightning.errors import ConfigError

    _run(tmp_path, "epochs=1", "logger=none", "save_final=false")
    for override, change in [
        ("alpha=1.0", "alpha: 3.0 -> 1.0"),
        ("model.lora.r=16", "model.lora.r: 8 -> 16"),
        ("lr=0.5", "lr: 0.0001 -> 0.5"),
        ("model.tiny.hidden_size=64", "model.tiny.hidden_size: 128 -> 64"),
        ("reduction=sum", 'reduction: "token_mean" -> "sum"'),
        ("data.limit=10", "data.limit: null -> 10"),
    ]:
        with pytest.raises(ConfigError, match="holds a run with other settings") as refused:
            _run(tmp_path, "epochs=2", "logger=none", override)
        message = str(refused.value)
        assert change in message and "\n" not in message, message
        assert message.count(" -> ") == 1, message
    # Keys that may change on a restart: epochs, the logger, what is saved, speed knobs.
    resumed = _run(tmp_path, "epochs=2", "logger=csv", "save_final=false", "sampler.batch_size=2", "val.table_rows=3")
    assert resumed.trainer.global_step == 4


def test_every_fingerprinted_key_is_named_when_it_changes(tmp_path):
    from iq_lightning.errors import ConfigError
    from iq_lightning.run import FINGERPRINT_FILE, RESTART_MAY_CHANGE, check_resumable, restart_settings

    run = build_run_config(compose(TINY), tmp_path)
    settings = restart_settings(run)
    assert {"lr", "reduction", "model.lora.r", "model.tiny.hidden_size", "model.chat_template", "model.revision",
            "data.limit", "data.max_prompt_tokens", "data.hh_subsets", "guide.model", "seed"} <= set(settings)
    assert not {"epochs", "logger.kind", "dry_run", "save_final", "val.table_rows", "sampler.batch_size"} & set(settings)
    assert "epochs" in RESTART_MAY_CHANGE
    path = tmp_path / FINGERPRINT_FILE
    for key in settings:
        path.write_text(json.dumps({"settings": {**settings, key: "old"}}))
        with pytest.raises(ConfigError) as refused:
            check_resumable(run)
        assert f'({key}: "old" -> {json.dumps(settings[key])});' in str(refused.value), key
    path.write_text(json.dumps({"settings": settings}))
    check_resumable(build_run_config(compose(TINY + ["epochs=9", "logger=csv", "val.table_rows=1"]), tmp_path))


def test_a_run_recorded_before_a_key_existed_resumes_at_its_default_only(tmp_path):
    """A key added to the config since the run started is absent from its record: the run behaved
    as the key's declared default, so it resumes with that value and is refused with another."""
    from iq_lightning.errors import ConfigError
    from iq_lightning.run import FINGERPRINT_FILE, check_resumable, declared_default, restart_settings

    run = build_run_config(compose(TINY), tmp_path)
    settings = restart_settings(run)
    assert declared_default("objective.reward_model") is None
    assert declared_default("reduction") == "token_mean"  # a train key, top-level on the command line
    assert declared_default("no.such.key") is not None and declared_default("model.tiny") is not None  # no default: a sentinel
    older = {k: v for k, v in settings.items() if k not in ("objective.reward_model", "reduction")}
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps({"settings": older}))
    check_resumable(run)
    changed = build_run_config(compose(TINY + ["reduction=sum"]), tmp_path)
    with pytest.raises(ConfigError, match=r'reduction: \(unset\) -> "sum"'):
        check_resumable(changed)


def test_a_run_that_failed_before_starting_accepts_the_corrected_command(tmp_path):
    from iq_lightning.errors import DataError

    bad, good = tmp_path / "bad.jsonl", tmp_path / "good.jsonl"
    bad.write_text("{oops\n")
    good.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(8)))
    run_dir = tmp_path / "run"
    common = ["epochs=1", "logger=none", "save_final=false", "data=local", "val.every_n_epochs=0"]
    with pytest.raises(DataError):
        _run(run_dir, *common, f"data.path={bad}")
    assert not (run_dir / "run_fingerprint.json").exists()
    assert _run(run_dir, *common, f"data.path={good}").trainer.global_step == 2


def test_last_checkpoint_is_the_newest_complete_epoch_not_the_link(tmp_path):
    from iq_lightning.run import last_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir(parents=True)
    assert last_checkpoint(tmp_path) is None
    for name in ("epoch000.ckpt", "epoch001.ckpt"):
        (ckpts / name).write_bytes(b"x")
    (ckpts / "epoch002.ckpt.tmp").write_bytes(b"half")  # a kill mid-write
    (ckpts / "last.ckpt").symlink_to("epoch000.ckpt")  # a kill before the link's update
    assert last_checkpoint(tmp_path) == ckpts / "epoch001.ckpt"
    (ckpts / "epoch010.ckpt").mkdir()  # sharded strategies write directories
    assert last_checkpoint(tmp_path) == ckpts / "epoch010.ckpt"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, caplog):
    """B5/B6: the manifest holds the SHA-256 of the bytes torch.save streamed; a resume takes the
    newest checkpoint whose file still hashes to it, and says in one line which it skipped."""
    from iq_lightning.callbacks import resumable_checkpoint
    from iq_lightning.checkpoint_io import StreamingCheckpointIO, digests_of, manifest_path

    writer = StreamingCheckpointIO()
    for epoch in (0, 1):
        path = tmp_path / f"epoch{epoch:03d}.ckpt"
        writer.save_checkpoint({"w": torch.full((5000,), float(epoch))}, path)
        assert digests_of(path) == {"": writer.digests[str(path)]}  # streamed digest == the file's
        manifest_path(path).write_text(json.dumps({"files": digests_of(path)}))
    assert resumable_checkpoint(tmp_path) == tmp_path / "epoch001.ckpt"
    newest = tmp_path / "epoch001.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit, inside the tensor's bytes
    newest.write_bytes(bytes(data))
    assert not torch.equal(torch.load(newest)["w"], torch.full((5000,), 1.0))  # torch.load takes it silently
    with caplog.at_level("WARNING", logger="iq_lightning.callbacks"):
        assert resumable_checkpoint(tmp_path) == tmp_path / "epoch000.ckpt"
    [record] = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert record.getMessage() == (
        f"skipped the checkpoint {newest}: the SHA-256 of epoch001.ckpt differs from the one recorded when it was written "
        "(damaged or cut short); resuming from epoch000.ckpt"
    )
    newest.write_bytes(bytes(data[:100]))  # cut short
    assert resumable_checkpoint(tmp_path) == tmp_path / "epoch000.ckpt"


def test_a_sharded_checkpoint_from_elsewhere_is_refused_in_one_line(tmp_path):
    """B15: DeepSpeed's engine and torch.distributed.checkpoint unpickle a sharded checkpoint, so a
    run directory received from elsewhere could run code on resume. A directory checkpoint must
    carry a manifest signed with this user's key; its files must still hash to it."""
    import pickle

    from iq_lightning.callbacks import resumable_checkpoint
    from iq_lightning.checkpoint_io import Untrusted, digests_of, manifest_path, manifest_text

    mine, theirs = tmp_path / "mine.key", tmp_path / "theirs.key"
    checkpoints = tmp_path / "checkpoints"
    sharded = checkpoints / "epoch001.ckpt"
    (sharded / "checkpoint").mkdir(parents=True)
    (sharded / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"shard")
    (sharded / ".metadata").write_bytes(pickle.dumps({"plan": 1}))
    manifest_path(sharded).write_text(manifest_text(digests_of(sharded), mine))
    assert resumable_checkpoint(checkpoints, mine) == sharded
    assert mine.stat().st_mode & 0o777 == 0o600
    with pytest.raises(Untrusted, match="not signed with this user's key"):
        resumable_checkpoint(checkpoints, theirs)  # the same directory, on another user's machine
    (sharded / ".metadata").write_bytes(b"cos\nsystem\n(S'echo owned'\ntR.")  # a planted payload
    assert resumable_checkpoint(checkpoints, mine) is None  # its bytes differ from the signed ones: skipped
    manifest_path(sharded).write_text(json.dumps({"files": digests_of(sharded)}))  # re-hashed, unsigned
    with pytest.raises(Untrusted, match="not signed with this user's key"):
        resumable_checkpoint(checkpoints, mine)
    manifest_path(sharded).unlink()
    with pytest.raises(Untrusted, match="carries no signed manifest"):
        resumable_checkpoint(checkpoints, mine)


def _metric_keys(run_dir: Path) -> list[tuple]:
    """(epoch, step, the metrics it holds) of every row of metrics.csv."""
    import csv

    rows = csv.DictReader(open(run_dir / "metrics" / "metrics.csv", newline=""))
    return [(r["epoch"], r["step"], tuple(sorted(k for k, v in r.items() if v and k not in ("epoch", "step")))) for r in rows]


def test_moved_run_directory_resumes_twice_without_retraining(tmp_path):
    first = tmp_path / "first"
    _run(first, "epochs=1", "logger=csv", "save_final=false", "val.every_n_epochs=0")
    moved = tmp_path / "moved"
    first.rename(moved)
    _run(moved, "epochs=2", "logger=csv", "save_final=false", "val.every_n_epochs=0")
    third = _run(moved, "epochs=3", "logger=csv", "save_final=false", "val.every_n_epochs=0")
    assert third.trainer.global_step == 6
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["epoch002.ckpt", "epoch002.ckpt.sha256", "last.ckpt"]
    assert (moved / "checkpoints" / "last.ckpt").resolve() == (moved / "checkpoints" / "epoch002.ckpt")
    keys = _metric_keys(moved)
    assert len(keys) == len(set(keys))
    assert sorted(k[0] for k in keys if "train/loss_epoch" in k[2]) == ["0", "1", "2"]


def test_a_kill_before_the_link_update_resumes_from_the_newest_checkpoint(tmp_path):
    _run(tmp_path, "epochs=2", "logger=none", "save_final=false", "val.every_n_epochs=0")
    (tmp_path / "checkpoints" / "last.ckpt").unlink()  # as if killed between the rename and the link
    resumed = _run(tmp_path, "epochs=3", "logger=none", "save_final=false", "val.every_n_epochs=0")
    assert resumed.trainer.ckpt_path and resumed.trainer.ckpt_path.endswith("epoch001.ckpt")


def test_resume_never_resamples_a_finished_epoch(tmp_path):
    _run(tmp_path, "epochs=1", "logger=none", "save_final=false", "val.every_n_epochs=0")
    (tmp_path / "rollouts" / "epoch_000.jsonl").unlink()
    _run(tmp_path, "epochs=2", "logger=none", "save_final=false", "val.every_n_epochs=0")
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["epoch_001.jsonl"]


def test_metrics_rows_are_not_duplicated_by_a_resume_and_a_torn_line_is_dropped(tmp_path):
    import csv

    _run(tmp_path, "epochs=1", "logger=csv", "save_final=false")
    metrics = tmp_path / "metrics" / "metrics.csv"
    clean = _metric_keys(tmp_path)
    # As if killed during epoch 1 after logging two of its steps, the last one cut short.
    rows = list(csv.DictReader(open(metrics, newline="")))
    steps = [dict(r, epoch="1", step=str(2 + i)) for i, r in enumerate(r for r in rows if r["train/loss_step"])]
    with metrics.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writerows(steps)
    metrics.write_text(metrics.read_text() + "1,3,0.12")
    _run(tmp_path, "epochs=2", "logger=csv", "save_final=false")
    keys = _metric_keys(tmp_path)
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1]
    assert set(clean) < set(keys)
    assert {k[1] for k in keys if k[0] == "1" and "train/loss_step" in k[2]} == {"2", "3"}
    assert not metrics.read_text().endswith("0.12")


def test_wandb_steps_never_go_back_after_a_resume():
    from iq_lightning.tracking import WandbLogger

    class Experiment:
        def __init__(self):
            self.logged = []

        def log(self, row):
            self.logged.append(row)

    logger = WandbLogger(resume_step=5, offline=True)
    logger._experiment = Experiment()
    for step in (3, 4, 5, 6):
        logger.log_metrics({"train/loss_step": 0.1}, step=step)
    assert [r["trainer/global_step"] for r in logger._experiment.logged] == [5, 6]


def test_rollout_files_are_atomic_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno
    import os

    from iq_lightning import files as module
    from iq_lightning.errors import UserError
    from iq_lightning.rollouts import Rollout, TornRolloutsError, write_rollouts

    one = Rollout(0, "p", None, [{"role": "user", "content": "hi"}], [1], [2], "x", True, [-0.1], [-0.2], [-0.3])
    path = tmp_path / "epoch_000.jsonl"
    write_rollouts(path, [one])
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(module.os, "fsync", full)
    with pytest.raises(UserError, match="cannot write .*epoch_000.jsonl \\(No space left on device\\)"):
        write_rollouts(path, [one, one])
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["epoch_000.jsonl"]
    path.write_bytes(before + before[: len(before) // 2])  # a torn tail, cut outside the program
    with pytest.raises(TornRolloutsError, match="epoch_000.jsonl:2: not a rollout"):
        read_rollouts(path)


def test_a_chat_template_that_rejects_the_placement_is_a_config_error(tiny):
    from iq_lightning.data import EncodedPrompt, Prompt
    from iq_lightning.errors import ConfigError
    from iq_lightning.run import check_principle_prompt

    _, tokenizer = tiny
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m['content'] }}{% endfor %}"
    prompt = EncodedPrompt(Prompt("x", ({"role": "user", "content": "hi"},)), (1, 2))
    with pytest.raises(ConfigError, match="guide.placement=user"):
        check_principle_prompt(strict, "Be kind.", "system", prompt)
    check_principle_prompt(strict, "Be kind.", "user", prompt)


@pytest.mark.parametrize("extra", [["model.gradient_checkpointing=true"], ["precision=bf16-mixed"], ["model.gradient_checkpointing=true", "model.lora.enabled=true"]])
def test_precision_and_gradient_checkpointing_train(tmp_path, extra):
    result = _run(tmp_path, "epochs=1", "logger=none", "save_final=false", *extra)
    assert result.trainer.global_step == 2
    initial = build_tiny(TinySpec())[0].state_dict()
    trainable = [(n.removeprefix("base_model.model."), p) for n, p in result.module.policy.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        if name in initial:
            assert not torch.equal(p.detach(), initial[name]), name
        else:  # LoRA: B starts at zero
            assert "lora_A" in name or p.abs().sum() > 0, name
    if "model.gradient_checkpointing=true" in extra:
        base = result.module.policy
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        assert base.is_gradient_checkpointing


def test_vllm_options_that_change_the_samples_or_the_prompts_are_compared_on_restart(tmp_path):
    """sampler.options.* was allowed to change wholesale: max_model_len decides which prompts are
    kept (data.fit_context), dtype the sampling precision, engine_kwargs anything vLLM takes; only
    the engine's memory and speed settings may change when a run is continued."""
    from iq_lightning.run import restart_settings

    settings = restart_settings(build_run_config(compose(TINY + ["sampler=vllm"]), tmp_path))
    assert {"sampler.options.max_model_len", "sampler.options.dtype"} <= set(settings)
    assert not {"sampler.options.gpu_memory_utilization", "sampler.options.kv_cache_gib", "sampler.options.enable_sleep_mode",
                "sampler.options.enforce_eager", "sampler.options.max_num_batched_tokens"} & set(settings)


def test_a_vllm_run_recorded_before_its_options_were_compared_resumes_at_their_defaults(tmp_path):
    from iq_lightning.errors import ConfigError
    from iq_lightning.run import FINGERPRINT_FILE, check_resumable, restart_settings

    run = build_run_config(compose(TINY + ["sampler=vllm"]), tmp_path)
    older = {k: v for k, v in restart_settings(run).items() if not k.startswith("sampler.options.")}
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps({"settings": older}))
    check_resumable(run)
    with pytest.raises(ConfigError, match=r"sampler.options.max_model_len: \(unset\) -> 512"):
        check_resumable(build_run_config(compose(TINY + ["sampler=vllm", "sampler.options.max_model_len=512"]), tmp_path))
