"""A per-row tensor cache filled as training reads (VAE latents, text-encoder outputs, CLIP embeddings).

A cache is a folder of *chunks*, each a safetensors file of the rows one process encoded::

    chunk-<time>-<writer>.safetensors   tensors "row" (n,), "stamp" (n,) and one (n, ...) tensor per name
    extra.safetensors                   tensors not per row (e.g. the empty caption's embedding)

``row`` is the row's number in its source and the cache's key within the folder (the folder's name holds
everything else: the data's identity, the encoders, the transform). ``stamp`` says which version of the
row's image files was encoded (0 for images stored in the rows): an entry whose stamp no longer matches is
a miss, so an edited image is encoded again.

Rows are encoded the first time a batch asks for them (:meth:`RowCache.fetch`), held in memory until
:attr:`flush_rows` have gathered or :meth:`flush` is called (the loop calls it before every checkpoint, so a
resumed run reads exactly what the interrupted one computed), then written as one chunk: to a temporary name
first and renamed into place, so a reader never sees a half-written chunk and a kill leaves nothing a later
run trusts. Writers never share a file (each process names its chunks with a random writer id), so several
processes fill one cache without locks; a process looks for the chunks of the others when it misses a row. Floating-point tensors are stored as float16 (half the disk and page cache) and
every caller reads the stored values, so a row gives the same numbers whether it was just encoded or read
back in a later epoch. Chunks are memory-mapped (``safetensors.safe_open``) and at most
:data:`MAX_OPEN` stay open, so the cache may exceed RAM and a million rows do not exhaust file handles.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from mmpref.files import atomic_save

EXTRA = "extra.safetensors"
MAX_OPEN = 32  # chunk files held open at once (least recently used closed first)
SCAN_INTERVAL = 1.0  # seconds between looks for other processes' chunks (a miss meanwhile is encoded here)


def _stored(t: Tensor) -> Tensor:
    t = t.detach().cpu()
    return t.to(torch.float16) if t.is_floating_point() else t


class RowCache:
    """Rows ``0 .. num_rows - 1`` of one source, each a dict of tensors (module docstring).

    ``flush_rows``: encoded rows kept in memory before they are written as one chunk.
    """

    def __init__(self, folder: str | Path, num_rows: int, *, flush_rows: int = 256):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.num_rows, self.flush_rows = num_rows, flush_rows
        # where each row is: chunk number (-1: not cached), position in it, stamp; 16 bytes a row
        self._chunk = np.full(num_rows, -1, dtype=np.int32)
        self._pos = np.zeros(num_rows, dtype=np.int32)
        self._stamp = np.zeros(num_rows, dtype=np.int64)
        self._files: list[Path] = []
        self._known: set[str] = set()
        self._handles: OrderedDict[int, object] = OrderedDict()
        self._pending: dict[int, tuple[int, dict[str, Tensor]]] = {}  # row -> (stamp, tensors), not yet written
        self._writer = uuid.uuid4().hex[:12]
        self.extra: dict[str, Tensor] = {}
        self._scanned = 0.0
        self._scan()

    # -- what is cached --------------------------------------------------------------------------
    def _scan(self) -> None:
        """Index the chunks not seen yet (in the order they were written: a later entry of a row wins).
        A listing of the folder: on a miss, at most once per :data:`SCAN_INTERVAL` (a row missed meanwhile is
        encoded here: every process encodes a row to the same values, so that costs time, never exactness)."""
        self._scanned = time.monotonic()
        new = sorted(p for p in os.listdir(self.folder) if p.startswith("chunk-") and p not in self._known)
        for name in new:
            path = self.folder / name
            try:
                with safe_open(path, framework="pt") as f:
                    rows, stamps = f.get_tensor("row").numpy(), f.get_tensor("stamp").numpy()
            except Exception:  # not ours, or damaged: never trusted
                continue
            k = len(self._files)
            self._files.append(path)
            self._known.add(name)
            inside = (rows >= 0) & (rows < self.num_rows)
            self._chunk[rows[inside]] = k
            self._pos[rows[inside]] = np.arange(len(rows), dtype=np.int32)[inside]
            self._stamp[rows[inside]] = stamps[inside]
        if not self.extra and (self.folder / EXTRA).is_file():
            with safe_open(self.folder / EXTRA, framework="pt") as f:
                self.extra = {k: f.get_tensor(k) for k in f.keys()}

    def has(self, row: int, stamp: int = 0) -> bool:
        if row in self._pending:
            return self._pending[row][0] == stamp
        return bool(self._chunk[row] >= 0 and self._stamp[row] == stamp)

    def missing(self, rows: Sequence[int], stamps: Sequence[int] | None = None) -> list[int]:
        """The positions in ``rows`` not cached (with these stamps), after looking for other processes' chunks."""
        stamps = stamps or [0] * len(rows)
        out = [k for k, (r, s) in enumerate(zip(rows, stamps)) if not self.has(r, s)]
        if out and time.monotonic() - self._scanned > SCAN_INTERVAL:
            self._scan()
            out = [k for k in out if not self.has(rows[k], stamps[k])]
        return out

    def cached_rows(self) -> int:
        """How many rows are cached (written or pending)."""
        self._scan()
        return int((self._chunk >= 0).sum()) + sum(1 for r in self._pending if self._chunk[r] < 0)

    # -- reading and writing ------------------------------------------------------------------------
    def put(self, rows: Sequence[int], values: dict[str, Tensor], stamps: Sequence[int] | None = None) -> None:
        """Add encoded rows (``values``: tensors with ``len(rows)`` rows each), written at the next flush."""
        stamps = stamps or [0] * len(rows)
        stored = {n: _stored(v) for n, v in values.items()}
        for k, (row, stamp) in enumerate(zip(rows, stamps)):
            self._pending[int(row)] = (int(stamp), {n: v[k] for n, v in stored.items()})
        if len(self._pending) >= self.flush_rows:
            self.flush()

    def get(self, rows: Sequence[int], names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The cached tensors of ``rows`` (each must be cached), stacked: (len(rows), ...) per name."""
        parts: dict[str, list[Tensor]] = {}
        for row in rows:
            if row in self._pending:
                values = self._pending[row][1]
                chosen = names or sorted(values)
                got = {n: values[n][None] for n in chosen}
            else:
                handle = self._handle(int(self._chunk[row]))
                j = int(self._pos[row])
                chosen = names or sorted(k for k in handle.keys() if k not in ("row", "stamp"))
                got = {n: handle.get_slice(n)[j : j + 1] for n in chosen}
            for n, v in got.items():
                parts.setdefault(n, []).append(v)
        return {n: torch.cat(v) for n, v in parts.items()}

    def fetch(self, rows: Sequence[int], encode: Callable[[list[int]], dict[str, Tensor]],
              stamps: Sequence[int] | None = None) -> dict[str, Tensor]:  # fmt: skip
        """``get(rows)``, encoding first the rows that are not cached: ``encode(positions)`` gets positions
        into ``rows`` and returns tensors for them."""
        todo = self.missing(rows, stamps)
        if todo:
            self.put([rows[k] for k in todo], encode(todo), [stamps[k] for k in todo] if stamps else None)
        return self.get(rows)

    def set_extra(self, make: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        """The non-row tensors, computed by ``make()`` and written once (every writer writes the same)."""
        self._scan()
        if not self.extra:
            self.extra = {k: _stored(v) for k, v in make().items()}
            atomic_save(self.extra, self.folder / EXTRA, what="cache file")
        return self.extra

    def flush(self) -> None:
        """Write the encoded rows held in memory as one chunk (nothing when there are none)."""
        if not self._pending:
            return
        rows = sorted(self._pending)
        names = sorted(self._pending[rows[0]][1])
        tensors = {n: torch.stack([self._pending[r][1][n] for r in rows]) for n in names}
        tensors["row"] = torch.tensor(rows, dtype=torch.int64)
        tensors["stamp"] = torch.tensor([self._pending[r][0] for r in rows], dtype=torch.int64)
        path = self.folder / f"chunk-{time.time_ns():020d}-{self._writer}.safetensors"
        atomic_save(tensors, path, what="cache chunk")
        self._pending.clear()
        self._scan()

    def _handle(self, k: int):
        if k in self._handles:
            self._handles.move_to_end(k)
            return self._handles[k]
        handle = safe_open(self._files[k], framework="pt")
        self._handles[k] = handle
        if len(self._handles) > MAX_OPEN:
            self._handles.popitem(last=False)  # dropped handles close their file
        return handle

    def close(self) -> None:
        self.flush()
        self._handles.clear()
