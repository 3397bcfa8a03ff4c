"""objective=ppo (objectives.PPO): the paper's PPO baseline with the guides' contrastive reward.
It trains end to end (policy and value head move, finite); one step's policy and value losses
equal an independent float64 computation (per-sequence forwards, GAE by a loop); a resumed run
restores the value head bitwise; the samples' contrastive reward rises."""

import csv
import json

import pytest
import torch

from conftest import compose
from iq_lightning.config import TinySpec
from iq_lightning.errors import ConfigError
from iq_lightning.models import build_tiny
from iq_lightning.objectives import PPO
from iq_lightning.rollouts import Rollout, collate, read_rollouts
from iq_lightning.run import configure, train
from test_objectives import TINY as OBJECTIVE_RUN

TINY = [*OBJECTIVE_RUN, "objective=ppo"]  # the same tiny runs as the other objectives'


def _run(tmp, *extra):
    return train(configure(compose(TINY + list(extra)), tmp), show_progress=False)


def _epoch_figures(run_dir, key):
    rows = list(csv.DictReader((run_dir / "metrics" / "metrics.csv").open()))
    return [float(row[key]) for row in rows if row.get(key)]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ppo")
    return _run(run_dir, "epochs=2", "logger=csv")


def test_ppo_trains_the_policy_and_its_value_head_end_to_end(ppo_run):
    module = ppo_run.module
    initial, _ = build_tiny(TinySpec())
    moved = max((a.detach() - b).abs().max().item() for a, b in zip(module.policy.parameters(), initial.parameters()))
    assert moved > 1e-4, moved
    head = module.heads
    assert head is module.objective.value_head and head.weight.abs().max().item() > 1e-4  # zero-initialised, trained
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert "heads.weight" in module.state_dict()
    assert (ppo_run.run_dir / "final" / "config.json").exists()
    assert ppo_run.trainer.global_step == 2 * 4 * 2  # 2 epochs x 4 PPO passes (ppo.yaml) x 2 micro-batches
    header = (ppo_run.run_dir / "metrics" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/ppo_policy_loss", "train/ppo_value_loss", "train/ppo_clip_fraction", "ppo/contrastive_reward", "train/kl_pi_hat_est_rollouts"):
        assert key in header, key
    # The policy that drew the samples is the one the old log-probs come from (temperature 1).
    assert max(_epoch_figures(ppo_run.run_dir, "ppo/sampler_logprob_gap")) < 1e-4
    rollouts = read_rollouts(ppo_run.run_dir / "rollouts" / "epoch_001.jsonl")
    assert all(len(r.winner_logprobs) == len(r.response_ids) for r in rollouts)


def _sequence_forward(model, rollout):
    """float64 log pi(y_t) and last hidden states of one prompt + response, no padding, no cache."""
    ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
    p, n = len(rollout.prompt_ids), len(rollout.response_ids)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-1][0, p - 1 : p + n - 1]
        logits = out.logits[0, p - 1 : p + n - 1]
        # hidden_states[-1] is what the output projection reads (after the final norm)
        torch.testing.assert_close(model.get_output_embeddings()(hidden), logits, atol=1e-4, rtol=1e-4)
    logp = logits.double().log_softmax(-1).gather(-1, ids[0, p:, None])[:, 0]
    return logp, hidden.double()


