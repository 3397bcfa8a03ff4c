"""Command-line plumbing shared by the entry points: `--help` written from the config files, the
command line checked before Hydra composes it, and every user mistake as one `error:` line."""

from __future__ import annotations

import contextlib
import difflib
import functools
import itertools
import logging
import os
import shlex
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from iq_lightning.errors import Stopped, UserError, first_line
from iq_lightning.quoting import shell_override

# Mappings whose entries the user names (`+contestants.iq.run_dir=...`): new keys are welcome there.
FREE_FORM = (
    "contestants", "sampler.options", "strategy.options", "judge.extra_body", "model.architecture", "guide.model.architecture", "val.check",
)
# Hydra's flags that take the command line out of the ordinary: left to Hydra unchecked.
_UNCHECKED_FLAGS = ("hydra_help", "shell_completion", "config_path", "config_name", "config_dir", "experimental_rerun")


# Libraries' lines that tell a user of this project nothing they can act on.
_NOISE_WARNINGS = (
    # Lightning 2.6's own pytree helper asks torch >= 2.9 a deprecated question on every fit.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
_NOISE_LOG_LINES = (
    "💡 Tip: For seamless cloud logging",  # Lightning's advertisement for its hosted logger
    "Setting accelerator to CPU.",  # DeepSpeed, imported (by peft) on a CPU run that does not use it
)
_NOISY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "DeepSpeed")


def configure_environment() -> None:
    """Entry-point defaults: quiet tokenizers fork warnings; W&B never blocks on a login prompt."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE_LOG_LINES)


def launch_rank() -> str:
    """Which process of a launch this is, before Lightning has set up its ranks: torchrun's RANK;
    Lightning's own launcher's NODE_RANK and LOCAL_RANK (its children, and every node's first
    process when nodes are started by hand); srun's SLURM_PROCID; "0" for a single process."""
    env = os.environ
    if env.get("RANK"):
        return env["RANK"]
    if env.get("LOCAL_RANK") or env.get("NODE_RANK"):
        node, local = env.get("NODE_RANK") or "0", env.get("LOCAL_RANK") or "0"
        return local if node == "0" else f"{node}.{local}"
    return env.get("SLURM_PROCID") or "0"


