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
    for name in ("train/loss_epoch", "train/loss_token_mean", "train/kl_policy_pi_hat", "train/log_ratio_mean",
                 "train/credit_mean", "train/response_length", "time/weight_sync_s", "time/sample_s",
                 "time/score_s", "time/train_s"):
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
    with pytest.raises(ConfigError, match="different alpha"):
        _run(tmp_path, "epochs=2", "logger=none", "alpha=1.0")


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
