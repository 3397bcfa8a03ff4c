"""One evaluation per out_dir at a time. Two evaluations sharing one would append to the same
judgment cache and replace each other's answer files and tables. The lock is an flock on
`out_dir/.lock`: the operating system releases it when its process ends, kill -9 included, so
no stale lock is ever left; the holder writes its pid there, for the one line a second gets."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from iq_lightning.errors import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive(directory: Path, what: str = "evaluation") -> Iterator[None]:
    """Hold `directory`'s lock for the block; UserError (one line naming the holder's pid) when
    another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_FILE, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UserError(
                f"{directory} is in use by another {what} (pid {holder}); wait for it to finish, or give this one another out_dir"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock
