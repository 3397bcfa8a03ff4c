"""The command line as a user runs it: clear one-line errors, multirun directories."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _train(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "train.py")]
    if multirun:
        cmd += ["-m", f"hydra.sweep.dir={tmp_path}"]
    else:
        cmd += [f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd + list(overrides), capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_zephyr_offline_is_one_clear_line(tmp_path):
    # a device large enough for the memory plan, so the run goes on to load the model (offline here)
    line = _one_line_error(_train(tmp_path, "model=zephyr", "alpha=1.2", "logger=none", "strategy.device_memory_gib=1000"))
    assert "cannot load model HuggingFaceH4/mistral-7b-sft-beta" in line


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["alpha=-0.5"], "alpha must be >= 0"),
        (["epochs=0"], "epochs must be >= 1"),
        (["data=local", "data.path=/nonexistent/prompts.jsonl"], "data.path=/nonexistent/prompts.jsonl: no such file"),
        (["guide.placement=middle"], "guide.placement must be system or user"),
        (["+colour=blue"], "unknown key colour; python train.py --help lists the keys"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, overrides, expected):
    line = _one_line_error(_train(tmp_path, "model=tiny", "logger=none", *overrides))
    assert expected in line


def test_malformed_local_data_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    line = _one_line_error(_train(tmp_path / "run", "model=tiny", "logger=none", "data=local", f"data.path={bad}"))
    assert "bad.jsonl:1: not valid JSON" in line


def test_multirun_alpha_sweep_gets_one_directory_per_run(tmp_path):
    result = _train(
        tmp_path,
        "alpha=1.0,1.2,1.4",
        "model=tiny",
        "epochs=1",
        "samples_per_epoch=4",
        "sampler.max_new_tokens=4",
        "logger=csv",
        multirun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "config.yaml").is_file())
    # Named by job number (paths the tools take unquoted), each with its own overrides inside.
    assert [run.name for run in runs] == ["0", "1", "2"]
    assert [(run / "overrides.yaml").read_text().count(f"alpha={a}") for run, a in zip(runs, ("1.0", "1.2", "1.4"))] == [1, 1, 1]
    alphas = []
    for run in runs:
        assert (run / "final" / "model.safetensors").exists()
        assert (run / "rollouts" / "epoch_000.jsonl").exists()
        config = (run / "config.yaml").read_text()
        assert not (run / ".hydra").exists()  # the run's record is written by the run, once accepted
        alphas.append(next(line for line in config.splitlines() if line.startswith("alpha:")))
    assert alphas == ["alpha: 1.0", "alpha: 1.2", "alpha: 1.4"]


def test_ctrl_c_then_same_command_resumes(tmp_path):
    """A real SIGINT mid-run: graceful stop, then the same command continues where it stopped."""
    import signal
    import time

    args = [sys.executable, str(REPO / "train.py"), "model=tiny", "epochs=30", "samples_per_epoch=16",
            "sampler.max_new_tokens=16", "logger=csv", "val.every_n_epochs=0", f"hydra.run.dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "KeyboardInterrupt" in out, out[-2000:]
    # It ends by printing the command that resumes: the same overrides, the run directory named.
    said = out.rstrip().splitlines()
    assert said[-2].endswith("resume with:"), out[-2000:]
    # the script as it was started (here by its absolute path), so the command works from anywhere
    assert said[-1].strip() == " ".join(["python", str(REPO / "train.py"), *args[2:-1], f"hydra.run.dir={tmp_path}"])
    done = sorted(p.name for p in (tmp_path / "rollouts").glob("epoch_*.jsonl"))
    assert 1 <= len(done) < 30
    kept = {name: (tmp_path / "rollouts" / name).read_bytes() for name in done}

    import shlex

    printed = shlex.split(said[-1])
    resumed = subprocess.run([sys.executable, str(REPO / "train.py"), *printed[2:]], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    after = sorted(p.name for p in (tmp_path / "rollouts").glob("epoch_*.jsonl"))
    assert after == [f"epoch_{e:03d}.jsonl" for e in range(30)]
    assert all((tmp_path / "rollouts" / name).read_bytes() == data for name, data in kept.items())
    epochs = [line.split(",")[0] for line in (tmp_path / "metrics" / "metrics.csv").read_text().splitlines()[1:]]
    assert sorted({int(e) for e in epochs}) == list(range(30))


# Every user mistake on the command line is one `error:` line, said before Hydra composes.

MISTAKES = [
    # (script, overrides, what the one line says)
    ("train", ["alpah=1.2"], "unknown key alpah (did you mean alpha?)"),
    ("train", ["+alpah=1.2"], "unknown key alpah (did you mean alpha?)"),
    ("train", ["sampler.temprature=0.7"], "unknown key sampler.temprature (did you mean sampler.temperature?)"),
    ("train", ["temperature=0.7"], "(did you mean sampler.temperature"),
    ("train", ["principle='Answer in French.'"], "unknown key principle (principle is a key of generate.py; did you mean guide.principle?)"),
    ("train", ["modle=tiny"], "unknown key modle (did you mean model?)"),
    ("train", ["model=tinyy"], "model=tinyy: no such option (did you mean tiny?); model options: smollm2, tiny"),
    ("train", ["-m", "alpha=1.0,1.2", "model=tiny,tinyy"], "model=tinyy: no such option"),
    ("train", ["judge=openai"], "train.py has no config group 'judge' (judge belongs to evaluate.py); its groups: data"),
    ("train", ["+judge=openai"], "train.py has no config group 'judge' (judge belongs to evaluate.py)"),
    ("train", ["judge.model=gpt-4-turbo"], "train.py has no 'judge' keys (judge belongs to evaluate.py)"),
    ("train", ["reward.model=x"], "unknown key reward.model (reward.model is a key of evaluate.py)"),
    ("train", ["data.path=prompts.jsonl"], "data.path=prompts.jsonl is read only with data=local, and the prompts come from data=bundled: add data=local"),
    ("train", ["data=hh_rlhf", "data.path=prompts.jsonl"], "data.path=prompts.jsonl is read only with data=local, and the prompts come from data=hh_rlhf"),
    ("train", ["data=local"], "data=local needs data.path=/path/to/prompts.jsonl"),
    ("train", ["+alpha=1.2"], "alpha is already in the config: write alpha=... without the leading +"),
    ("train", ["alpha"], "cannot read 'alpha'"),
    ("train", ["--colour"], "unrecognized arguments: --colour"),
    ("train", ["hydra.run.dri=x"], "unknown key hydra.run.dri (did you mean hydra.run.dir?)"),
    ("train", ["~colour"], "cannot remove colour: no such key"),
    ("train", ["-m", "--cfg", "job", "alpha=1.0,1.2"], "-m (a sweep) cannot be combined with --cfg or --info"),
    ("generate", ["strategy=ddp"], "generate.py has no config group 'strategy' (strategy belongs to train.py)"),
    ("generate", ["alpha=1.2"], "unknown key alpha (alpha is a key of"),
    ("generate", ["principel=x"], "unknown key principel (did you mean principle?)"),
    ("generate", ["data.path=prompts.jsonl"], "data.path=prompts.jsonl is read only with data=local"),
    ("evaluate", ["strategy=ddp"], "evaluate.py has no config group 'strategy' (strategy belongs to train.py)"),
    ("evaluate", ["experiment=paper_hh"], "evaluate.py has no config group 'experiment' (experiment belongs to train.py)"),
    ("evaluate", ["contestants.iq.run_dir=outputs/x"], "contestants.iq.run_dir is a new key: add it with a leading + ('+contestants.iq.run_dir=outputs/x')"),
    ("evaluate", ["judge.modle=x"], "unknown key judge.modle (did you mean judge.model_path?)"),
    ("evaluate", ["sweep_dri=multirun/x"], "unknown key sweep_dri (did you mean sweep_dir?)"),
    ("evaluate", ["judge=opanai"], "judge=opanai: no such option (did you mean openai?)"),
    ("evaluate", ["data.path=prompts.jsonl"], "data.path=prompts.jsonl is read only with data=local"),
]


@pytest.mark.parametrize(("script", "overrides", "expected"), MISTAKES, ids=[" ".join([s, *o]) for s, o, _ in MISTAKES])
def test_command_line_mistakes_are_one_clear_line(script, overrides, expected):
    from iq_lightning.cli import CommandLineError, command_line_help_or_error

    with pytest.raises(CommandLineError) as caught:
        command_line_help_or_error(REPO / "conf", script, "", overrides)
    message = str(caught.value)
    assert expected in message and "\n" not in message, message


@pytest.mark.parametrize(
    ("script", "overrides"),
    [
        ("train", ["model=tiny", "alpha=1.2", "sampler.temperature=0.7", "data=local", f"data.path={REPO / 'iq_lightning' / 'resources' / 'prompts.jsonl'}"]),
        ("train", ["-m", "alpha=1.0,1.2", "model=tiny,smollm2", "+sampler.options.dtype=float32"]),
        ("train", ["model=tiny", "model.tiny.hidden_size=64", "+model.architecture.hidden_size=64", "hydra.run.dir=x"]),
        ("train", ["experiment=paper_hh", "guide.principle='Be kind, always.'", "~model.chat_template"]),
        # (as the shell passes them: its own quotes removed, Hydra's kept)
        ("generate", ['principle="Always reply in French."', "run_dir=outputs/x", "data.split=test"]),
        ("evaluate", ['+contestants.iq.run_dir="outputs/x"', "~contestants.prompting", "judge=openai", "judge.model=m"]),
        ("evaluate", ['sweep_dir="multirun/1_alpha=1.2"', "pairs=reference", "judge=openai", "+judge.extra_body.seed=1"]),
    ],
)
def test_correct_command_lines_pass_the_check(script, overrides):
    from iq_lightning.cli import command_line_help_or_error

    assert command_line_help_or_error(REPO / "conf", script, "", overrides) is None


@pytest.mark.parametrize(
    ("script", "overrides", "expected"),
    [
        ("train.py", ["alpah=1.2"], "error: unknown key alpah (did you mean alpha?); python train.py --help lists the keys"),
        ("train.py", ["+alpah=1.2"], "error: unknown key alpah (did you mean alpha?)"),
        ("train.py", ["sampler.temprature=0.7"], "error: unknown key sampler.temprature (did you mean sampler.temperature?)"),
        ("train.py", ["judge=openai"], "error: train.py has no config group 'judge' (judge belongs to evaluate.py)"),
        ("train.py", ["data.path=prompts.jsonl"], "error: data.path=prompts.jsonl is read only with data=local"),
        ("generate.py", ["strategy=ddp"], "error: generate.py has no config group 'strategy'"),
        ("evaluate.py", ["contestants.iq.run_dir=outputs/x"], "error: contestants.iq.run_dir is a new key: add it with a leading +"),
    ],
)
def test_entry_points_print_one_error_line_and_exit_2(tmp_path, script, overrides, expected):
    # model=tiny logger=none: should the check ever let one through, it costs seconds, not a SmolLM2 run
    cmd = [sys.executable, str(REPO / script), "model=tiny", "logger=none" if script != "generate.py" else "seed=0", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = _one_line_error(result)
    assert line.startswith(expected), line
    assert result.stderr.strip() == line and not result.stdout, result.stderr


HELP_EXPECTS = {
    # groups the script uses with their options, keys with their YAML comments, examples
    "train": {
        "has": [
            "data\n", "*bundled", "hh_rlhf", "guide\n", "*principle", "sampler\n", "vllm", "strategy\n", "deepspeed_zero3",
            "logger\n", "model\n", "*smollm2", "tiny", "experiment\n", "paper_hh",
            "alpha=1.2", "the paper uses 1.0-1.5", "reduction=token_mean", "sum | token_mean | sequence_mean",
            "beta=0.1", "scale of the reported token credit", "guide.placement=system", "system | user",
            "Examples:", "python train.py -m alpha=1.0,1.2,1.4",
        ],
        "not": ["judge\n", "likelihood", "openai", "contestants", "hydra/", "defaults:"],
    },
    "generate": {
        "has": ["model\n", "sampler\n", "data\n", "run_dir=null", "its final/ policy", "principle=null", "Prompting baseline", "Examples:"],
        "not": ["strategy\n", "judge\n", "experiment\n", "alpha="],
    },
    "evaluate": {
        "has": [
            "judge\n", "*likelihood", "openai", "+contestants.<name>.run_dir=", "judge.tie_margin=0.1", "is a tie",
            "judge.base_url=null", "(judge=openai)", "sweep_dir=null", "'+contestants.iq.run_dir=\"outputs/2026-11-23/10-00-00\"'", "Examples:",
        ],
        "not": ["strategy\n", "experiment\n", "deepspeed_zero3", "paper_hh"],
    },
}


@pytest.mark.parametrize("script", sorted(HELP_EXPECTS))
def test_help_lists_the_scripts_groups_keys_with_their_comments_and_examples(script):
    result = subprocess.run([sys.executable, str(REPO / f"{script}.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    flat = " ".join(text.split())  # descriptions wrap at the terminal's width
    for expected in HELP_EXPECTS[script]["has"]:
        assert expected in (text if "\n" in expected else flat), (expected, text)
    for absent in HELP_EXPECTS[script]["not"]:
        assert absent not in text, (absent, text)
    assert text.count("\n  python ") >= 3  # example commands
    assert len(text.splitlines()) < 130  # about two screens


def test_help_descriptions_come_from_the_yaml_comments(tmp_path):
    """One source of truth: a comment edited in the config file is what --help prints."""
    import shutil

    from iq_lightning.help import help_text

    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    train = conf / "train.yaml"
    train.write_text(train.read_text().replace("# m in Algorithm 1", "# prompts sampled per epoch (m)"))
    text = help_text(conf, "train", "Train.\n\nExamples:\n    python train.py a=1\n")
    line = next(line for line in text.splitlines() if line.strip().startswith("samples_per_epoch=32"))
    assert line.rstrip().endswith("prompts sampled per epoch (m)")
    assert "Examples:\n  python train.py a=1" in text


def test_yaml_comment_parser():
    from iq_lightning.help import parse_yaml_comments

    doc = parse_yaml_comments(
        "# header line one\n# header line two\nkey: 1\n\n# block\n# above\nblocked: 2\nsection:\n"
        "  inner: 'a # not a comment'   # inline\n  wrapped: true       # first half\n" + " " * 22 + "# second half\n"
    )
    assert doc.header == "header line one header line two"
    assert "key" not in doc.comments
    assert doc.comments["blocked"] == "block above"
    assert doc.comments["section.inner"] == "inline"
    assert doc.comments["section.wrapped"] == "first half second half"


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, "0"),
        ({"RANK": "3", "LOCAL_RANK": "1"}, "3"),  # torchrun
        ({"LOCAL_RANK": "1"}, "1"),  # a child of Lightning's launcher
        ({"NODE_RANK": "1"}, "1.0"),  # node 1's first process, nodes started by hand
        ({"SLURM_PROCID": "5"}, "5"),  # srun
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "2"}, "2"),  # Lightning's launcher inside one SLURM task
    ],
)
def test_each_process_of_a_launch_locks_the_run_directory_under_its_own_name(env, rank, monkeypatch):
    from iq_lightning.cli import launch_rank

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch_rank() == rank