def test_ppo_step_equals_an_independent_computation(ppo_run):
    rollouts = read_rollouts(ppo_run.run_dir / "rollouts" / "epoch_000.jsonl")[:4]
    old_policy, tokenizer = build_tiny(TinySpec())
    new_policy = ppo_run.module.policy  # trained two epochs: ratios far from 1, some clipped
    kl_coef, clip, vclip, vf_coef, gamma, lam = 0.3, 0.2, 0.05, 0.1, 0.9, 0.8
    objective = PPO(kl_coef, clip, vclip, vf_coef, gamma, lam)
    head = objective.make_heads(old_policy)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.1)
        head.bias.fill_(0.05)
    old_w, old_b = head.weight.detach().double().clone(), head.bias.detach().double().clone()
    per_token, figures = objective.prepare_epoch(old_policy, rollouts, tokenizer.pad_token_id, micro_batch_size=3)
    with torch.no_grad():
        head.weight.add_(torch.randn(head.weight.shape, generator=generator) * 0.05)  # the value head moved too
    new_w, new_b = head.weight.detach().double(), head.bias.detach().double()
    batch = collate(rollouts, tokenizer.pad_token_id, per_token)
    step = objective.step(new_policy, batch, guide=None)

    # Independent: per sequence, float64, GAE by a loop over tokens.
    advantages, returns, old_values, old_logps, new_logps, new_values = [], [], [], [], [], []
    rewards = []
    for r in rollouts:
        old_logp, old_h = _sequence_forward(old_policy, r)
        new_logp, new_h = _sequence_forward(new_policy, r)
        v_old = old_h @ old_w[0] + old_b[0]
        winner, ref = torch.tensor(r.winner_logprobs, dtype=torch.float64), torch.tensor(r.ref_logprobs, dtype=torch.float64)
        reward = (winner - ref).sum()
        rewards.append(reward)
        n = len(r.response_ids)
        adv, running = torch.zeros(n, dtype=torch.float64), 0.0
        for t in reversed(range(n)):
            r_t = -kl_coef * (old_logp[t] - ref[t]) + (reward if t == n - 1 else 0.0)
            next_value = v_old[t + 1] if t + 1 < n else 0.0
            running = r_t + gamma * next_value - v_old[t] + gamma * lam * running
            adv[t] = running
        advantages.append(adv)
        returns.append(adv + v_old)
        old_values.append(v_old)
        old_logps.append(old_logp)
        new_logps.append(new_logp)
        new_values.append(new_h @ new_w[0] + new_b[0])
    adv = torch.cat(advantages)
    adv = (adv - adv.mean()) / torch.sqrt(adv.var(unbiased=True) + 1e-8)
    ratio = torch.exp(torch.cat(new_logps) - torch.cat(old_logps))
    policy_loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
    v, v_old, g = torch.cat(new_values), torch.cat(old_values), torch.cat(returns)
    v_clipped = v_old + (v - v_old).clamp(-vclip, vclip)
    value_loss = 0.5 * torch.maximum((v - g) ** 2, (v_clipped - g) ** 2).mean()

    assert step.figures["ppo_policy_loss"].item() == pytest.approx(policy_loss.item(), rel=1e-4, abs=1e-6)
    assert step.figures["ppo_value_loss"].item() == pytest.approx(value_loss.item(), rel=1e-4, abs=1e-6)
    assert step.loss.item() == pytest.approx((policy_loss + vf_coef * value_loss).item(), rel=1e-4, abs=1e-6)
    assert figures["ppo/contrastive_reward"] == pytest.approx(torch.stack(rewards).mean().item(), rel=1e-4, abs=1e-6)
    # The check can fail: clipping is active on both sides, and the losses are not trivially small.
    assert 0 < step.figures["ppo_clip_fraction"].item() < 1 and 0 < step.figures["ppo_value_clip_fraction"].item() < 1
    assert abs(policy_loss.item()) > 1e-3 and value_loss.item() > 1e-3
    # Gradients reach the policy and the value head.
    step.loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_resume_restores_the_value_head_bitwise(tmp_path):
    straight = _run(tmp_path / "straight", "epochs=2", "logger=none", "save_final=false")
    first = _run(tmp_path / "resumed", "epochs=1", "logger=none", "save_final=false")
    after_one = first.module.heads.weight.detach().clone()
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "epoch000.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(saved["heads.weight"], after_one) and after_one.abs().max() > 0
    resumed = _run(tmp_path / "resumed", "epochs=2", "logger=none", "save_final=false")
    assert resumed.trainer.global_step == straight.trainer.global_step
    for name, value in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], value), name


def test_ppo_raises_the_contrastive_reward_of_its_samples(tmp_path):
    """Without the KL penalty (whose pull to pi_ref dominates the tiny model's small rewards) the
    reward of the policy's own samples rises: epochs 5-6 above epoch 1 (about 0.19 against 0.01)."""
    _run(tmp_path, "epochs=6", "samples_per_epoch=16", "sampler.batch_size=16", "objective.kl_coef=0", "logger=csv", "save_final=false")
    reward = _epoch_figures(tmp_path, "ppo/contrastive_reward")
    assert len(reward) == 6
    assert sum(reward[-2:]) / 2 > reward[0] + 0.05, reward


