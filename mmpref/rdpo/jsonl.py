"""Resumable JSON Lines output: one row per line, each flushed and fsynced as it is written.

An interruption can only cut the line being written; :func:`read_done` drops such a partial
last line (truncating the file back to its last complete line) so a restart appends cleanly,
and returns the rows already there so the caller skips their ids.
"""

from __future__ import annotations

import json
import logging
import os
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
