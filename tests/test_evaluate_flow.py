"""evaluate.py end to end on tiny models, offline: trained runs, an alpha sweep directory, a
reward model; every table and plot is written, and a rerun is served from the caches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF, REPO, compose
from iq_lightning.config import build_run_config
from iq_lightning.run import train

TINY_TRAIN = ["model=tiny", "lr=1e-4", "samples_per_epoch=4", "micro_batch_size=2", "sampler.max_new_tokens=8", "logger=csv", "credit_maps_per_epoch=2"]
TINY_EVAL = ["model=tiny", "data.limit=6", "sampler.max_new_tokens=8", "elo.permutations=50"]


def compose_eval(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return hydra_compose(config_name="evaluate", overrides=overrides)


def _train_into(run_dir: Path, *overrides: str) -> Path:
    cfg = compose(TINY_TRAIN + list(overrides))
    train(build_run_config(cfg, run_dir), show_progress=False)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # as a Hydra multirun leaves it
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    sweep = root / "multirun"
    low = _train_into(sweep / "0_alpha=1.0", "alpha=1.0", "epochs=1")
    high = _train_into(sweep / "1_alpha=3.0", "alpha=3.0", "epochs=2", "save_epoch_policies=true")
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from iq_lightning.config import TinySpec
    from iq_lightning.models import build_tiny

    policy, tokenizer = build_tiny(TinySpec())
    config = LlamaConfig(**{**policy.config.to_dict(), "num_labels": 1, "pad_token_id": tokenizer.pad_token_id})
    reward_dir = root / "reward_model"
    LlamaForSequenceClassification(config).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    return {"root": root, "sweep": sweep, "low": low, "high": high, "reward": reward_dir}


def test_training_writes_credit_maps_and_epoch_policies(runs):
    high = runs["high"]
    for epoch in (0, 1):
        pages = sorted((high / "credit" / f"epoch_{epoch:03d}").glob("*.html"))
        assert len(pages) == 2 and "<span title=" in pages[0].read_text()
        assert (high / "policies" / f"epoch_{epoch:03d}" / "model.safetensors").is_file()
    assert not (runs["low"] / "policies").exists()


def test_evaluate_writes_every_table_and_plot_and_reuses_its_caches(runs, monkeypatch):
    from iq_lightning.evaluation.run import evaluate
    from iq_lightning.evaluation.spec import build_eval_spec

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = runs["root"] / "evaluation"
    overrides = TINY_EVAL + [
        "judge.batch_size=6",
        f"out_dir={out}",
        f"sweep_dir={runs['sweep']}",
        # Multirun directory names hold '=': Hydra needs such values quoted.
        f"+contestants.iq.run_dir='{runs['high']}'",
        f"reward.model={runs['reward']}",
        f"reward.run_dir='{runs['high']}'",
        f"reward.baseline_run_dir='{runs['low']}'",
        "credit_maps=2",
        "focus=iq",
        # 6 prompts: no category reaches the default 5 prompts a radar spoke needs
        "min_category_count=1",
        "elo.bootstrap=50",
    ]
    result = evaluate(build_eval_spec(compose_eval(overrides)), show_progress=False)

    for plot in ("win_rates", "win_rates_iq", "category_radar", "elo_curve", "alpha_sweep", "reward_curve"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 5000, plot
    contestants = ["sft", "prompting", "iq", "alpha=1", "alpha=3"]
    # all pairs of 5 contestants on 6 prompts
    assert len(result.judgments) == 10 * 6
    assert sorted(result.elo.players) == sorted(contestants)
    elo_rows = (out / "results" / "elo.csv").read_text().splitlines()
    assert len(elo_rows) == 1 + 5
    rates = (out / "results" / "win_rates.csv").read_text().splitlines()
    assert len(rates) == 1 + 10
    assert {line.split(",")[0] for line in (out / "results" / "win_rates_by_category.csv").read_text().splitlines()[1:]} >= {"advice"}
    assert sorted(result.reward_increments) == [0, 1, 2] and result.reward_increments[0] == 0.0
    for name in contestants:
        pages = sorted((out / "credit" / name).glob("*.html"))
        assert len(pages) == 2, name
    summary = (out / "results" / "summary.md").read_text()
    assert "| contestant | Elo" in summary and "95% CI over prompts" in summary
    # The judge is named and measured at the top; the tiny random judge fails, in words.
    assert summary.index("## Judge: tiny (likelihood judge)") < summary.index("## Judge-free figures") < summary.index("## Win rates")
    assert summary.startswith("# Evaluation\n\n> **UNRELIABLE JUDGE")
    assert result.judge_quality is not None and not result.judge_quality.reliable
    assert (out / "judge_checks.jsonl").is_file()
    header, *rows = (out / "results" / "win_rates.csv").read_text().splitlines()
    assert "win_low" in header and "significant" in header
    # Judge-free figures of every contestant, with the bundled principle's French check.
    free = (out / "results" / "judge_free.csv").read_text().splitlines()
    assert len(free) == 1 + 5 and all(",language=fr," in line for line in free[1:])
    assert sorted(f.contestant for f in result.judge_free) == sorted(contestants)
    assert all(f.nll_pi_w is not None and f.nll_pi_w > 0 for f in result.judge_free)
    assert (out / "plots" / "judge_free.png").stat().st_size > 5000
    assert result.elo_intervals is not None and sorted(result.elo_intervals.players) == sorted(contestants)
    assert list((out / "wandb").glob("offline-run-*")), "the evaluation is not in W&B"

    # A rerun generates and judges nothing: answers and verdicts come from out_dir.
    generations = {p: p.stat().st_mtime_ns for p in (out / "generations").glob("*.jsonl")}
    judged = (out / "judgments.jsonl").read_text().count("\n")
    import iq_lightning.evaluation.answers as answers_module

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    checks = (out / "judge_checks.jsonl").read_text()

    def no_model(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(answers_module, "generate_responses", no_generation)
    import iq_lightning.evaluation.run as run_module
    import iq_lightning.models as models_module

    # no judge, no pi_w for the NLLs: the judge's checks and the NLLs come from out_dir too
    monkeypatch.setattr(run_module, "load_model", no_model)
    monkeypatch.setattr(models_module, "load_model", no_model)
    again = evaluate(build_eval_spec(compose_eval(overrides + ["credit_maps=0", "reward.model=null", "reward.run_dir=null", "reward.baseline_run_dir=null"])), show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "generations").glob("*.jsonl")} == generations
    assert (out / "judgments.jsonl").read_text().count("\n") == judged
    assert (out / "judge_checks.jsonl").read_text() == checks
    assert [j.verdict for j in again.judgments] == [j.verdict for j in result.judgments]
    assert again.judge_quality.markdown() == result.judge_quality.markdown()  # (NaN != NaN: compared as text)
    assert [f.row() for f in again.judge_free] == [f.row() for f in result.judge_free]


def test_evaluate_mistakes_are_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), "model=tiny", "logger=none", f"out_dir={tmp_path}", "reference=nobody"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: reference='nobody' is not a contestant" in result.stderr


def test_a_key_for_a_plain_http_remote_judge_is_refused_before_anything_loads(tmp_path, monkeypatch):
    from iq_lightning.errors import ConfigError
    from iq_lightning.evaluation.spec import build_eval_spec

    monkeypatch.setenv("LAN_JUDGE_KEY", "k")
    overrides = TINY_EVAL + [f"out_dir={tmp_path}", "logger=none", "judge=openai", "judge.model=m", "judge.base_url=http://judge.lan:8000/v1"]
    build_eval_spec(compose_eval(overrides))  # no key named for it: none is sent, nothing to refuse
    with pytest.raises(ConfigError, match="would travel unencrypted to judge.lan"):
        build_eval_spec(compose_eval(overrides + ["judge.api_key_env=LAN_JUDGE_KEY"]))


@pytest.mark.vllm
def test_openai_judge_against_a_real_vllm_server_on_loopback(tmp_path, runs):
    """vLLM's OpenAI-compatible server serves the tiny model as judge; the key travels only
    through the environment; its verdict tokens are forced with vLLM's structured outputs, so a
    judge with a position preference shows up as an exact 50/50 after the swaps."""
    pytest.importorskip("vllm")
    import socket
    import time
    import urllib.request

    from iq_lightning.config import TinySpec
    from iq_lightning.evaluation.run import evaluate
    from iq_lightning.evaluation.spec import build_eval_spec
    from iq_lightning.models import build_tiny, export_pretrained

    model_dir = export_pretrained(*build_tiny(TinySpec()), tmp_path / "judge_model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "sk-iq-test-not-a-real-key"
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", "judge",
         "--host", "127.0.0.1", "--port", str(port), "--api-key", secret, "--dtype", "float32", "--max-model-len", "1024",
         "--enforce-eager", "--kv-cache-memory-bytes", str(256 * 2**20)],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
    )
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "vLLM server did not start"
                time.sleep(1)
        os.environ["IQ_TEST_JUDGE_KEY"] = secret
        out = tmp_path / "eval"
        overrides = TINY_EVAL + [
            f"out_dir={out}", "logger=none", "credit_maps=0", "judge=openai", "judge.model=judge",
            f"judge.base_url=http://127.0.0.1:{port}/v1", "judge.api_key_env=IQ_TEST_JUDGE_KEY", "judge.max_tokens=8",
            "data.limit=8", "judge.criteria='Pick the better answer.'", "+judge.extra_body.structured_outputs.choice=[\"[[A]]\",\"[[B]]\",\"[[C]]\"]",
        ]
        result = evaluate(build_eval_spec(compose_eval(overrides)), show_progress=False)
        verdicts = [j.verdict for j in result.judgments]
        assert len(verdicts) == 8 and "invalid" not in verdicts
        assert all(j.raw in ("[[A]]", "[[B]]", "[[C]]") for j in result.judgments)
        rate = result.rates[("sft", "prompting")]
        shown_first = sum(1 for j in result.judgments if (j.verdict == "A") != j.swapped)
        # The greedy random tiny judge prefers a position, not a contestant: the swaps cancel it.
        assert shown_first in (0, 8)
        assert (rate.wins, rate.losses) == (4, 4)
        for path in out.rglob("*"):
            if path.is_file():
                assert secret not in path.read_text(errors="ignore"), path
        # a wrong key is one clear error
        os.environ["IQ_TEST_JUDGE_KEY"] = "sk-wrong"
        from iq_lightning.errors import ConfigError

        with pytest.raises(ConfigError, match="refused"):
            evaluate(build_eval_spec(compose_eval(overrides + [f"out_dir={tmp_path / 'eval2'}"])), show_progress=False)
    finally:
        os.environ.pop("IQ_TEST_JUDGE_KEY", None)
        server.terminate()
        server.wait(timeout=60)