def single_log_stream() -> None:
    """Hydra already logs every record to the console and the run's log file; Lightning's own
    console handlers would print each of its lines a second time."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


def resume_command(script: str, overrides: Sequence[str], run_dir: str | Path) -> str:
    """The command that continues the run in `run_dir`: the same overrides (one sweep job's own,
    without -m) plus hydra.run.dir, so the restart finds the checkpoint instead of starting a new
    timestamped directory."""
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")]
    return " ".join(["python", script, *(shlex.quote(o) for o in kept), shell_override("hydra.run.dir", str(run_dir))])


def run_name(overrides: Sequence[str], exclude: Sequence[str] = ("hydra.", "logger")) -> str | None:
    """A W&B run name from a run's overrides (`alpha=1.2 model=tiny`), so the members of a sweep
    are told apart; None without overrides."""
    kept = sorted(o for o in overrides if not o.lstrip("+~").startswith(tuple(exclude)))
    return " ".join(kept)[:128] or None


@contextlib.contextmanager
def resume_hint(script: str, overrides: Sequence[str], run_dir: str | Path, started: Callable[[], bool]):
    """On Ctrl-C or any failure of a run that had started training (`started()`), end with the
    command that resumes it: a mistake found before (a refused restart, a missing file) is
    answered by its own error line alone. Ctrl-C exits 130; a UserError prints its `error:` line
    first and exits with its code (2; SIGTERM's Stopped 143)."""
    def hint(what: str) -> None:
        print(f"{what}; resume with:\n  {resume_command(script, overrides, run_dir)}", file=sys.stderr)

    try:
        yield
    except KeyboardInterrupt:
        hint("\ninterrupted")
        sys.exit(130)
    except SystemExit as exc:
        if exc.code not in (0, None) and started():
            hint("\nstopped")  # Lightning ends its own Ctrl-C handling (a graceful shutdown) with exit 1
        raise
    except UserError as exc:
        if not started():
            raise
        if isinstance(exc, Stopped):  # one line: where it stopped, and the command that goes on
            print(f"error: {exc}: {resume_command(script, overrides, run_dir)}", file=sys.stderr)
            sys.exit(exc.exit_code)  # 143, as a shell reports SIGTERM
        print(f"error: {exc}", file=sys.stderr)
        hint("after fixing that")
        sys.exit(2)
    except Exception:
        if not started():
            raise
        traceback.print_exc()  # here, so that the way back is the last thing on the screen
        hint("\nthe run failed; after fixing the cause")
        sys.exit(1)


def user_errors_as_one_line(func: Callable) -> Callable:
    """Print a UserError as `error: ...` and exit 2 instead of a stack trace."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            logging.getLogger("iq_lightning").debug("user error", exc_info=True)
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(getattr(exc, "exit_code", 2))

    return wrapper


class CommandLineError(UserError):
    """A command line that Hydra would refuse, or that would silently do something else."""


def check_command_line(config_dir: str | Path, config_name: str, doc: str, argv: Sequence[str] | None = None) -> None:
    """Before Hydra runs: `-h/--help` prints the script's help and exits 0; a mistake in the
    overrides prints one `error:` line and exits 2. Anything else falls through to Hydra."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        text = command_line_help_or_error(Path(config_dir), config_name, doc, args)
    except CommandLineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if text is not None:
        sys.stdout.write(text)
        sys.exit(0)


def check_output_dir(config_dir: str | Path, config_name: str, argv: Sequence[str] | None = None) -> None:
    """Before Hydra creates the run (or sweep) directory: one `error:` line, exit 2, where it
    cannot be created or written in (Hydra's own report is a traceback)."""
    from iq_lightning.files import cannot_create
    from iq_lightning.help import compose_config

    parsed = _parse_flags(config_name, list(sys.argv[1:] if argv is None else argv))
    if parsed.help or any(getattr(parsed, flag, None) for flag in _UNCHECKED_FLAGS):
        return
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        fixed = [o.input_line for o in OverridesParser.create().parse_overrides(parsed.overrides) if not o.is_sweep_override()]
        hydra = compose_config(Path(config_dir), config_name, fixed).hydra
        where = Path(hydra.sweep.dir if parsed.multirun else hydra.run.dir)
    except Exception:  # noqa: BLE001 -- a config Hydra cannot compose is Hydra's to report
        return
    problem = cannot_create(where)
    if problem:
        key = "hydra.sweep.dir" if parsed.multirun else "hydra.run.dir"
        print(f"error: cannot write the output directory {where} ({problem}); choose a writable one with {key}=...", file=sys.stderr)
        sys.exit(2)


def command_line_help_or_error(config_dir: Path, config_name: str, doc: str, args: list[str]) -> str | None:
    """The help text for -h/--help, None for a command line that is fine; CommandLineError otherwise."""
    from iq_lightning.help import compose_config, help_text

    parsed = _parse_flags(config_name, args)
    if parsed.multirun and (parsed.cfg or parsed.info):
        raise CommandLineError("-m (a sweep) cannot be combined with --cfg or --info: drop one of them")
    if parsed.help:
        return help_text(config_dir, config_name, doc)
    if any(getattr(parsed, flag, None) for flag in _UNCHECKED_FLAGS):
        return None
    check_overrides(config_dir, config_name, parsed.overrides, compose_config)
    return None


def _parse_flags(config_name: str, args: list[str]):
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def refuse(message: str):
        raise CommandLineError(f"{message} (python {config_name}.py --help lists what it takes)")

    parser.error = refuse  # argparse would print its usage and exit
    return parser.parse_args(args)


def did_you_mean(name: str, candidates: Sequence[str]) -> str | None:
    """The closest candidates, as "a" or "a or b": keys ending in the same name (temperature ->
    sampler.temperature), else the closest whole dotted name, else the closest last part."""
    leaf = name.rsplit(".", 1)[-1]
    same_leaf = [c for c in candidates if c != name and c.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return " or ".join(sorted(same_leaf, key=lambda c: (c.count("."), c))[:3])
    parent = name.rpartition(".")[0]
    siblings = {c.rsplit(".", 1)[-1]: c for c in candidates if c.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.5)
    if parent and close:
        return siblings[close[0]]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.75)
    if close:
        return close[0]
    by_leaf: dict[str, str] = {}
    for c in sorted(candidates, key=lambda c: (c.count("."), c)):
        by_leaf.setdefault(c.rsplit(".", 1)[-1], c)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
    return by_leaf[close[0]] if close else None


def _suggestion(name: str, candidates: Sequence[str]) -> str:
    best = did_you_mean(name, candidates)
    return f" (did you mean {best}?)" if best else ""


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            dotted = f"{prefix}{key}"
            keys.append(dotted)
            keys += _all_keys(node._get_node(key), dotted + ".")
    return keys


def _lookup(cfg: Any, key: str) -> tuple[bool, str, Any]:
    """(whether `key` exists, its deepest existing ancestor, that ancestor's node)."""
    from omegaconf import DictConfig, ListConfig

    node, found = cfg, ""
    for part in key.split("."):
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_missing() and part in node.keys():
            node = node._get_node(part)  # (`part in node` would be False for a mandatory ??? value)
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        else:
            return False, found, node
        found = f"{found}.{part}" if found else part
    return True, found, node


def _free_form(ancestor: str, node: Any) -> bool:
    from omegaconf import DictConfig

    named = any(ancestor == f or ancestor.startswith(f + ".") for f in FREE_FORM)
    return named and (node is None or isinstance(node, DictConfig) or getattr(node, "_is_none", lambda: False)())


def _other_scripts(config_dir: Path, config_name: str) -> dict[str, list[str]]:
    """Config groups that other entry points' primary files use -> those scripts."""
    from omegaconf import OmegaConf

    users: dict[str, list[str]] = {}
    for name in _other_entry_points(config_dir, config_name):
        primary = config_dir / f"{name}.yaml"
        for entry in OmegaConf.load(primary).get("defaults", []) or []:
            if isinstance(entry, str) or entry is None:
                continue
            for group in entry:
                group = str(group).removeprefix("optional ").removeprefix("override ").strip()
                if group != "_self_":
                    users.setdefault(group, []).append(f"{primary.stem}.py")
    return users


def _has_key(compose: Callable, config_dir: Path, config_name: str, key: str) -> bool:
    try:
        return _lookup(compose(config_dir, config_name, []), key)[0]
    except Exception:  # another entry point's config that does not compose says nothing here
        return False


def _other_entry_points(config_dir: Path, config_name: str) -> list[str]:
    return [p.stem for p in sorted(config_dir.glob("*.yaml")) if p.stem != config_name]


def _options(override) -> list[Any]:
    from hydra.core.override_parser.types import ChoiceSweep

    if override.is_delete():
        return []
    if not override.is_sweep_override():
        return [override.value()]
    value = override.value()
    return list(value.list) if isinstance(value, ChoiceSweep) else []


def check_overrides(config_dir: Path, config_name: str, overrides: list[str], compose: Callable) -> None:
    """Raise CommandLineError (one line) for an override Hydra would reject with its own
    multi-line message, or that the script would silently ignore:
      - an unparseable override;
      - a group the script does not use (`judge=openai` on train.py), or a group option that does not exist;
      - an unknown key, with or without `+` (a did-you-mean suggestion from the composed config's keys);
      - `+key=` on an existing key, a new contestant without `+`;
      - `data.path` given while the data source ignores it (anything but data=local).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    script = f"{config_name}.py"
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append(parser.parse_override(text))
        except Exception as exc:
            raise CommandLineError(
                f"cannot read {text!r} ({first_line(exc)}): write key=value, and quote a value with spaces, commas or '='"
            ) from None

    for o in parsed:
        _refuse_split_text(o)

    try:
        default = compose(config_dir, config_name, [])
    except Exception as exc:  # the shipped config itself is broken: not the user's mistake, but one line all the same
        raise CommandLineError(f"the config {config_name}.yaml does not compose: {first_line(exc)}") from None
    from iq_lightning.help import group_options, script_groups

    groups = {g: group_options(config_dir, g) for g in script_groups(default)}
    others = _other_scripts(config_dir, config_name)
    conf_groups = sorted(p.name for p in config_dir.iterdir() if p.is_dir() and p.name != "hydra")

    group_overrides, key_overrides, hydra_groups = [], [], []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra/"):
            # Hydra's own groups (launcher, sweeper, ...): Hydra checks the option; its keys
            # (hydra.launcher.timeout_min) exist only once it is composed in.
            hydra_groups += [] if o.is_sweep_override() else [o.input_line]
            continue
        if key in conf_groups or (key in others and "." not in key):
            if key not in groups:
                users = others.get(key)
                whose = f" ({key} belongs to {', '.join(users)})" if users else ""
                raise CommandLineError(f"{script} has no config group {key!r}{whose}; its groups: {', '.join(groups)}")
            for option in _options(o):
                if option is not None and str(option) not in groups[key]:
                    raise CommandLineError(
                        f"{key}={option}: no such option{_suggestion(str(option), groups[key])}; {key} options: {', '.join(groups[key])}"
                    )
            group_overrides.append(o)
        else:
            key_overrides.append(o)

    # Compose once per combination of swept group options: keys depend on the options chosen.
    fixed = hydra_groups + [o.input_line for o in group_overrides if not o.is_sweep_override()]
    swept = [[f"{o.key_or_group}={v}" for v in _options(o)] for o in group_overrides if o.is_sweep_override()]
    configs = []
    for combination in itertools.product(*swept) if swept else [()]:
        try:
            configs.append(compose(config_dir, config_name, fixed + list(combination)))
        except Exception as exc:
            raise CommandLineError(f"{first_line(exc)} ({' '.join(fixed + list(combination))})") from None

    from iq_lightning.evaluation.endpoint import check_key_variable

    for o in key_overrides:  # a key pasted as judge.api_key_env: refused before Hydra echoes it into .hydra/*.yaml
        for option in _options(o) if o.key_or_group == "judge.api_key_env" else []:
            try:
                check_key_variable(None if option is None else str(option))
            except UserError as exc:
                raise CommandLineError(str(exc)) from None

    candidates = sorted({k for cfg in configs for k in _all_keys(cfg) if not k.startswith("hydra.")} | set(groups))
    hydra_keys = sorted({k for cfg in configs for k in _all_keys(cfg) if k.startswith("hydra.")})
    for o in key_overrides:
        key = o.key_or_group
        lookups = [_lookup(cfg, key) for cfg in configs]
        exists = any(found for found, _, _ in lookups)
        if exists:
            if o.is_add():
                raise CommandLineError(f"{key} is already in the config: write {key}=... without the leading +")
            continue
        free = any(_free_form(ancestor, node) for _, ancestor, node in lookups)
        if o.is_delete():
            raise CommandLineError(f"cannot remove {key}: no such key{_suggestion(key, candidates)}")
        if free:
            if o.is_add() or o.is_force_add():
                continue
            raise CommandLineError(f"{key} is a new key: add it with a leading + ('+{o.input_line}')")
        top = key.split(".", 1)[0]
        if top in others and top not in groups:
            raise CommandLineError(f"{script} has no {top!r} keys ({top} belongs to {', '.join(others[top])}); its groups: {', '.join(groups)}")
        if key.startswith("hydra."):
            raise CommandLineError(f"unknown key {key}{_suggestion(key, hydra_keys)}")
        elsewhere = [other for other in _other_entry_points(config_dir, config_name) if _has_key(compose, config_dir, other, key)]
        # A whole section of another script (reward.model on train.py) needs no look-alike here.
        close = did_you_mean(key, candidates) if not elsewhere or "." not in key else None
        notes = ([f"{key} is a key of {', '.join(f'{e}.py' for e in elsewhere)}"] if elsewhere else []) + ([f"did you mean {close}?"] if close else [])
        hint = f" ({'; '.join(notes)})" if notes else ""
        raise CommandLineError(f"unknown key {key}{hint}; python {script} --help lists the keys")

    # Settings that compose but that the script would ignore without a word.
    from omegaconf import OmegaConf

    values = {o.key_or_group: o for o in key_overrides}
    path = values.get("data.path")
    for cfg in configs:
        data = cfg.get("data")
        if data is None or "source" not in data:
            continue
        source = values["data.source"].value() if "data.source" in values and not values["data.source"].is_sweep_override() else data.source
        given = path is not None and not path.is_delete() and _options(path) not in ([None], [])
        if source == "local" and not given and OmegaConf.is_missing(data, "path"):
            raise CommandLineError("data=local needs data.path=/path/to/prompts.jsonl (or .parquet): rows with \"prompt\" or \"messages\"")
        if source != "local" and (given or data.get("path") is not None):
            shown = path.input_line if given else f"data.path={data.get('path')}"
            raise CommandLineError(f"{shown} is read only with data=local, and the prompts come from data={source}: add data=local")

    named = values.get("guide.principle_file")
    if "guide.principle" in values and named is not None and not named.is_delete() and _options(named) not in ([None], []):
        raise CommandLineError("guide.principle and guide.principle_file both given: the file's text would replace the other; give one")

    # The values config.validate would refuse only after torch and transformers have loaded (15-20 s),
    # refused here in its words.
    for o in key_overrides:
        check = EARLY_CHECKS.get(o.key_or_group)
        for value in _options(o) if check else []:
            problem = check(o.key_or_group, value)
            if problem:
                raise CommandLineError(problem)


def _at_least(minimum: int, integer: bool = False, note: str = "") -> Callable[[str, Any], str | None]:
    def check(key: str, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            return f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}"
        return None if value >= minimum else f"{key} must be >= {minimum}{note}, got {value}"

    return check


def _existing_file(key: str, value: Any) -> str | None:
    return None if value is None or Path(str(value)).is_file() else f"{key}={value}: no such file"


# Simple keys checked on the command line itself; config.validate checks them all again.
EARLY_CHECKS: dict[str, Callable[[str, Any], str | None]] = {
    "alpha": _at_least(0, note=" (the paper uses 1.0-1.5)"),
    "epochs": _at_least(1, integer=True),
    "samples_per_epoch": _at_least(1, integer=True),
    "micro_batch_size": _at_least(1, integer=True),
    "data.path": _existing_file,
    "guide.principle_file": _existing_file,
}

_SENTENCE_END = (".", "!", "?", ":", ";", ")", '"', "'")


def _prose_key(key: str) -> bool:
    """Keys whose values are prose, where a comma is punctuation far more often than a sweep."""
    return key.rsplit(".", 1)[-1] == "principle"


def _refuse_split_text(o) -> None:
    """Hydra reads every unquoted comma as a sweep: `guide.principle=Always reply in German,
    whatever the language.` is two runs, one per piece. Pieces that do not each read as a whole
    sentence are refused with the quoting that keeps the text whole; pieces quoted one by one
    ('A.','B.') are a sweep meant as one."""
    if not _prose_key(o.key_or_group) or not o.is_sweep_override():
        return
    raw = o.input_line.split("=", 1)[1]
    pieces = [str(p) for p in _options(o)]
    if "'" in raw or '"' in raw or not pieces or raw.lstrip().startswith(("choice(", "glob(")):
        return  # quoted pieces, or Hydra's sweep functions: a sweep meant as one
    whole = all(p.rstrip().endswith(_SENTENCE_END) for p in pieces[:-1]) and all(p[:1].isupper() for p in pieces[1:])
    if whole and ", " not in raw:
        return
    key = o.input_line.split("=", 1)[0]
    from_file = " (or put the text in a file: guide.principle_file=FILE)" if o.key_or_group == "guide.principle" else ""
    raise CommandLineError(
        f"{key}: Hydra reads the comma in this text as a sweep over {len(pieces)} pieces of it; keep it whole with quotes "
        f"inside the shell's: {shell_override(key, raw)}{from_file}; a sweep over whole texts quotes each one ({key}='\"A.\"','\"B.\"')"
    )


_ANY_SHARED_DIR = "/shared/outputs/my-run"


class ExternalLaunch(NamedTuple):
    """A launcher that started this process beside others: each process composes its own config."""

    name: str
    run_dir: str  # a run directory to suggest: from the launcher's job id, the same in every process, where there is one
    log_name: str | None = None  # train_rank<N>, train_node<N>: a process other than the job's first; None: the first, or one Lightning names


def external_launch(environ: Mapping[str, str]) -> ExternalLaunch | None:
    """The launcher named by the process environment, or None for a plain start (Lightning's own
    children carry LOCAL_RANK, and the parent's run directory on their command line)."""
    if "TORCHELASTIC_RUN_ID" in environ:
        run_id = environ["TORCHELASTIC_RUN_ID"]
        run_dir = _ANY_SHARED_DIR if run_id in ("", "none") else f"outputs/torchrun-{run_id}"
        return ExternalLaunch("torchrun", run_dir, _log_name("rank", environ.get("RANK", "0")))
    # Tasks started by srun (an interactive allocation, named bash or interactive, is Lightning's
    # to launch in, as it decides in SLURMEnvironment.detect).
    tasks = environ.get("SLURM_NTASKS", "1")
    if environ.get("SLURM_JOB_ID") and tasks.isdigit() and int(tasks) > 1 and environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return ExternalLaunch("srun", f"outputs/slurm-{environ['SLURM_JOB_ID']}", _log_name("rank", environ.get("SLURM_PROCID", "0")))
    named = [k for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE") if k in environ]
    if not named:
        return None
    # Node 0's first process is rank 0, and Lightning names the processes it starts beside it
    # (train_ddp_process_<local rank>); it would give the other nodes' processes the same names.
    node, local = environ.get("NODE_RANK", "0"), environ.get("LOCAL_RANK", "0")
    process = _log_name("node", node + (f"_{local}" if local != "0" else "")) if node != "0" else None
    return ExternalLaunch(f"a launch per process or node ({'/'.join(named)} set)", _ANY_SHARED_DIR, process)


def _log_name(kind: str, place: str) -> str | None:
    return None if place == "0" else f"train_{kind}{place}"


def own_log_overrides(launch: ExternalLaunch | None) -> list[str]:
    """Hydra overrides that give a process other than rank 0 its own log file and keep it from
    rewriting the run's .hydra/ (as Lightning does for the processes it starts itself)."""
    if launch is None or launch.log_name is None:
        return []
    return [f"hydra.job.name={launch.log_name}", "hydra.output_subdir=null"]


def check_shared_run_dir(config_dir: str | Path, config_name: str, launch: ExternalLaunch | None, argv: Sequence[str] | None = None) -> None:
    """Refuse (one `error:` line, exit 2) a run of several nodes or externally launched processes
    whose run directory is named by the clock (`${now:...}`): every process would evaluate it
    itself and write its own, so resume, rollout reuse and export would disagree."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        message = shared_run_dir_error(Path(config_dir), config_name, launch, args)
    except Exception:  # noqa: BLE001 - check_command_line has its own words for a command line that does not compose
        return
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def shared_run_dir_error(config_dir: Path, config_name: str, launch: ExternalLaunch | None, args: list[str]) -> str | None:
    """The refusal check_shared_run_dir prints, or None when every process names the same directory."""
    from iq_lightning.help import compose_config

    parsed = _parse_flags(config_name, args)
    if parsed.help or parsed.cfg or parsed.info or any(getattr(parsed, f, None) for f in _UNCHECKED_FLAGS):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # A sweep's swept values do not name its directory (and do not compose as they are).
    fixed = [o.input_line for o in OverridesParser.create().parse_overrides(parsed.overrides) if not o.is_sweep_override()]
    cfg = compose_config(config_dir, config_name, fixed)
    num_nodes = int(cfg.strategy.num_nodes) if "strategy" in cfg else 1
    # A sweep submitted from a login node (hydra/launcher=slurm) names its directory there, once.
    if (launch is None and (num_nodes <= 1 or parsed.multirun)) or cfg.get("dry_run"):
        return None
    key = "sweep" if parsed.multirun else "run"
    if "${now:" not in str(cfg.hydra[key]._get_node("dir")._value()):
        return None
    who = launch.name if launch is not None else f"strategy.num_nodes={num_nodes}"
    example = launch.run_dir if launch is not None else _ANY_SHARED_DIR
    return (
        f"{who}: every process would name its own {key} directory from the clock; give them one on a filesystem "
        f"all nodes share: hydra.{key}.dir={example}"
    )
