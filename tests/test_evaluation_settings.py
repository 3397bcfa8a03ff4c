"""An evaluation takes the principle, data, check, alpha and beta from what the contestant runs
were trained with (their own run_fingerprint.json), says where each came from, and refuses runs
that disagree unless the command line chooses (issue 23 item 1; issue 22 B7's read side)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import compose
from iq_lightning.config import build_run_config
from iq_lightning.errors import ConfigError
from iq_lightning.evaluation.spec import build_eval_spec
from test_evaluate_flow import compose_eval

ONE_SENTENCE = "Answer in exactly one sentence."


def make_run(run_dir: Path, *overrides: str, final: bool = True) -> Path:
    """A run directory as a started (and, with `final`, finished) run leaves it: its record
    written by the run's own RunStarted, and final/ a save_pretrained model."""
    from iq_lightning.config import TinySpec
    from iq_lightning.models import build_tiny
    from iq_lightning.run import RunStarted

    cfg = compose(["model=tiny", *overrides])
    RunStarted(build_run_config(cfg, run_dir)).on_fit_start(SimpleNamespace(is_global_zero=True), None)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    if final:
        model, tokenizer = build_tiny(TinySpec())
        model.save_pretrained(run_dir / "final")
        tokenizer.save_pretrained(run_dir / "final")
    return run_dir


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "own.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"Question number {i}?", "split": "test" if i < 3 else "train"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _spec(*overrides: str, tmp_path: Path):
    overrides = ["model=tiny", "logger=none", f"out_dir={tmp_path / 'eval'}", *overrides]
    return build_eval_spec(compose_eval(overrides), overrides)


def test_the_sweep_is_labelled_by_the_alpha_each_run_trained_with(tmp_path):
    """B7: a refused restart (alpha 1.5 -> 2.0) rewrites .hydra/config.yaml, and the sweep then
    labelled the alpha 1.5 run alpha=2."""
    from iq_lightning.evaluation.answers import sweep_contestants

    sweep = tmp_path / "multirun"
    make_run(sweep / "0", "alpha=1.0", final=False).joinpath("final").mkdir()
    high = make_run(sweep / "1", "alpha=1.5", final=False)
    (high / "final").mkdir()
    cfg = OmegaConf.load(high / ".hydra" / "config.yaml")
    cfg.alpha = 2.0  # what `python train.py alpha=2.0 hydra.run.dir=<this run>`, refused, leaves
    OmegaConf.save(cfg, high / ".hydra" / "config.yaml")
    found = sweep_contestants(sweep)
    assert [(c.name, c.alpha, Path(c.run_dir).name) for c in found] == [("alpha=1", 1.0, "0"), ("alpha=1.5", 1.5, "1")]


def test_the_runs_principle_data_check_alpha_and_beta_are_used_and_named(tmp_path, prompts):
    from iq_lightning.evaluation.settings import settings_from_runs

    run = make_run(
        tmp_path / "run", f"guide.principle='{ONE_SENTENCE}'", "data=local", f"data.path={prompts}", "alpha=1.0", "beta=0.2",
        "+val.check={kind: regex, pattern: '^[^.]*\\.$'}", final=False,
    )
    spec = _spec(f"+contestants.iq.run_dir={run}", tmp_path=tmp_path)
    assert spec.guide.principle != ONE_SENTENCE and spec.alpha == 1.2  # evaluate.yaml's own, before
    settings = settings_from_runs(spec, list(spec.contestants))
    s = settings.spec
    assert s.guide.principle == ONE_SENTENCE and s.guide.placement == "system"
    assert (s.data.source, s.data.path, s.data.split) == ("local", str(prompts), "test")
    assert (s.principle_check.kind, s.principle_check.pattern) == ("regex", "^[^.]*\\.$")
    assert (s.alpha, s.beta) == (1.0, 0.2)
    assert settings.credit == {"sft": (1.0, 0.2), "prompting": (1.0, 0.2), "iq": (1.0, 0.2)}
    prompting = next(c for c in settings.contestants if c.name == "prompting")
    assert prompting.principle == ONE_SENTENCE  # the Prompting baseline is given the run's principle
    table = "\n".join(settings.markdown())
    assert f"| guide.principle | {ONE_SENTENCE} | the runs (iq) |" in table
    assert "| data.source | local | the runs (iq) |" in table and "| alpha (credit maps) | 1 | the runs (iq) |" in table


