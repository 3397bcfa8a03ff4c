"""How runs and evaluations write their files so that a kill at any moment (or a full disk)
leaves nothing that stops a rerun.

- A cache that grows by appends (judgments.jsonl, judge_checks.jsonl) is read with `read_jsonl`:
  a torn last line (a kill mid-append leaves the bytes after the last newline) is dropped with a
  warning and cut off the file, so the next append starts on a clean line; its record is simply
  judged again. Appends are flushed and fsynced (`append_jsonl`).
- Every file rewritten whole (rollouts, checkpoint pointers, tables, summary, plots, NLL caches,
  answers) is written to a temporary file beside it, fsynced, and renamed over it (`atomic_path`,
  `write_atomically`): a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from iq_lightning.errors import UserError

log = logging.getLogger(__name__)


def cannot_create(directory: Path) -> str | None:
    """Why `directory` cannot be created or written in (None: it can), found by making and
    removing a temporary directory in its nearest existing ancestor, so nothing is left behind."""
    probe = Path(directory).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".write-check-"))
    except OSError as exc:
        return f"{probe}: {exc.strerror or exc}"
    return None


class CorruptFile(UserError):
    """A file of a run's or an evaluation's directory damaged beyond a torn last line."""


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file someone else wrote to disk (before renaming it into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, so writers that go by it still work) to write
    the whole file to; on leaving the block it is fsynced and renamed over `path`. On an
    exception the temporary file is removed and `path` keeps what it held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomically(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that a kill or a full disk leaves either the old file or the new
    one: `<name>.tmp` beside it, synced, renamed over `path`. An OSError (disk full) is one line
    naming the file; the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write {path} ({exc.strerror or exc}); nothing half-written was kept: free space and rerun the same command to resume"
        ) from None
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file that is appended to; [] when there is none. A torn tail (no
    final newline) is dropped with a warning and truncated away; a complete line that is not JSON
    is a CorruptFile error naming path:line."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning(
            "%s: dropped a torn last line (%d bytes, an interrupted write); what it held is computed again", path, len(data) - end
        )
        with path.open("r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
        data = data[:end]
    records = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise CorruptFile(f"{path}:{number}: not a JSON record ({exc.msg}); delete the file to compute what it held again") from None
    return records


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records, one line each, and fsync: a kill leaves at most a torn last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)


# --- the run directory's own records -------------------------------------------------------

RUN_CONFIG_FILE = "config.yaml"


def published_directory(target: Path, fill: Callable[[Path], None], complete: str) -> Path:
    """`target`, made by `fill(directory)` where it is not yet complete: filled under a temporary
    name beside it, marked complete (a file named `complete`, written last) and renamed into
    place, so a kill mid-fill is never read and two processes filling the same target at once
    both end with one complete copy (the second rename finds the first's and keeps it). Raises
    OSError where the directory cannot be written."""
    if (target / complete).exists():
        return target
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        (tmp / complete).write_text(target.name)
        if target.exists() and not (target / complete).exists():
            # Incomplete and not ours (copied in by hand?), or complete where a shared filesystem
            # has not shown the marker yet: moved aside, never deleted under a reader.
            with contextlib.suppress(OSError):
                os.rename(target, target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.aside")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / complete).exists():  # not another process's complete copy
                raise
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_config_path(run_dir: str | Path) -> Path | None:
    """The settings a run trained with: `config.yaml`, written by the run itself once its restart
    check accepted it. Runs of older versions have only Hydra's `.hydra/config.yaml`, which every
    invocation rewrote, refused ones included. None for a directory with neither."""
    for path in (Path(run_dir) / RUN_CONFIG_FILE, Path(run_dir) / ".hydra" / "config.yaml"):
        if path.is_file():
            return path
    return None


class RunDirectoryBusy(UserError):
    """Another process is training into the run directory."""


LOCK_FILE = ".lock"


class RunDirectoryLock:
    """An exclusive lock on a run directory for one rank of one run (`with RunDirectoryLock(...)`).

    A POSIX record lock (lockf) on `.lock` (`.lock.rank<N>` for rank N > 0: the ranks of one run
    are separate processes, and a second launch's every rank must find its place taken). The
    kernel drops it when the process dies, kill -9 included, so no stale lock is ever left; it is
    not inherited by forked children (data loader workers, samplers), and F_GETLK names the
    holder's pid without the holder writing anything. The lock file is never written to."""

    # What a second process is told: {directory}; {holder} ("process N") or {pid} (N) of the holder.
    BUSY = "{directory} is in use by {holder} (a run training into it); wait for it to end or stop it, or start a new run directory (hydra.run.dir=...)"

    def __init__(self, directory: str | Path, rank: str = "0", busy: str | None = None):
        self.path = Path(directory) / (LOCK_FILE if rank == "0" else f"{LOCK_FILE}.rank{rank}")
        self.fd = -1
        self.busy = busy or self.BUSY

    def __enter__(self) -> "RunDirectoryLock":
        import fcntl

        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot lock the run directory {self.path.parent} ({exc.strerror or exc})") from None
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(self.fd)
            os.close(self.fd)
            self.fd = -1
            who = f"process {holder}" if holder else "another process"
            raise RunDirectoryBusy(self.busy.format(directory=self.path.parent, holder=who, pid=holder or "unknown")) from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing releases the lock
            self.fd = -1


def _lock_holder(fd: int) -> int | None:
    """The pid holding a POSIX lock on `fd`'s file (Linux's struct flock), or None."""
    import fcntl
    import struct

    layout = "hhqqi4x"  # l_type, l_whence, l_start, l_len, l_pid (x86_64 and aarch64 Linux)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, 0, 0, 0, 0))
        kind, _, _, _, pid = struct.unpack(layout, answer)
    except (OSError, struct.error):
        return None
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None
