"""Held-out validation (iq_lightning/validation.py): the exact KL and NLL figures against an
independent float64 computation, epoch -1 against a direct computation on the untrained policy,
and the files, columns and epochs a tiny run writes."""

import csv
import json

import pytest
import torch

from conftest import compose
from iq_lightning.config import TinySpec, build_run_config
from iq_lightning.models import build_tiny, frozen_copy
from iq_lightning.run import held_out_prompts, train
from iq_lightning.validation import AnswerFigures, answer_figures, read_summary, summarize

TINY = ["model=tiny", "lr=1e-4", "samples_per_epoch=8", "micro_batch_size=4", "sampler.max_new_tokens=8", "alpha=3.0", "logger=csv", "save_final=false"]


def test_answer_figures_against_float64():
    torch.manual_seed(0)
    answer, w, l = (torch.randn(2, 3, 7) * 3 for _ in range(3))
    tokens = torch.tensor([[1, 4, 6], [2, 0, 5]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    alpha = 1.5
    got = answer_figures(answer, w, l, tokens, mask, alpha)

    a, w64, l64 = answer.double(), w.double(), l.double()
    log_w = w64 - w64.logsumexp(-1, keepdim=True)
    log_l = l64 - l64.logsumexp(-1, keepdim=True)
    z = alpha * log_w + (1 - alpha) * log_l
    log_hat = z - z.logsumexp(-1, keepdim=True)
    log_p = a - a.logsumexp(-1, keepdim=True)
    for b in range(2):
        n = int(mask[b].sum())
        kl_hat = sum(float((log_p[b, t].exp() * (log_p[b, t] - log_hat[b, t])).sum()) for t in range(n)) / n
        kl_w = sum(float((log_p[b, t].exp() * (log_p[b, t] - log_w[b, t])).sum()) for t in range(n)) / n
        nll = -sum(float(log_w[b, t, tokens[b, t]]) for t in range(n)) / n
        assert float(got["kl_pi_hat"][b]) == pytest.approx(kl_hat, abs=1e-5)
        assert float(got["kl_pi_w"][b]) == pytest.approx(kl_w, abs=1e-5)
        assert float(got["nll_w"][b]) == pytest.approx(nll, abs=1e-5)
        assert kl_hat > 0.1  # the check can fail: far from zero on random logits


def test_summaries_weight_token_figures_by_tokens_and_answers_equally():
    rows = [
        AnswerFigures("a", "p", "x", 1, kl_pi_hat=1.0, kl_pi_w=0.0, nll_w=2.0, repetition=0.5, passes=True),
        AnswerFigures("b", "p", "y", 3, kl_pi_hat=3.0, kl_pi_w=1.0, nll_w=4.0, repetition=0.0, passes=False),
    ]
    s = summarize(rows)
    assert s["kl_pi_hat_exact_heldout"] == pytest.approx((1 * 1 + 3 * 3) / 4)
    assert s["nll_w"] == pytest.approx((2 + 12) / 4)
    assert s["repetition"] == 0.25 and s["length"] == 2.0 and s["principle_rate"] == 0.5 and s["answers"] == 2
    unchecked = [AnswerFigures("a", "p", "x", 1, 1.0, 0.0, 2.0, 0.0, None)]
    assert "principle_rate" not in summarize(unchecked)


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("val")
    cfg = compose(TINY + ["epochs=3", "val.every_n_epochs=2", "val.prompts=6", "val.batch_size=4"])
    return train(build_run_config(cfg, run_dir), show_progress=False)


def test_validation_runs_before_training_every_n_epochs_and_after_the_last(validated_run):
    run_dir = validated_run.run_dir
    files = sorted(p.name for p in (run_dir / "validation").glob("epoch_*.jsonl"))
    assert files == ["epoch_-01.jsonl", "epoch_001.jsonl", "epoch_002.jsonl"]
    for name in files:
        rows = [json.loads(line) for line in (run_dir / "validation" / name).read_text().splitlines()]
        assert len(rows) == 6 and len({r["prompt_id"] for r in rows}) == 6
        assert all(r["passes"] is False for r in rows)  # the random tiny model writes no French
    summary = read_summary(run_dir)
    assert [(r["epoch"], r["who"]) for r in summary] == [(-1, "policy"), (-1, "teacher"), (1, "policy"), (2, "policy")]
    assert [r["answers"] for r in summary] == [6, 6, 6, 6]  # n of the principle rate's interval
    metrics = list(csv.DictReader(open(run_dir / "metrics" / "metrics.csv")))
    val_rows = [r for r in metrics if r.get("val/kl_pi_hat_exact_heldout")]
    assert [int(r["epoch"]) for r in val_rows] == [-1, 1, 2]
    for key in ("val/kl_pi_w", "val/nll_w", "val/repetition", "val/length", "val/truncated", "val/principle_rate"):
        assert all(r[key] != "" for r in val_rows), key
    assert [r["val_teacher/nll_w"] != "" for r in val_rows] == [True, False, False]
    assert (run_dir / "plots" / "validation.png").stat().st_size > 10_000


def test_epoch_minus_one_equals_a_direct_computation_on_the_untrained_policy(validated_run):
    """Independently of the callback: the untrained policy's greedy answers to the same held-out
    prompts, scored with a fresh guide, give the logged epoch -1 figures."""
    from iq_lightning.guides import PrincipleGuide
    from iq_lightning.samplers.base import SamplingParams
    from iq_lightning.samplers.hf import HFSampler
    from iq_lightning.text_quality import mean_nll, per_token_kl

    run = build_run_config(compose(TINY + ["epochs=3", "val.prompts=6"]), validated_run.run_dir)
    policy, tokenizer = build_tiny(TinySpec())
    guide = PrincipleGuide(frozen_copy(policy), tokenizer, run.guide.principle, run.guide.placement, run.train.alpha, show_progress=False)
    prompts, _ = held_out_prompts(run, tokenizer, [])
    sampler = HFSampler(8, [tokenizer.eos_token_id], tokenizer.pad_token_id, show_progress=False)
    answers = [g.response_ids for g in sampler.generate(policy, [p.input_ids for p in prompts], SamplingParams(8, 0.0, 1.0, 0))]
    from iq_lightning.forward import pack, response_logits
    from iq_lightning.logprobs import token_logprobs
    from iq_lightning.objective import estimated_optimal_logprobs

    with torch.no_grad():
        logits_w, logits_l, ids = guide._guide_logits(prompts, answers)
        mine = response_logits(policy, pack([p.input_ids for p in prompts], answers, tokenizer.pad_token_id))
    mask = pack([p.input_ids for p in prompts], answers, tokenizer.pad_token_id)["response_mask"]
    tokens = mask.sum()
    kl_hat = float((per_token_kl(mine, estimated_optimal_logprobs(logits_w, logits_l, run.train.alpha)) * mask).sum() / tokens)
    nll = float((mean_nll(token_logprobs(logits_w, ids), mask) * mask.sum(-1)).sum() / tokens)
    logged = next(r for r in read_summary(validated_run.run_dir) if r["epoch"] == -1 and r["who"] == "policy")
    assert logged["kl_pi_hat_exact_heldout"] == pytest.approx(kl_hat, abs=1e-5)
    assert logged["nll_w"] == pytest.approx(nll, abs=1e-5)
    assert logged["length"] == pytest.approx(float(tokens) / len(prompts))
    trained = next(r for r in read_summary(validated_run.run_dir) if r["epoch"] == 2)
    assert trained["kl_pi_hat_exact_heldout"] != logged["kl_pi_hat_exact_heldout"]  # the policy moved


def test_summaries_without_a_count_get_it_from_their_answer_files(tmp_path):
    """Runs written before `answers` was recorded still get intervals on their rate plot."""
    out = tmp_path / "validation"
    out.mkdir()
    (out / "summary.jsonl").write_text(json.dumps({"epoch": 0, "who": "policy", "principle_rate": 0.5}) + "\n" + '{"epoch": 1, "who"')
    (out / "epoch_000.jsonl").write_text("{}\n{}\n{}\n{}\n")
    assert read_summary(tmp_path) == [{"epoch": 0, "who": "policy", "principle_rate": 0.5, "answers": 4}]


def test_a_torn_summary_line_is_cut_before_the_next_append(tmp_path):
    """A kill mid-append leaves a torn last line; the next validation's row must not be glued to it."""
    from types import SimpleNamespace

    from iq_lightning.principle_check import build_check
    from iq_lightning.validation import Validation

    _, tokenizer = build_tiny(TinySpec())
    v = Validation(tmp_path, [], tokenizer, build_check({"kind": "none"}, None), 1.0, 1, 4, 0.0, 2, [0], 0, False)
    out = tmp_path / "validation"
    out.mkdir()
    (out / "summary.jsonl").write_text(json.dumps({"epoch": -1, "who": "policy", "length": 3.0}) + "\n" + '{"epoch": 0, "who": "pol')
    row = AnswerFigures("a", "p", "x", 2, kl_pi_hat=1.0, kl_pi_w=0.5, nll_w=2.0, repetition=0.0, passes=None)
    v._report(SimpleNamespace(loggers=[], global_step=3), 1, [row], None, 0.1)
    lines = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["who"]) for r in lines] == [(-1, "policy"), (1, "policy")]