def test_the_command_line_wins_and_says_so(tmp_path, prompts):
    from iq_lightning.evaluation.settings import settings_from_runs

    run = make_run(tmp_path / "run", f"guide.principle='{ONE_SENTENCE}'", "alpha=1.0", final=False)
    spec = _spec(f"+contestants.iq.run_dir={run}", "guide.principle='Reply in German.'", "alpha=2.0", tmp_path=tmp_path)
    settings = settings_from_runs(spec, list(spec.contestants))
    assert settings.spec.guide.principle == "Reply in German." and settings.credit["iq"] == (2.0, 0.1)
    assert next(c for c in settings.contestants if c.name == "prompting").principle == "Reply in German."
    table = "\n".join(settings.markdown())
    assert f"| guide.principle | Reply in German. | command line (the runs were trained with iq: {ONE_SENTENCE}) |" in table


def test_runs_trained_with_different_principles_or_data_are_refused_in_one_line(tmp_path, prompts):
    from iq_lightning.evaluation.settings import settings_from_runs

    a = make_run(tmp_path / "a", f"guide.principle='{ONE_SENTENCE}'", final=False)
    b = make_run(tmp_path / "b", final=False)
    c = make_run(tmp_path / "c", "data=local", f"data.path={prompts}", final=False)
    spec = _spec(f"+contestants.a.run_dir={a}", f"+contestants.b.run_dir={b}", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"^the contestant runs were trained with different guide.principle \(a: Answer in exactly "
                       r"one sentence\.; b: Always reply in French.*\); say which to evaluate with on the command line \(guide.principle=\.\.\.\)$"):
        settings_from_runs(spec, list(spec.contestants))
    spec = _spec(f"+contestants.b.run_dir={b}", f"+contestants.c.run_dir={c}", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"^the contestant runs were trained with different data.source \(b: bundled; c: local\)"):
        settings_from_runs(spec, list(spec.contestants))
    # the user says which to use: accepted, and each run keeps its own alpha for its credit maps
    spec = _spec(f"+contestants.a.run_dir={a}", f"+contestants.b.run_dir={b}", "guide.principle='Reply in German.'", tmp_path=tmp_path)
    assert settings_from_runs(spec, list(spec.contestants)).spec.guide.principle == "Reply in German."


def test_a_sweep_keeps_each_runs_alpha_for_its_credit_maps(tmp_path):
    from iq_lightning.evaluation.answers import sweep_contestants
    from iq_lightning.evaluation.settings import settings_from_runs

    sweep = tmp_path / "multirun"
    for i, alpha in enumerate(("1.0", "3.0")):
        make_run(sweep / str(i), f"alpha={alpha}", final=False).joinpath("final").mkdir()
    spec = _spec(f"sweep_dir={sweep}", tmp_path=tmp_path)
    settings = settings_from_runs(spec, list(spec.contestants) + sweep_contestants(sweep))
    assert settings.credit == {"sft": (1.2, 0.1), "prompting": (1.2, 0.1), "alpha=1": (1.0, 0.1), "alpha=3": (3.0, 0.1)}
    assert "| alpha (credit maps) | alpha=1: 1; alpha=3: 3; the others: 1.2 | each run's own record" in "\n".join(settings.markdown())


def test_the_fingerprint_name_is_the_one_the_run_writes():
    from iq_lightning.evaluation.trained import FINGERPRINT_FILE
    from iq_lightning.run import FINGERPRINT_FILE as WRITTEN

    assert FINGERPRINT_FILE == WRITTEN


