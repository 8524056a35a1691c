"""A write-once, memory-mapped cache of per-row tensors (VAE latents, text-encoder outputs).

Layout of one cache folder::

    index.json                 written last: its presence means the cache is complete
    shard-00000.safetensors    rows [0, shard_size), one tensor per name, first dim = rows
    shard-00001.safetensors    ...
    extra.safetensors          tensors not per row (e.g. the empty caption's embedding)

Floating-point tensors are stored as float16 (half the disk and page cache; the loss sees float32 again),
integer tensors as they are. Every file goes to a temporary name first and is renamed into place, so a
crash never leaves a file that a later run trusts; a half-built cache is resumed shard by shard.
Shards are read with ``safetensors.safe_open`` (memory-mapped), so the cache may exceed RAM.
Under several processes each builds every P-th shard and the main process writes the index.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mmpref.progress import progress

INDEX = "index.json"
EXTRA = "extra.safetensors"


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stored(t: Tensor) -> Tensor:
    t = t.detach().cpu()
    return t.to(torch.float16) if t.is_floating_point() else t


class LatentCache:
    """Read side: ``cache.rows(indices)`` gives a dict of (len(indices), ...) tensors."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / INDEX).read_text())
        self.num_rows: int = index["rows"]
        self.shard_size: int = index["shard_size"]
        self.names: list[str] = index["names"]
        self._shards = [self.folder / s for s in index["shards"]]
        self._handles: dict[int, object] = {}
        extra = self.folder / EXTRA
        self.extra: dict[str, Tensor] = {}
        if extra.is_file():
            with safe_open(extra, framework="pt") as f:
                self.extra = {k: f.get_tensor(k) for k in f.keys()}

    def __len__(self) -> int:
        return self.num_rows

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(self._shards[shard], framework="pt")
        return self._handles[shard]

    def rows(self, indices: Sequence[int], names: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = self.names if names is None else names
        parts: dict[str, list[Tensor]] = {n: [] for n in names}
        for i in indices:
            if not 0 <= i < self.num_rows:
                raise IndexError(f"row {i} outside the cache's {self.num_rows} rows")
            shard, j = divmod(int(i), self.shard_size)
            handle = self._handle(shard)
            for n in names:
                parts[n].append(handle.get_slice(n)[j : j + 1])
        return {n: torch.cat(v) for n, v in parts.items()}

    @classmethod
    def build(
        cls,
        folder: str | Path,
        num_rows: int,
        encode: Callable[[list[int]], dict[str, Tensor]],
        *,
        extra: Callable[[], dict[str, Tensor]] | None = None,
        shard_size: int = 1024,
        batch_size: int = 16,
        accelerator=None,
        desc: str = "latent cache",
    ) -> LatentCache:
        """Open the cache in ``folder``, building what is missing with ``encode(row_indices)``.

        ``encode`` returns a dict of tensors with ``len(row_indices)`` rows each (the same names every
        call); ``extra()`` the non-row tensors. Neither is called when the cache is complete.
        ``desc`` names the progress bar of the rows still to encode.
        """
        folder = Path(folder)
        if (folder / INDEX).is_file():
            return cls(folder)
        rank, world = (
            (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
        )
        folder.mkdir(parents=True, exist_ok=True)
        n_shards = max(1, -(-num_rows // shard_size))
        names: list[str] | None = None

        def shard_path(s: int) -> Path:
            return folder / f"shard-{s:05d}.safetensors"

        todo = [s for s in range(rank, n_shards, world) if not shard_path(s).is_file()]
        total = sum(min(num_rows, (s + 1) * shard_size) - s * shard_size for s in todo)
        with progress(total=total, desc=desc, unit="row", accelerator=accelerator) as bar:
            for s in todo:
                rows = list(range(s * shard_size, min(num_rows, (s + 1) * shard_size)))
                chunks: dict[str, list[Tensor]] = {}
                for k in range(0, len(rows), batch_size):
                    out = encode(rows[k : k + batch_size])
                    for name, value in out.items():
                        chunks.setdefault(name, []).append(_stored(value))
                    bar.update(len(rows[k : k + batch_size]))
                _atomic_save({n: torch.cat(v) for n, v in chunks.items()}, shard_path(s))
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if rank == 0:
            if extra is not None:
                _atomic_save({k: _stored(v) for k, v in extra().items()}, folder / EXTRA)
            with safe_open(folder / "shard-00000.safetensors", framework="pt") as f:
                names = sorted(f.keys())
            index = {"rows": num_rows, "shard_size": shard_size, "names": names,
                     "shards": [f"shard-{s:05d}.safetensors" for s in range(n_shards)]}  # fmt: skip
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(index, f)
            os.replace(tmp, folder / INDEX)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return cls(folder)
