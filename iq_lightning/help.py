"""`--help` of the entry points, written from the config files themselves: the groups a script
composes with their options, the most used keys with their defaults, and each key's comment in
the YAML file that sets it (one source of truth: a comment changed there changes the help)."""

from __future__ import annotations

import re
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from iq_lightning.quoting import shell_override

# The keys each script's help lists beyond the primary file's own top-level ones (in this order).
# Descriptions come from the comments of the YAML files that set them, never from here.
MOST_USED_GROUP_KEYS = {
    "train": [
        "guide.principle", "guide.placement", "guide.device", "sampler.max_new_tokens", "sampler.temperature",
        "sampler.top_p", "sampler.batch_size", "data.path", "data.split", "data.limit", "model.lora.enabled",
        "model.gradient_checkpointing", "strategy.devices", "val.every_n_epochs", "val.prompts", "val.split",
        "logger.mode", "logger.project",
    ],
    "generate": [
        "sampler.max_new_tokens", "sampler.temperature", "data.path", "data.split", "data.limit", "decoding.num_beams",
        "decoding.length_penalty",
    ],
    "evaluate": [
        "judge.model_path", "judge.model", "judge.base_url", "judge.api_key_env", "judge.criteria", "judge.tie_margin", "judge.balanced", "judge_check.matches",
        "judge_check.controls", "elo.bootstrap", "reward.model", "reward.run_dir", "principle_check.kind",
        "judge_free.enabled", "sampler.max_new_tokens", "sampler.temperature", "data.split", "data.limit",
        "guide.principle", "logger.mode", "beam_sweep.contestant", "beam_sweep.num_beams",
    ],
}
# Mapping-valued keys shown as one usage line instead of their entries.
USAGE_LINES = {
    "evaluate": {
        "contestants": '\'+contestants.<name>.run_dir="outputs/<date>/<time>"\'   (or .model_path=DIR; ~contestants.<name> removes one; '
        "+contestants.<name>.decoding.num_beams=4 decodes it by beam search)",
    },
}
NOTES = {
    "train": [
        "hydra.run.dir=DIR names the run directory; the same command with the same DIR resumes an interrupted run.",
        "-m sweeps comma-separated values (-m alpha=1.0,1.2), a run directory each; quote "
        "values with commas, spaces or '=', or use guide.principle_file=FILE.",
        "The method, its equations and the paper's settings: docs/method.md.",
    ],
    "generate": ["hydra.run.dir=DIR names the output directory (output=FILE the responses file)."],
    "evaluate": [
        "out_dir=DIR (or name=NAME) names the output directory; its caches make a rerun cost only what is new. "
        "Quote paths that contain '=' (multirun directories), as above.",
    ],
}
COMMON_NOTE = "Every key of the composed config: python {script} --cfg job   (Hydra's own flags: --hydra-help)."


@dataclass
class YamlDoc:
    """The comments of one YAML file: its header (the comment block before the first key) and,
    per dotted key, the inline comment after its value or else the comment block directly above."""

    header: str = ""
    comments: dict[str, str] = field(default_factory=dict)
    global_package: bool = False


_KEY = re.compile(r"^(\s*)([A-Za-z_][\w-]*)\s*:(.*)$")


def _inline_comment(rest: str) -> tuple[str | None, int]:
    """The `# ...` part of a value (outside quotes) and its offset in `rest`, or (None, -1)."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[i + 1 :].strip(), i
    return None, -1


def parse_yaml_comments(text: str) -> YamlDoc:
    doc = YamlDoc()
    stack: list[tuple[int, str]] = []
    block: list[str] = []
    seen_key = False
    last_key, last_column = None, -1  # the previous line's inline comment, for continuation lines
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            if not seen_key and block:
                doc.header = doc.header or " ".join(block)
            block, last_key = [], None
            continue
        if stripped.startswith("#"):
            body = stripped[1:].strip()
            if body.startswith("@package"):
                doc.global_package = "_global_" in body
                continue
            column = line.index("#")
            if last_key is not None and column == last_column:
                doc.comments[last_key] += " " + body  # a wrapped inline comment
                continue
            block.append(body)
            last_key = None
            continue
        match = _KEY.match(line)
        if not match or stripped.startswith("-"):
            block, last_key = [], None
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        dotted = ".".join(k for _, k in stack)
        comment, offset = _inline_comment(rest)
        if not seen_key:
            seen_key = True
            if block:
                doc.header = " ".join(block)  # the file's header, not this key's
                block = []
        if comment:
            doc.comments[dotted] = comment
            last_key, last_column = dotted, len(line) - len(rest) + offset
        else:
            if block:
                doc.comments[dotted] = " ".join(block)
            last_key = None
        block = []
    if not seen_key and block:
        doc.header = " ".join(block)
    return doc


def yaml_doc(path: Path) -> YamlDoc:
    return parse_yaml_comments(path.read_text(encoding="utf-8")) if path.is_file() else YamlDoc()


def first_sentence(text: str, limit: int = 90) -> str:
    """Up to the end of the first sentence, within `limit` characters ("et al. 2024" goes on)."""
    end = re.search(r"(?<=[a-z0-9)])\.\s+(?=[A-Z])", text)
    cut = text[: end.start() + 1] if end else text
    return cut if len(cut) <= limit else cut[: limit - 3].rsplit(" ", 1)[0] + "..."


def compose_config(config_dir: Path, config_name: str, overrides: Iterable[str] = (), with_hydra: bool = True) -> DictConfig:
    """The config exactly as the script's @hydra.main composes it (nothing is run)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(Path(config_dir).resolve()), job_name=config_name):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=with_hydra)


