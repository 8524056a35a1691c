"""Resumable JSON Lines output: one row per line, each flushed and fsynced as it is written.

An interruption can only cut the line being written; :func:`read_done` drops such a partial
last line (truncating the file back to its last complete line) so a restart appends cleanly,
and returns the rows already there so the caller skips their ids.

Outputs are never half-written under their final name: :class:`PartialAppender` appends to
``<name>.partial`` (a copy of the finished file, if there is one, plus the new rows) and renames
it to ``<name>`` only when the run completes. A file named ``<name>`` is therefore always the
output of a finished run; an interrupted run leaves ``<name>.partial``, which the next run resumes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import IO, Any

from mmpref.data import DataError

logger = logging.getLogger(__name__)


def read_done(path: str | Path) -> list[dict[str, Any]]:
    """Complete rows of an existing output file (none if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):  # an interrupted write: keep only the complete lines
        logger.warning(
            "%s: dropping an incomplete last line (%d bytes) from an interrupted run", path, len(raw) - end
        )
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    rows = []
    for lineno, line in enumerate(raw[:end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg}); fix or remove it") from exc
        if not isinstance(row, dict) or "id" not in row:
            raise DataError(f"{path}: line {lineno} is not an object with an 'id'; fix or remove it")
        rows.append(row)
    return rows


def done_ids(*paths: str | Path) -> set[str]:
    """Ids already written to any of ``paths``."""
    return {str(row["id"]) for p in paths for row in read_done(p)}


class Appender:
    """Append rows to a JSON Lines file, opened on the first write (no empty files)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file: IO[str] | None = None
        self.count = 0

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def partial_path(path: str | Path) -> Path:
    """Where an unfinished run of ``path`` keeps its rows."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def resume_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows done so far: those of an unfinished ``<path>.partial`` (it starts as a copy of ``path``),
    else those of the finished ``path``."""
    partial = partial_path(path)
    return read_done(partial if partial.is_file() else path)


class PartialAppender(Appender):
    """An :class:`Appender` on ``<path>.partial``; :meth:`commit` renames it to ``path`` once complete."""

    def __init__(self, path: str | Path):
        self.final = Path(path)
        super().__init__(partial_path(path))

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None and not self.path.exists() and self.final.is_file():
            shutil.copyfile(self.final, self.path)  # new rows extend the finished output
        super().write(row)

    def commit(self) -> None:
        """Close and move the rows into place (a no-op when nothing was written)."""
        self.close()
        if self.path.is_file():
            os.replace(self.path, self.final)
