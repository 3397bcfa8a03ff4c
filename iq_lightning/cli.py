"""Command-line plumbing shared by the entry points: `--help` written from the config files, the
command line checked before Hydra composes it, and every user mistake as one `error:` line."""

from __future__ import annotations

import difflib
import functools
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from iq_lightning.errors import UserError, first_line

# Mappings whose entries the user names (`+contestants.iq.run_dir=...`): new keys are welcome there.
FREE_FORM = (
    "contestants", "sampler.options", "strategy.options", "judge.extra_body", "model.architecture", "guide.model.architecture", "val.check",
)
# Hydra's flags that take the command line out of the ordinary: left to Hydra unchecked.
_UNCHECKED_FLAGS = ("hydra_help", "shell_completion", "config_path", "config_name", "config_dir", "experimental_rerun")


def configure_environment() -> None:
    """Entry-point defaults: quiet tokenizers fork warnings; W&B never blocks on a login prompt."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")


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


def resume_command(script: str, overrides: Sequence[str], run_dir: str | Path) -> str:
    """The command that continues a run: `python <script>` with the job's overrides and its
    directory (a sweep's job too, which Hydra put in a directory of its own)."""
    import shlex

    kept = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    return " ".join(["python", script, *map(shlex.quote, kept), shlex.quote(f"hydra.run.dir={Path(run_dir).resolve()}")])


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

    try:
        default = compose(config_dir, config_name, [])
    except Exception as exc:  # the shipped config itself is broken: not the user's mistake, but one line all the same
        raise CommandLineError(f"the config {config_name}.yaml does not compose: {first_line(exc)}") from None
    from iq_lightning.help import group_options, script_groups

    groups = {g: group_options(config_dir, g) for g in script_groups(default)}
    others = _other_scripts(config_dir, config_name)
    conf_groups = sorted(p.name for p in config_dir.iterdir() if p.is_dir() and p.name != "hydra")

    group_overrides, key_overrides = [], []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra/"):
            continue  # Hydra's own groups (launcher, sweeper, ...)
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
    fixed = [o.input_line for o in group_overrides if not o.is_sweep_override()]
    swept = [[f"{o.key_or_group}={v}" for v in _options(o)] for o in group_overrides if o.is_sweep_override()]
    configs = []
    for combination in itertools.product(*swept) if swept else [()]:
        try:
            configs.append(compose(config_dir, config_name, fixed + list(combination)))
        except Exception as exc:
            raise CommandLineError(f"{first_line(exc)} ({' '.join(fixed + list(combination))})") from None

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
