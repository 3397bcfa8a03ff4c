"""Command-line plumbing shared by train.py and generate.py: one clear line for user errors."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable

from iq_lightning.errors import UserError


def configure_environment() -> None:
    """Entry-point defaults: quiet tokenizers fork warnings; W&B never blocks on a login prompt."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")


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
            sys.exit(2)

    return wrapper