def test_resume_does_not_validate_the_base_again_and_off_means_off(tmp_path):
    train(build_run_config(compose(TINY + ["epochs=1", "val.prompts=2"]), tmp_path), show_progress=False)
    train(build_run_config(compose(TINY + ["epochs=2", "val.prompts=2"]), tmp_path), show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "validation" / "summary.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["who"]) for r in lines] == [(-1, "policy"), (-1, "teacher"), (0, "policy"), (1, "policy")]
    off = tmp_path / "off"
    train(build_run_config(compose(TINY + ["epochs=1", "val.every_n_epochs=0"]), off), show_progress=False)
    assert not (off / "validation").exists()


def test_data_without_a_split_holds_prompts_out_of_training(tmp_path):
    from iq_lightning.data import prepare_prompts
    from iq_lightning.errors import ConfigError

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}?"}) + "\n" for i in range(10)))
    run = build_run_config(compose(TINY + ["data=local", f"data.path={data}", "val.prompts=3"]), tmp_path)
    _, tokenizer = build_tiny(TinySpec())
    training, _ = prepare_prompts(run.data, tokenizer)
    held, left = held_out_prompts(run, tokenizer, training)
    assert len(held) == 3 and len(left) == 7
    assert {p.prompt.id for p in held}.isdisjoint({p.prompt.id for p in left})
    # Some rows in both: ambiguous, refused.
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"q {i}?", "split": "test" if i < 2 else "train"}) + "\n" for i in range(10)))
    with pytest.raises(ConfigError, match="also training prompts"):
        held_out_prompts(run, tokenizer, training)