def test_the_ppo_config_and_its_mistakes(tmp_path):
    run = configure(compose(TINY), tmp_path)
    assert (run.objective.name, run.train.passes_per_epoch, run.objective.kl_coef) == ("ppo", 4, None)
    assert PPO.from_spec(run.objective, run.train.alpha, run.train.reduction).kl_coef == pytest.approx(1 / 3)
    assert configure(compose(TINY + ["passes_per_epoch=2"]), tmp_path).train.passes_per_epoch == 2
    assert configure(compose([o for o in TINY if o != "objective=ppo"]), tmp_path).train.passes_per_epoch == 1
    with pytest.raises(ConfigError, match="objective=ppo does not run under strategy=fsdp"):
        configure(compose(TINY + ["strategy=fsdp"]), tmp_path)
    with pytest.raises(ConfigError, match="objective=ppo does not run under strategy=deepspeed_zero3"):
        configure(compose(TINY + ["strategy=deepspeed_zero3"]), tmp_path)
    configure(compose(TINY + ["strategy=ddp"]), tmp_path)
    with pytest.raises(ConfigError, match="objective.clip_range must be > 0"):
        configure(compose(TINY + ["objective.clip_range=0"]), tmp_path)
    with pytest.raises(ConfigError, match="alpha is 0"):
        configure(compose(TINY + ["alpha=0"]), tmp_path)


def test_rollouts_without_winner_logprobs_load_and_are_written_as_before(tmp_path):
    old = {
        "epoch": 0, "prompt_id": "a", "category": None, "messages": [], "prompt_ids": [1, 2], "response_ids": [3],
        "response_text": "x", "finished": True, "sampling_logprobs": [-1.0], "target_logprobs": [-1.0], "ref_logprobs": [-1.0],
    }
    rollout = Rollout(**old)
    assert rollout.winner_logprobs == [] and rollout.record() == old  # an inverse_q file is unchanged
    assert "winner_logprobs" not in collate([rollout], 0)
    with pytest.raises(ValueError, match="winner_logprobs"):
        Rollout(**{**old, "winner_logprobs": [-1.0, -2.0]})
    assert json.loads(json.dumps(Rollout(**{**old, "winner_logprobs": [-0.5]}).record()))["winner_logprobs"] == [-0.5]


