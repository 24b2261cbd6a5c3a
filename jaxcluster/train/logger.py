"""Per-step records of a run: CSV files, TensorBoard scalars and the progress bar."""

from __future__ import annotations

import csv
import logging
import os
import pathlib
from typing import Mapping

import tqdm

log = logging.getLogger(__name__)

TRAIN_CSV = "train_log.csv"
EVAL_CSV = "eval_log.csv"
TENSORBOARD_DIR = "tensorboard"


class CsvLog:
    """Append rows to a CSV file whose columns are fixed by the first row written.

    A resumed run appends to the existing file and keeps its header. Rows of steps after
    ``keep_through_step`` (steps that ran after the checkpoint the run resumes from) are
    removed first, so every step appears once. Keys missing from a row are left empty and
    keys unknown to the header raise, so a column never shifts.
    """

    def __init__(self, path: str | os.PathLike, keep_through_step: int | None = None):
        self.path = pathlib.Path(path)
        self._columns: list[str] | None = None
        if self.path.is_file() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as handle:
                rows = list(csv.reader(handle))
            self._columns = rows[0]
            if keep_through_step is not None and "step" in self._columns:
                self._drop_rows_after(rows, keep_through_step)

    def _drop_rows_after(self, rows: list[list[str]], last_step: int) -> None:
        column = self._columns.index("step")
        kept = [row for row in rows[1:] if row and int(row[column]) <= last_step]
        dropped = len(rows) - 1 - len(kept)
        if dropped:
            log.info("%s: removed %d rows of steps after %d, which the resumed run repeats",
                     self.path, dropped, last_step)
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerows([self._columns] + kept)

    def write(self, row: Mapping[str, object]) -> None:
        if self._columns is None:
            self._columns = list(row)
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(self._columns)
        unknown = [key for key in row if key not in self._columns]
        if unknown:
            raise KeyError(f"{self.path}: columns {unknown} are not in the header "
                           f"{self._columns}; start a new --workdir when the loss terms change")
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow(["" if row.get(key) is None else row[key]
                                         for key in self._columns])


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


class RunLogger:
    """Write train and eval records of process 0; other processes write nothing."""

    def __init__(self, workdir: str | os.PathLike, *, is_primary: bool, initial_step: int,
                 total_steps: int, log_every_steps: int):
        self.is_primary = is_primary
        self.log_every_steps = log_every_steps
        workdir = pathlib.Path(workdir)
        self._train_csv = CsvLog(workdir / TRAIN_CSV, initial_step) if is_primary else None
        self._eval_csv = CsvLog(workdir / EVAL_CSV, initial_step) if is_primary else None
        self._tensorboard = None
        if is_primary:
            # Imported here because tensorboardX pulls in protobuf, which tests of the
            # other parts of the loop do not need.
            import tensorboardX
            self._tensorboard = tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR))
        self._progress = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step",
                                   disable=not is_primary, dynamic_ncols=True)

    def train_step(self, step: int, row: Mapping[str, object]) -> None:
        """Record one training step; ``row`` contains the CSV columns besides ``step``."""
        self._progress.update(1)
        if not self.is_primary:
            return
        self._train_csv.write({"step": step, **row})
        if "loss" in row:
            self._progress.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
        if step % self.log_every_steps == 0:
            self._scalars("train", step, row)

    def evaluation(self, step: int, metrics: Mapping[str, float]) -> None:
        log.info("evaluation at step %d: %s", step,
                 ", ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items())))
        if not self.is_primary:
            return
        self._eval_csv.write({"step": step, **metrics})
        self._scalars("eval", step, metrics)

    def _scalars(self, prefix: str, step: int, values: Mapping[str, object]) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        self._progress.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class _DropLibraryInfo(logging.Filter):
    """Drop INFO and DEBUG records emitted from the named libraries' source files."""

    def __init__(self, libraries: tuple[str, ...]):
        super().__init__()
        self.libraries = libraries

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(f"/{name}/" in record.pathname for name in self.libraries)


def quiet_library_logs(libraries: tuple[str, ...] = ("orbax",)) -> None:
    """Keep warnings but drop the per-save INFO lines of checkpointing libraries.

    orbax logs a dozen INFO lines per checkpoint through absl; the run logs its own one
    line per save instead.
    """
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
            handler.addFilter(_DropLibraryInfo(libraries))