def test_sweep_plot_reads_each_runs_final_figures(tmp_path):
    from iq_lightning.validation_plots import main, sweep_points

    for i, alpha in enumerate((1.4, 1.0)):
        run = tmp_path / f"{i}_alpha={alpha}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(f"alpha: {alpha}\n")
        (run / "validation").mkdir()
        rows = [{"epoch": -1, "who": "policy", "nll_w": 2.0, "principle_rate": 0.0}, {"epoch": -1, "who": "teacher", "nll_w": 0.9, "principle_rate": 0.6},
                {"epoch": 0, "who": "policy", "nll_w": 1.0 + alpha, "principle_rate": alpha / 2}]
        (run / "validation" / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')
    points = sweep_points(tmp_path)
    assert [p["alpha"] for p in points] == [1.0, 1.4]
    assert [p["final"]["principle_rate"] for p in points] == [0.5, 0.7] and points[0]["teacher"]["nll_w"] == 0.9
    main([str(tmp_path)])
    assert (tmp_path / "plots" / "alpha_sweep_validation.png").stat().st_size > 10_000


def test_answerers_that_are_a_guide_reuse_its_logits_exactly(tmp_path, monkeypatch):
    """The teacher (the guide model given x_w) and the untrained policy (pi_l given x) skip their
    own forward over the answers: the figures equal those of that forward, and it is not run."""
    import iq_lightning.validation as validation
    from iq_lightning.guides import PrincipleGuide
    from iq_lightning.principle_check import build_check

    run = build_run_config(compose(TINY + ["val.prompts=6"]), tmp_path)
    policy, tokenizer = build_tiny(TinySpec())
    guide = PrincipleGuide(frozen_copy(policy), tokenizer, run.guide.principle, run.guide.placement, 1.5, batch_size=4, show_progress=False)
    prompts, _ = held_out_prompts(run, tokenizer, [])
    v = validation.Validation(tmp_path, prompts, tokenizer, build_check({"kind": "none"}, None), 1.5, 1, 8, 0.0, 4, [tokenizer.eos_token_id], 0, False)
    share = v._share(0, 1)
    cases = {"l": (policy, [p.input_ids for p, _ in share]), "w": (guide.model, [guide.winner_prompt_ids(p) for p, _ in share])}
    for is_guide, (answerer, answer_prompts) in cases.items():
        computed = v._measure(answerer, answer_prompts, guide, share)
        calls = []
        real = validation.response_logits
        monkeypatch.setattr(validation, "response_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
        reused = v._measure(answerer, answer_prompts, guide, share, is_guide=is_guide)
        monkeypatch.setattr(validation, "response_logits", real)
        assert calls == [], is_guide
        assert [r.answer for r in reused] == [r.answer for r in computed] and len(reused) == 6
        for a, b in zip(reused, computed):
            assert (a.kl_pi_hat, a.kl_pi_w, a.nll_w) == pytest.approx((b.kl_pi_hat, b.kl_pi_w, b.nll_w), abs=1e-6), is_guide
    assert computed[0].kl_pi_w == pytest.approx(0.0, abs=1e-6)  # the teacher is pi_w: the check above compares something real
    assert validation._is_lesser_guide(policy, guide.model)
    assert not validation._is_lesser_guide(policy, frozen_copy(policy).to(torch.bfloat16))
