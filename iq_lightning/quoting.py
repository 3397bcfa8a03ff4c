"""How a value is written on a command line so that the shell and Hydra both read it back whole:
Hydra reads an unquoted comma as a sweep, and '=', spaces and brackets as its own syntax."""

from __future__ import annotations

import re
import shlex

# A Hydra value needs no quotes when it holds none of the characters its grammar reads.
_PLAIN_VALUE = re.compile(r"[\w./:@+-]+")


def hydra_value(text: str) -> str:
    """`text` as a Hydra override value: as is when plain, else double-quoted (commas, spaces,
    '=' and brackets inside stay part of one value)."""
    if _PLAIN_VALUE.fullmatch(text):
        return text
    # Inside Hydra's quotes a backslash is literal except before a quote (or the closing one), and
    # ${...} is still interpolated unless escaped.
    escaped = re.sub(r'(\\*)("|$)', lambda m: m.group(1) * 2 + ("\\" + m.group(2) if m.group(2) else ""), text)
    return '"' + escaped.replace("${", "\\${") + '"'


def shell_override(key: str, text: str) -> str:
    """`key=text` as one shell word Hydra reads back as exactly `text`."""
    return shlex.quote(f"{key}={hydra_value(text)}")
