"""What a new user meets: quoting a principle, the command that resumes, early config errors, a run
that talks (one line per epoch, no library noise), checkpoints it may drop, small data files."""

import csv
import json
import logging
import shlex
import subprocess
import sys
import warnings

import pytest

from conftest import CONF, REPO, compose
from iq_lightning.cli import CommandLineError, command_line_help_or_error, configure_environment, resume_command, resume_hint, run_name, single_log_stream
from iq_lightning.config import TinySpec, build_run_config
from iq_lightning.errors import ConfigError
from iq_lightning.quoting import hydra_value

TINY = ["model=tiny", "lr=1e-4", "samples_per_epoch=8", "micro_batch_size=4", "sampler.max_new_tokens=8", "logger=csv"]
SENTENCE = "Always reply in German, whatever the language."


def _check(*args: str) -> str | None:
    return command_line_help_or_error(CONF, "train", "", list(args))


def _hydra_reads(shell_word: str) -> tuple[str, object, bool]:
    """(key, value, is a sweep) of one shell word as Hydra parses the override it becomes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (word,) = shlex.split(shell_word)
    o = OverridesParser.create().parse_override(word)
    return o.key_or_group, o.value(), o.is_sweep_override()


# --- item 2: a principle with a comma ------------------------------------------------------------


@pytest.mark.parametrize("multirun", [["-m"], []])
def test_a_principle_split_at_its_comma_is_refused_with_the_quoting_that_keeps_it_whole(multirun):
    with pytest.raises(CommandLineError) as err:
        _check(*multirun, "model=tiny", f"guide.principle={SENTENCE}")
    line = str(err.value)
    assert "\n" not in line and "a sweep over 2 pieces" in line and "guide.principle_file=FILE" in line
    suggested = line.split("inside the shell's: ", 1)[1].split(" (or put", 1)[0]
    assert suggested == """'guide.principle="Always reply in German, whatever the language."'"""
    assert _hydra_reads(suggested) == ("guide.principle", SENTENCE, False)  # the quoting really keeps it whole
    assert _check(*multirun, "model=tiny", shlex.split(suggested)[0]) is None


@pytest.mark.parametrize("value", ["'Reply in French.','Reply in German.'", "Reply in French.,Reply in German.", "choice(be brief,be kind)"])
def test_a_sweep_over_whole_principles_is_left_to_hydra(value):
    assert _check("-m", f"guide.principle={value}") is None


@pytest.mark.parametrize("text", [SENTENCE, 'say "hi", then stop', "a\\b, c\\", "multirun/2026/0_alpha=1.0,epochs=1", "plain/path-1.0"])
def test_hydra_value_round_trips_through_hydras_parser(text):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    o = OverridesParser.create().parse_override(f"k={hydra_value(text)}")
    assert (o.value(), o.is_sweep_override()) == (text, False)


def test_principle_file_becomes_the_principle_text(tmp_path):
    text = "Answer in exactly one sentence, and never in a list."
    (tmp_path / "p.txt").write_text(f"\n{text}\n")
    run = build_run_config(compose(TINY + [f"guide.principle_file={tmp_path / 'p.txt'}"]), tmp_path / "run")
    assert run.guide.principle == text and run.guide.principle_file is None
    from iq_lightning.run import restart_settings

    assert restart_settings(run)["guide.principle"] == text  # a restart compares the text, not the path
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ConfigError, match="empty.txt is empty"):
        build_run_config(compose(TINY + [f"guide.principle_file={tmp_path / 'empty.txt'}"]), tmp_path / "run")
    with pytest.raises(CommandLineError, match="guide.principle_file=/nonexistent.txt: no such file"):
        _check("guide.principle_file=/nonexistent.txt")


# --- small ones: mistakes said before torch loads ------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("alpha=-1", "error: alpha must be >= 0 (the paper uses 1.0-1.5), got -1"),
        ("epochs=0", "error: epochs must be >= 1, got 0"),
        ("data.path=/nonexistent/p.jsonl", "error: data.path=/nonexistent/p.jsonl: no such file"),
    ],
)
def test_simple_mistakes_are_refused_before_torch_is_imported(tmp_path, override, expected):
    extra = ["data=local"] if override.startswith("data.path") else []
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / "train.py"), *extra, override],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("error:")] == [expected]
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    assert "torch" not in imported and "transformers" not in imported


def test_help_shows_the_whole_default_principle_quoted_as_the_shell_needs_it():
    text = _check("--help")
    line = next(line for line in text.splitlines() if "guide.principle=" in line)
    assert line.strip() == """'guide.principle="Always reply in French, whatever language the user writes in."'"""
    assert "guide.principle_file=FILE" in text


# --- item 10: the command that resumes -----------------------------------------------------------


def test_resume_command_repeats_the_overrides_and_names_the_run_directory():
    overrides = ['guide.principle="Reply in German, always."', "alpha=1.2", "hydra.run.dir=old"]
    command = resume_command("train.py", overrides, "multirun/2026-12-07/09-00-00/0_alpha=1.2,epochs=1")
    words = shlex.split(command)
    assert words[:4] == ["python", "train.py", 'guide.principle="Reply in German, always."', "alpha=1.2"]
    assert _hydra_reads(shlex.quote(words[4])) == ("hydra.run.dir", "multirun/2026-12-07/09-00-00/0_alpha=1.2,epochs=1", False)
    assert len(words) == 5  # the old hydra.run.dir is replaced, not repeated


def test_ctrl_c_and_failures_end_with_the_resume_command(capsys):
    expected = "python train.py alpha=1.2 hydra.run.dir=runs/a"
    with pytest.raises(SystemExit) as stop:
        with resume_hint("train.py", ["alpha=1.2"], "runs/a", lambda: True):
            raise KeyboardInterrupt
    assert stop.value.code == 130
    assert capsys.readouterr().err.splitlines()[-2:] == ["interrupted; resume with:", f"  {expected}"]

    with pytest.raises(SystemExit) as stop:
        with resume_hint("train.py", ["alpha=1.2"], "runs/a", lambda: True):
            raise RuntimeError("CUDA out of memory")
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "RuntimeError: CUDA out of memory" in err
    assert err.splitlines()[-1] == f"  {expected}"  # after the traceback: the last thing on screen

    from iq_lightning.errors import UserError

    with pytest.raises(SystemExit) as stop:
        with resume_hint("train.py", ["alpha=1.2"], "runs/a", lambda: True):
            raise UserError("epoch 2 step 7: the loss is NaN")
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and err[0] == "error: epoch 2 step 7: the loss is NaN" and err[-1] == f"  {expected}"

    # A mistake found before training started (a refused restart) gets its own line only.
    with pytest.raises(UserError):
        with resume_hint("train.py", ["alpha=1.2"], "runs/a", lambda: False):
            raise UserError("runs/a holds a run with other settings")
    assert capsys.readouterr().err == ""


# --- item 13: sweeps ---------------------------------------------------------------------------


def test_sweep_directories_are_job_numbers_and_wandb_runs_are_named_by_overrides():
    from omegaconf import OmegaConf

    sweep = OmegaConf.load(CONF / "train.yaml").hydra.sweep
    assert OmegaConf.to_container(sweep, resolve=False)["subdir"] == "${hydra.job.num}"
    assert run_name(["model=tiny", "alpha=1.2", "logger=csv", "hydra.run.dir=x"]) == "alpha=1.2 model=tiny"
    assert run_name(["logger.mode=online"]) is None


def test_a_wandb_run_is_named_by_its_overrides(tmp_path):
    import os

    from iq_lightning.tracking import read_offline_run

    overrides = ["model=tiny", "epochs=1", "samples_per_epoch=4", "sampler.max_new_tokens=4", "val.every_n_epochs=0", "alpha=1.2"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={tmp_path}"],
                            capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_offline_run(tmp_path).name == "alpha=1.2 epochs=1 model=tiny sampler.max_new_tokens=4 samples_per_epoch=4 val.every_n_epochs=0"


# --- item 9: a run that talks; item 4: no check, truncated; item 14: keep_checkpoint -------------


def test_library_noise_is_silenced_at_its_source(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        configure_environment()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead.", FutureWarning)
        warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else"]
    single_log_stream()
    with caplog.at_level(logging.INFO):
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        rank_zero.info("GPU available: False, used: False")
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
    assert [r.getMessage() for r in caplog.records if r.name in (rank_zero.name, "DeepSpeed")] == ["GPU available: False, used: False"]


def test_the_policy_trains_in_train_mode():
    """from_pretrained returns a model in eval mode (Lightning warned "Found N module(s) in eval mode")."""
    from types import SimpleNamespace

    from iq_lightning.models import build_tiny
    from iq_lightning.module import InverseQModule
    from iq_lightning.strategies import Replicated
    from iq_lightning.config import StrategySpec

    policy, _ = build_tiny(TinySpec())
    models = SimpleNamespace(policy=lambda: policy.eval(), sharding=Replicated(StrategySpec()))
    module = InverseQModule(None, None, lr=1e-4, models=models)
    module.configure_model()
    assert all(m.training for m in module.policy.modules())


def test_summary_line_names_each_figure_and_phase():
    from iq_lightning.epoch_summary import summary_line

    metrics = {"train/loss_epoch": 0.0123, "train/kl_pi_hat_est_rollouts": 0.4567, "time/sample_s": 12.34, "time/train_s": 30.0, "time/checkpoint_s": 1.25}
    line = summary_line(1, 4, metrics, {"epoch": 1, "principle_rate": 0.625, "kl_pi_hat_exact_heldout": 0.69, "truncated": 0.25, "seconds": 20.0})
    assert line == (
        "epoch 1 (2 of 4): loss 0.0123, KL est. (rollouts) 0.457 | principle rate 0.625, KL exact (held out) 0.69, truncated 0.25 "
        "| seconds: sample 12.3, train 30.0, val 20.0, checkpoint 1.2"
    )
    assert "principle rate n/a (no check)" in summary_line(0, 1, metrics, {"epoch": 0, "truncated": 0.0})


@pytest.fixture(scope="module")
def one_sentence_run(tmp_path_factory):
    """A tiny run with a principle no built-in check measures, that drops its checkpoint."""
    from iq_lightning.run import train

    run_dir = tmp_path_factory.mktemp("ux")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    root = logging.getLogger("iq_lightning")
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        cfg = compose(TINY + ["epochs=1", "val.prompts=4", "guide.principle=Answer in exactly one sentence.", "keep_checkpoint=false"])
        result = train(build_run_config(cfg, run_dir), show_progress=False)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    return result, [r.getMessage() for r in records]


def test_a_run_without_a_check_says_so_and_reports_truncation(one_sentence_run):
    result, messages = one_sentence_run
    validation = [m for m in messages if m.startswith("validation after epoch")]
    assert len(validation) == 2 and all("principle_rate: no check applies to this principle" in m for m in validation)
    rows = list(csv.DictReader(open(result.run_dir / "metrics" / "metrics.csv")))
    val = [r for r in rows if r.get("val/truncated")]
    answers = [json.loads(line) for line in (result.run_dir / "validation" / "epoch_000.jsonl").read_text().splitlines()]
    # Independently: the share of answers as long as max_new_tokens without an EOS token.
    assert float(val[-1]["val/truncated"]) == sum(a["truncated"] for a in answers) / len(answers)
    assert all(a["truncated"] == (a["tokens"] == 8) for a in answers)  # the random tiny model rarely ends early
    assert "val/principle_rate" not in rows[0]


def test_each_epoch_gets_one_summary_line(one_sentence_run):
    _, messages = one_sentence_run
    lines = [m for m in messages if m.startswith("epoch 0 (1 of 1):")]
    assert len(lines) == 1
    assert "loss " in lines[0] and "KL est. (rollouts)" in lines[0] and "principle rate n/a (no check)" in lines[0]
    assert "seconds: " in lines[0] and " sample " in lines[0] and " val " in lines[0]


def test_training_curves_are_written(one_sentence_run):
    result, messages = one_sentence_run
    assert (result.run_dir / "plots" / "training.png").stat().st_size > 10_000
    assert any(m.startswith("training curves:") for m in messages)


def test_keep_checkpoint_false_drops_it_after_final_and_refuses_to_extend(one_sentence_run):
    from iq_lightning.run import train

    result, _ = one_sentence_run
    assert (result.run_dir / "final" / "model.safetensors").exists()
    assert not (result.run_dir / "checkpoints").exists()
    cfg = compose(TINY + ["epochs=2", "val.prompts=4", "guide.principle=Answer in exactly one sentence.", "keep_checkpoint=false"])
    with pytest.raises(ConfigError, match="finished run whose checkpoint was deleted"):
        train(build_run_config(cfg, result.run_dir), show_progress=False)


# --- small ones ---------------------------------------------------------------------------------


def test_a_limited_load_says_so(tmp_path):
    from iq_lightning.config import DataSpec
    from iq_lightning.data import load_prompts

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?"}) + "\n" for i in range(30)))
    prompts, stats = load_prompts(DataSpec(source="local", path=str(data), split=None, limit=4))
    stats.kept = len(prompts)
    assert stats.describe() == "4 prompts kept of 30 (data.limit=4 left 26 out; skipped: none)"


def test_two_local_rows_train_on_one_and_validate_on_the_other(tmp_path, tiny, caplog):
    from iq_lightning.data import prepare_prompts
    from iq_lightning.run import held_out_prompts

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}?"}) + "\n" for i in range(2)))
    run = build_run_config(compose(TINY + ["data=local", f"data.path={data}"]), tmp_path)
    _, tokenizer = tiny
    training, _ = prepare_prompts(run.data, tokenizer)
    with caplog.at_level(logging.WARNING):
        held, left = held_out_prompts(run, tokenizer, training)
    assert len(held) == 1 and len(left) == 1 and held[0].prompt.id != left[0].prompt.id
    assert "1 of its 2 prompts held out of training for validation (val.prompts=16: at most half" in caplog.text
    data.write_text(json.dumps({"id": "q0", "prompt": "alone?"}) + "\n")
    training, _ = prepare_prompts(run.data, tokenizer)
    with pytest.raises(ConfigError, match="also training prompts"):
        held_out_prompts(run, tokenizer, training)


def test_an_answer_cut_inside_a_character_decodes_without_a_replacement_character(tiny):
    from iq_lightning.text_quality import decode_whole

    _, tokenizer = tiny
    ids = tokenizer("Café 🙂", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:-1]).endswith("\ufffd")  # the emoji cut after some of its bytes
    assert decode_whole(tokenizer, ids[:-1]) == "Café "
    assert decode_whole(tokenizer, ids) == "Café 🙂"


def test_the_notebooks_extra_has_ipywidgets():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("ipywidgets") for dep in extras["notebooks"])


def test_a_principle_and_a_principle_file_both_given_are_refused():
    """The file silently won over `guide.principle=...` given beside it."""
    with pytest.raises(CommandLineError, match=r"^guide.principle and guide.principle_file both given: the file's text would replace the other; give one$"):
        _check("model=tiny", "guide.principle=Reply in German.", f"guide.principle_file={REPO / 'README.md'}")
    assert _check("model=tiny", f"guide.principle_file={REPO / 'README.md'}") is None
    assert _check("model=tiny", "guide.principle=Reply in German.", "guide.principle_file=null") is None


def test_dropping_the_checkpoint_renames_it_before_deleting(tmp_path, monkeypatch):
    """keep_checkpoint=false: a kill during the deletion (many files for a sharded checkpoint)
    left a half checkpoint under the name a restart reads."""
    import shutil

    from iq_lightning import run as recipe

    shard = tmp_path / "checkpoints" / "epoch000.ckpt" / "shard0"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"x")

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        recipe.drop_checkpoints(tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    monkeypatch.undo()
    recipe.drop_checkpoints(tmp_path)  # the next call finishes the deletion
    assert sorted(p.name for p in tmp_path.iterdir()) == []
