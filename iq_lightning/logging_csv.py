"""metrics.csv that survives a restart, and a kill -9 anywhere.

Lightning's CSV writer deletes an existing file when it starts (which would drop every completed
epoch's metrics when a run resumes) and rewrites the file in place when a new column appears.
Here rows are appended, a rewrite goes through a temporary file and a rename, a torn last line
(a kill mid-append) is dropped, and a row logged again (a resumed run replays the epoch it was
killed in) replaces the earlier one: a row is identified by its epoch, step and the metrics it
holds, so metrics.csv never holds one twice.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def _row_key(row: dict) -> tuple:
    def plain(value) -> str:
        return "" if value is None else str(value)

    epoch, step = plain(row.get("epoch")), plain(row.get("step"))
    try:  # the file holds "0", a fresh row the int 0 or "0.0"-like floats
        epoch, step = str(int(float(epoch))) if epoch else "", str(int(float(step))) if step else ""
    except ValueError:
        pass
    filled = tuple(sorted(k for k, v in row.items() if k not in ("epoch", "step") and plain(v) != ""))
    return epoch, step, filled


def _read_rows(path: Path) -> tuple[list[str], list[dict], bool]:
    """(header, rows, torn): a last line without its newline is a kill mid-append and is dropped."""
    data = path.read_bytes()
    torn = bool(data) and not data.endswith(b"\n")
    if torn:
        data = data[: data.rfind(b"\n") + 1]
    text = data.decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = list(reader)
    return list(reader.fieldnames or []), rows, torn


def _write_rows(path: Path, header: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def logged_max_step(path: str | Path) -> int | None:
    """The highest step in a metrics.csv (None when there is none): where a resumed W&B run stands."""
    path = Path(path)
    if not path.is_file():
        return None
    steps = []
    for row in _read_rows(path)[1]:
        try:
            steps.append(int(float(row.get("step") or "")))
        except ValueError:
            continue
    return max(steps, default=None)


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Keep the file and its columns; new rows are appended (and the header widened if needed).
        self._keys_in_file: set[tuple] = set()
        path = Path(self.metrics_file_path)
        if path.is_file():
            header, rows, torn = _read_rows(path)
            if torn:
                _write_rows(path, header, rows)
            self.metrics_keys = sorted(header)
            self._keys_in_file = {_row_key(r) for r in rows}

    def save(self) -> None:
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        new_keys = self._record_new_keys()
        again = {_row_key(m) for m in self.metrics} & self._keys_in_file
        if path.is_file() and (new_keys or again):
            _, rows, _ = _read_rows(path)
            _write_rows(path, self.metrics_keys, [r for r in rows if _row_key(r) not in again])
        exists = path.is_file()
        with path.open("a" if exists else "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
            if not exists:
                writer.writeheader()
            writer.writerows(self.metrics)
        self._keys_in_file |= {_row_key(m) for m in self.metrics}
        self.metrics = []


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that appends to the run's metrics.csv, flushing every step so an interrupted
    run keeps what it logged."""

    def __init__(self, save_dir: str, name: str = "metrics"):
        super().__init__(save_dir=save_dir, name=name, version="", flush_logs_every_n_steps=1)

    @property
    def metrics_file(self) -> Path:
        return Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
