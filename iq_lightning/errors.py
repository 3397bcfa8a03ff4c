"""Errors that are the user's to fix: the CLI prints them as one line, never a stack trace."""


class UserError(Exception):
    """A mistake in configuration, data or environment that the user can correct."""


class ConfigError(UserError):
    """An invalid configuration value."""


class DataError(UserError):
    """Prompt data that cannot be read."""


class ModelLoadError(UserError):
    """A model or tokenizer that cannot be loaded (missing, offline, incompatible)."""


class NonFiniteError(UserError):
    """A non-finite loss, guide target, gradient norm or parameter: training stops before the
    optimizer step (or the checkpoint) that would keep it, so the last checkpoint stays good."""


class Stopped(UserError):
    """The run was stopped by a signal (SIGTERM: scancel, preemption) before it finished; its
    newest checkpoint stays good. Exits 128 + SIGTERM, as a shell reports the signal, so that
    `train.py ... && evaluate.py ...` stops there."""

    exit_code = 143


class MissingDependencyError(UserError):
    """An optional package that the chosen configuration needs is not installed."""


def first_line(exc: BaseException) -> str:
    """A library exception reduced to its first line, for a one-line user error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
