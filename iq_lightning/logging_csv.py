"""metrics.csv that survives a restart: Lightning's CSV writer deletes an existing file when it
starts, which would drop every completed epoch's metrics when a run resumes."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Keep the file and its columns; new rows are appended (and the header widened if needed).
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that appends to the run's metrics.csv, flushing every step so an interrupted
    run keeps what it logged."""

    def __init__(self, save_dir: str, name: str = "metrics"):
        super().__init__(save_dir=save_dir, name=name, version="", flush_logs_every_n_steps=1)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