def test_an_evaluation_of_a_run_reports_the_runs_settings_in_summary_md(tmp_path, prompts, monkeypatch):
    """Issue 23 item 1, end to end: a run trained with its own principle on its own prompts was
    evaluated on the bundled prompts against a Prompting baseline given the French default,
    with summary.md saying `language=fr`."""
    import iq_lightning.evaluation.run as recipe  # where evaluate looks build_guide up (guides.py defines it)
    from iq_lightning.evaluation.run import evaluate

    built = []
    build_guide = recipe.build_guide
    monkeypatch.setattr(recipe, "build_guide", lambda guide, alpha, *a, **k: built.append((guide.principle, alpha)) or build_guide(guide, alpha, *a, **k))
    run = make_run(tmp_path / "run", f"guide.principle='{ONE_SENTENCE}'", "data=local", f"data.path={prompts}", "alpha=1.0")
    overrides = [
        "model=tiny", "logger=none", f"out_dir={tmp_path / 'eval'}", f"+contestants.iq.run_dir={run}", "sampler.max_new_tokens=4",
        "judge_check.matches=2", "judge_check.controls=0", "elo.permutations=5", "elo.bootstrap=0", "credit_maps=1",
        "judge_free.enabled=false",
    ]
    result = evaluate(build_eval_spec(compose_eval(overrides), overrides), show_progress=False)
    summary = (result.out_dir / "results" / "summary.md").read_text()
    assert f"| guide.principle | {ONE_SENTENCE} | the runs (iq) |" in summary
    assert f"| data.path | {prompts} | the runs (iq) |" in summary
    assert sorted({j.prompt_id for j in result.judgments}) == ["q0", "q1", "q2"]  # the run's own held-out prompts
    prompting = next(iter((result.out_dir / "generations").glob("prompting-*.jsonl"))).read_text()
    assert ONE_SENTENCE in prompting and "French" not in prompting
    assert built == [(ONE_SENTENCE, 1.0)]  # the credit maps: the run's principle and alpha, not 1.5


def test_records_of_older_runs_are_read_and_a_damaged_one_is_one_line(tmp_path):
    from iq_lightning.evaluation.trained import read_trained

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "run_fingerprint.json").write_text(json.dumps({
        "model": "tiny", "lora": False, "alpha": 1.2, "guide": ["principle", ONE_SENTENCE, "user"],
        "sampler": [32, 1.0, 1.0], "samples_per_epoch": 32, "seed": 0, "data": ["bundled", None, "train"],
    }))
    record = read_trained(legacy)
    assert (record.alpha, record.beta) == (1.2, 0.1)
    assert (record.settings["guide.principle"], record.settings["guide.placement"], record.settings["data.split"]) == (ONE_SENTENCE, "user", "test")
    assert read_trained(tmp_path) is None  # no record
    (legacy / "run_fingerprint.json").write_text('{"settings": {"guide.kind": "principle"}}')
    with pytest.raises(ConfigError, match=r"run_fingerprint.json is not a run record this version reads \(KeyError"):
        read_trained(legacy)
    (legacy / "run_fingerprint.json").write_text('{"settings": ')
    with pytest.raises(ConfigError, match=r"run_fingerprint.json does not parse"):
        read_trained(legacy)


def test_which_settings_a_command_line_chooses():
    from iq_lightning.evaluation.spec import explicit_keys, is_explicit

    keys = explicit_keys(["+contestants.iq.run_dir=/r", "guide.principle='x'", "data=local", "principle_check.kind=regex", "data.limit=4"])
    assert keys == ("contestants.iq.run_dir", "data", "data.limit", "guide.principle", "principle_check.kind")
    assert is_explicit("guide.principle", keys) and not is_explicit("guide.placement", keys)
    assert is_explicit("data.source", keys) and is_explicit("principle_check", keys)  # a group, a key inside a setting
    assert not is_explicit("data.split", ("data.limit",)) and not is_explicit("alpha", keys)