def test_ppo_under_ddp_two_processes(tmp_path):
    """The value head is a submodule of the LightningModule: DDP syncs its gradients with the
    policy's (an unsynced or unused parameter would fail or hang here), and the checkpoint keeps it."""
    from test_cli import _train

    result = _train(
        tmp_path, "model=tiny", "objective=ppo", "strategy=ddp", "strategy.devices=2", "strategy.accelerator=cpu", "epochs=1",
        "samples_per_epoch=8", "micro_batch_size=4", "sampler.max_new_tokens=8", "alpha=3.0", "logger=csv", "passes_per_epoch=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [len(read_rollouts(tmp_path / "rollouts" / f"epoch_000.rank{r}.jsonl")) for r in (0, 1)] == [4, 4]
    state = torch.load(tmp_path / "checkpoints" / "epoch000.ckpt", weights_only=False)["state_dict"]
    assert torch.isfinite(state["heads.weight"]).all() and state["heads.weight"].abs().max() > 0
    assert _epoch_figures(tmp_path, "train/ppo_value_loss")


# --- a sequence-classification reward model (objective.reward_model) ----------------------------


def _reward_model(path, num_labels=1, own_tokenizer=True):
    """A tiny LlamaForSequenceClassification saved at `path`: with its own tokenizer (one more
    token, a plain chat template, so texts are re-rendered and re-tokenized) or the policy's."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from iq_lightning.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    if own_tokenizer:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|reward|>"]})
        tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=1024, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.mul_(50)  # rewards of order 1, not 0.02
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def test_ppo_with_a_reward_model_trains_on_its_scores_of_the_rendered_texts(tmp_path):
    """A reward model with its own tokenizer: each epoch's logged mean reward equals the reward model
    called independently, one text at a time, on the conversation re-rendered with its template."""
    model, tokenizer = _reward_model(tmp_path / "rm")
    result = _run(tmp_path / "run", "epochs=2", "logger=csv", f"objective.reward_model={tmp_path / 'rm'}")
    assert not result.module.objective.plan.winner_logprobs and not result.module.objective.reward.same_ids
    initial, _ = build_tiny(TinySpec())
    moved = max((a.detach() - b).abs().max().item() for a, b in zip(result.module.policy.parameters(), initial.parameters()))
    assert moved > 1e-4, moved
    logged = _epoch_figures(tmp_path / "run", "ppo/reward_model_score")
    assert len(logged) == 2 and not _epoch_figures(tmp_path / "run", "ppo/contrastive_reward")
    for epoch, mean in enumerate(logged):
        rollouts = read_rollouts(tmp_path / "run" / "rollouts" / f"epoch_{epoch:03d}.jsonl")
        assert all(not r.winner_logprobs for r in rollouts)  # the guides skipped log pi_w
        scores = []
        for r in rollouts:
            text = tokenizer.apply_chat_template([*r.messages, {"role": "assistant", "content": r.response_text}], tokenize=False)
            with torch.no_grad():
                scores.append(model(input_ids=torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])).logits[0, 0].item())
        assert mean == pytest.approx(sum(scores) / len(scores), rel=1e-4, abs=1e-5)
        assert max(scores) - min(scores) > 0.05  # the check can fail: the rewards differ by answer


def test_a_reward_model_sharing_the_policys_tokenizer_scores_the_ids_and_is_the_reward(ppo_run, tmp_path):
    """Same tokenizer: the reward model reads prompt + response ids (padded in a micro-batch of 3);
    with kl_coef 0, gamma = lambda = 1 and V = 0 every token's return is the sequence reward, which
    equals the reward model on that rollout's ids alone."""
    model, _ = _reward_model(tmp_path / "rm", own_tokenizer=False)
    rollouts = read_rollouts(ppo_run.run_dir / "rollouts" / "epoch_000.jsonl")[:4]
    policy, tokenizer = build_tiny(TinySpec())
    objective = PPO(0.0, gamma=1.0, lam=1.0, reward_model=str(tmp_path / "rm"))
    objective.make_heads(policy)
    objective.load_models(tokenizer, "cpu")
    assert objective.reward.same_ids
    rows, figures = objective.prepare_epoch(policy, rollouts, tokenizer.pad_token_id, micro_batch_size=3)
    assert len({len(r.prompt_ids) + len(r.response_ids) for r in rollouts}) > 1  # padding is exercised
    want = []
    for r, row in zip(rollouts, rows):
        with torch.no_grad():
            want.append(model(input_ids=torch.tensor([r.prompt_ids + r.response_ids])).logits[0, 0].item())
        assert row["returns"].tolist() == pytest.approx([want[-1]] * len(r.response_ids), abs=1e-5)
    assert figures["ppo/reward_model_score"] == pytest.approx(sum(want) / len(want), abs=1e-5)


def test_reward_model_mistakes_are_one_line_config_errors(tmp_path):
    _reward_model(tmp_path / "two", num_labels=2)
    with pytest.raises(ConfigError, match=r"^objective.reward_model=\S*two has num_labels=2; PPO needs a scalar reward model .*num_labels=1\)$"):
        configure(compose(TINY + [f"objective.reward_model={tmp_path / 'two'}"]), tmp_path)
    with pytest.raises(ConfigError, match=r"^objective.reward_model=\S*missing: no such model directory \(no config.json there\)$"):
        configure(compose(TINY + [f"objective.reward_model={tmp_path / 'missing'}"]), tmp_path)
    assert configure(compose(TINY), tmp_path).objective.reward_model is None  # default: the contrastive reward


def test_the_memory_plan_counts_the_reward_models_weights(tmp_path):
    from iq_lightning.memory_plan import plan_memory

    model, _ = _reward_model(tmp_path / "rm")
    run = configure(compose(TINY + [f"objective.reward_model={tmp_path / 'rm'}"]), tmp_path)
    (item,) = [i for i in plan_memory(run, 1, None, "cpu").items if i.name.startswith("reward model")]
    assert item.bytes == sum(p.numel() for p in model.parameters()) * 4  # float32 checkpoint