def script_groups(cfg: DictConfig) -> dict[str, str | None]:
    """group -> default option, for the groups the script's defaults list uses (Hydra's own
    excluded), in the order of that list."""
    choices = cfg.hydra.runtime.choices
    return {g: choices[g] for g in reversed(list(choices)) if not g.startswith("hydra/")}


def group_options(config_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def key_comments(config_dir: Path, config_name: str, groups: dict[str, str | None]) -> dict[str, str]:
    """Every dotted key's comment: the primary file's own first, else the chosen group file's."""
    comments: dict[str, str] = {}
    for group, option in groups.items():
        if option is None:
            continue
        doc = yaml_doc(config_dir / group / f"{option}.yaml")
        prefix = "" if doc.global_package else f"{group}."
        comments.update({prefix + k: v for k, v in doc.comments.items()})
    comments.update(yaml_doc(config_dir / f"{config_name}.yaml").comments)
    return comments


def _value(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            raise KeyError(key)
        node = node._get_node(part)
        if isinstance(node, (DictConfig, ListConfig)):
            continue
        node = node._value()
    return node


def _shown(value: Any, limit: int = 28) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    if isinstance(value, str) and (" " in value or "," in value):
        text = f"'{text}'"
    return text if len(text) <= limit else text[: limit - 4] + "...'" if text.startswith("'") else text[: limit - 3] + "..."


def examples_of(doc: str) -> tuple[str, list[str]]:
    """(description, example commands) of an entry point's docstring: the text before its
    "Examples:" line, and the `python ...` lines after it."""
    text = (doc or "").strip()
    head, _, tail = text.partition("Examples:")
    description = " ".join(line.strip() for line in head.splitlines() if line.strip())
    return description, [line.strip() for line in tail.splitlines() if line.strip().startswith("python ")]


def help_text(config_dir: Path, config_name: str, doc: str, cfg: DictConfig | None = None, width: int | None = None) -> str:
    """The whole --help page of `config_name`.py."""
    cfg = cfg if cfg is not None else compose_config(config_dir, config_name)
    width = width or min(max(shutil.get_terminal_size((100, 20)).columns, 80), 120)
    script = f"{config_name}.py"
    groups = script_groups(cfg)
    comments = key_comments(config_dir, config_name, groups)
    description, examples = examples_of(doc)
    out = [*textwrap.wrap(f"{script}: {description}", width), "", f"usage: python {script} [-m] [group=option ...] [key=value ...]", ""]

    out.append("Groups (group=option; * marks the default):")
    for group, default in groups.items():
        out.append(f"  {group}")
        for option in group_options(config_dir, group):
            header = yaml_doc(config_dir / group / f"{option}.yaml").header
            mark = "*" if option == default else " "
            line = f"    {mark}{option:<16}" + (first_sentence(header, width - 22) if header else "")
            out.append(line.rstrip())

    primary = OmegaConf.load(config_dir / f"{config_name}.yaml")
    top = [k for k in primary if k not in ("defaults", "hydra") and not isinstance(primary._get_node(k), DictConfig)]
    usage = USAGE_LINES.get(config_name, {})
    keys = top + [k for k in MOST_USED_GROUP_KEYS.get(config_name, []) if k not in top]
    rows = []
    for key in keys:
        try:
            value = _value(cfg, key)
            if key.rsplit(".", 1)[-1] == "principle" and isinstance(value, str):
                # Prose is shown whole (a cut principle reads as another), quoted as the shell needs it.
                rows.append((shell_override(key, value), comments.get(key, "")))
            else:
                rows.append((f"{key}={_shown(value)}", comments.get(key, "")))
        except KeyError:  # a key of another option of its group: say which
            group, _, rest = key.partition(".")
            for option in group_options(config_dir, group) if group in groups else []:
                other = OmegaConf.load(config_dir / group / f"{option}.yaml")
                if OmegaConf.select(other, rest, default="<absent>") != "<absent>":
                    note = yaml_doc(config_dir / group / f"{option}.yaml").comments.get(rest, "")
                    shown = _shown(OmegaConf.select(other, rest))
                    rows.append((f"{key}={shown}", f"({group}={option}) {note}".strip()))
                    break
    rows += [(line, comments.get(key, "")) for key, line in usage.items()]
    column = min(max(len(left) for left, _ in rows) + 2, 38)
    out += ["", "Keys (key=default):"]
    for left, text in rows:
        if len(left) + 2 > column:
            out.append(f"  {left}")
            left = ""
        if not text:
            if left:
                out.append(f"  {left}")
            continue
        wrapped = textwrap.wrap(text, width - column - 2) or [""]
        out.append(f"  {left:<{column}}{wrapped[0]}")
        out += [f"  {'':<{column}}{more}" for more in wrapped[1:]]

    out += ["", "Examples:"] + [f"  {e}" for e in examples]
    out.append("")
    for note in [*NOTES.get(config_name, []), COMMON_NOTE.format(script=script)]:
        out += textwrap.wrap(note, width, subsequent_indent="  ")
    return "\n".join(out) + "\n"