def test_evaluating_on_the_prompts_a_run_trained_on_is_said(tmp_path, prompts):
    """A local file without a split column gives every row to both splits: the evaluation then
    measures training prompts, which summary.md must say."""
    from iq_lightning.evaluation.settings import settings_from_runs

    unsplit = tmp_path / "unsplit.jsonl"
    unsplit.write_text("".join(json.dumps({"id": f"u{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(40)))
    run = make_run(tmp_path / "run", "data=local", f"data.path={unsplit}", final=False)
    spec = _spec(f"+contestants.iq.run_dir={run}", tmp_path=tmp_path)
    table = "\n".join(settings_from_runs(spec, list(spec.contestants)).markdown())
    assert f"> 40 of the 40 evaluation prompts (split 'test') are among those iq trained on (all rows of {unsplit}, which" in table
    split = make_run(tmp_path / "split", "data=local", f"data.path={prompts}", "data.split=train", final=False)
    spec = _spec(f"+contestants.iq.run_dir={split}", tmp_path=tmp_path)
    assert "evaluation prompts" not in "\n".join(settings_from_runs(spec, list(spec.contestants)).markdown())


def test_a_principle_file_on_evaluates_command_line_is_the_principle_it_chooses(tmp_path):
    """guide.principle_file (README: the principle without quoting) was accepted by evaluate.py and
    ignored: two runs trained with different principles stayed refused, and a run's own principle
    (or evaluate.yaml's French one) went to the Prompting baseline instead of the file's."""
    from iq_lightning.evaluation.settings import settings_from_runs

    a = make_run(tmp_path / "a", f"guide.principle='{ONE_SENTENCE}'", final=False)
    b = make_run(tmp_path / "b", final=False)
    text = "Always reply in German, whatever the language."
    (tmp_path / "principle.txt").write_text(text + "\n", encoding="utf-8")
    spec = _spec(f"+contestants.a.run_dir={a}", f"+contestants.b.run_dir={b}", f"guide.principle_file={tmp_path / 'principle.txt'}", tmp_path=tmp_path)
    assert spec.guide.principle == text and spec.guide.principle_file is None
    settings = settings_from_runs(spec, list(spec.contestants))
    assert settings.spec.guide.principle == text
    assert next(c for c in settings.contestants if c.name == "prompting").principle == text
    assert "| guide.principle | Always reply in German, whatever the language. | command line (the runs were trained with" in "\n".join(settings.markdown())
    with pytest.raises(ConfigError, match=r"^guide.principle_file=.*nope.txt: No such file or directory$"):
        _spec(f"guide.principle_file={tmp_path / 'nope.txt'}", tmp_path=tmp_path)


def test_the_notebooks_run_config_is_what_the_run_trained_with(tmp_path):
    """B7 in notebooks/inspect_run.ipynb: analysis.run_config read .hydra/config.yaml alone, so after a
    refused restart (alpha=2.0, another principle) the notebook drew its credit map at alpha 2 and
    printed the refused principle."""
    from iq_lightning.analysis import run_config

    run = make_run(tmp_path / "run", f"guide.principle='{ONE_SENTENCE}'", "alpha=1.5", "epochs=3", final=False)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg.alpha, cfg.guide.principle, cfg.epochs = 2.0, "Reply in German.", 5  # what the refused command leaves
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    # Today's runs write config.yaml once accepted: Hydra's rewritten file is not read at all.
    config = run_config(run)
    assert (config["alpha"], config["guide"]["principle"], config["epochs"]) == (1.5, ONE_SENTENCE, 3)
    # A run of an older version has only .hydra/config.yaml: the record's settings are put back.
    (run / "config.yaml").unlink()
    config = run_config(run)
    assert (config["alpha"], config["guide"]["principle"], config["beta"]) == (1.5, ONE_SENTENCE, 0.1)
    assert config["model"]["name_or_path"] == cfg.model.name_or_path and config["epochs"] == 5  # keys it does not record stay
