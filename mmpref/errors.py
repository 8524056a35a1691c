"""The errors a user fixes without a code change: a config to edit or a file to replace (exit 2), space to
free (exit 74)."""

from __future__ import annotations

import errno
from pathlib import Path


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class ModelFileError(ValueError):
    """A model's file that cannot load (truncated, corrupt, not a weights file); the message names the file
    and how to get a good copy."""


class LowDiskSpaceError(Exception):
    """``fail_on_low_disk: true`` and the run's checkpoints and ``final/`` would not fit (exit 2, before step 1)."""


def human_bytes(n: float) -> str:
    """``1.2 GiB``, ``310.0 MiB``, ``512 B``: sizes as messages give them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class DiskFullError(OSError):
    """The disk (or a quota) filled up while mmpref wrote ``path``; nothing half-written is left under its name.

    ``what`` says what was being written, ``needed`` its size in bytes when known. A training run adds ``free``
    (bytes free on that disk now) and ``checkpoint`` (the newest complete checkpoint, or None) before the message
    reaches the user (``resumable``), so the message says what to resume from.
    """

    def __init__(self, path: Path | str, what: str = "file", needed: int | None = None):
        super().__init__(errno.ENOSPC, "No space left on device", str(path))
        self.path, self.what, self.needed = Path(path), what, needed
        self.free: int | None = None
        self.checkpoint: Path | None = None
        self.resumable = False  # a training run filled in `checkpoint`

    def __str__(self) -> str:
        sizes = []
        if self.needed is not None:
            sizes.append(f"it needs about {human_bytes(self.needed)}")
        if self.free is not None:
            sizes.append(f"{human_bytes(self.free)} free there now")
        text = f"disk full while writing {self.what} {self.path}" + (f" ({', '.join(sizes)})" if sizes else "")
        if not self.resumable:
            return f"{text}; free space and run it again"
        if self.checkpoint is None:
            return f"{text}; no checkpoint is complete yet: free space and start the run again"
        return (f"{text}; the newest complete checkpoint is {self.checkpoint}: free space (or lower keep_checkpoints "
                "or raise save_every) and continue with --resume")  # fmt: skip
