"""One evaluation per out_dir at a time. Two evaluations sharing one would append to the same
judgment cache and replace each other's answer files and tables. The lock is the run directory's
(files.RunDirectoryLock, on `out_dir/.lock`): the kernel releases it when its process ends, kill -9
included, so no stale lock is ever left, and a second evaluation is told the holder's pid."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from iq_lightning.files import RunDirectoryLock


@contextlib.contextmanager
def exclusive(directory: Path, what: str = "evaluation") -> Iterator[None]:
    """Hold `directory`'s lock for the block; UserError (one line naming the holder's pid) when
    another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    busy = f"{{directory}} is in use by another {what} (pid {{pid}}); wait for it to finish, or give this one another out_dir"
    with RunDirectoryLock(directory, busy=busy):
        yield
