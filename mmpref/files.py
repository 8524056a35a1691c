"""Writing files so that a reader never sees half of one, and the one content-keyed cache of computed tensors.

Every writer in mmpref goes through these: a file (or folder) is written under a temporary name in its own
folder and renamed into place, so after a crash or a kill it is complete or absent, and two processes writing
the same name leave one whole copy. A full disk while writing (:func:`is_disk_full`) is raised as one
:class:`~mmpref.errors.DiskFullError` naming the path, with the temporary file or folder removed.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

from mmpref.errors import DiskFullError

logger = logging.getLogger(__name__)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# what open(path, "w") and mkdir would give: mkstemp / mkdtemp make 0o600 / 0o700, private to the owner
_UMASK = _umask()
FILE_MODE, FOLDER_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def path_problem(path: Path | str, want: str = "file") -> str | None:
    """Why ``path`` cannot be read as a regular file, naming what it is instead (a folder, a FIFO, a socket or
    device, an unreadable file, nothing); None when it can. ``want`` names what was expected, for the message."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"no such {want} {path}"
    except OSError as exc:
        return f"{path} is not usable ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return f"{path} is a folder, not a {want}"
    if stat.S_ISFIFO(mode):
        return f"{path} is a named pipe (FIFO), not a {want}"
    if not stat.S_ISREG(mode):
        return f"{path} is a socket or device, not a {want}"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable (permission denied)"
    return None


# how each writer reports a full disk: errno (open, write, rename), safetensors' Rust I/O error text, and
# torch's zip writer, which checks its position after a short write instead of passing the errno on
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "(os error 28)", "(os error 122)",
                   "PytorchStreamWriter failed writing file")  # fmt: skip


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from or while handling) says the disk or a quota is full."""
    for _ in range(8):  # the chain of causes, not a cycle
        if exc is None:
            return False
        if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS):
            return True
        text = str(exc)
        if any(t in text for t in DISK_FULL_TEXTS) or ("inline_container" in text and "unexpected pos" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def raise_if_disk_full(exc: BaseException, path: Path | str, what: str, needed: int | None = None) -> None:
    """In an ``except`` block: raise a :class:`DiskFullError` writing ``path`` from ``exc`` when ``exc`` says the
    disk is full (and is not one already); otherwise return, for the caller's bare ``raise``."""
    if is_disk_full(exc) and not isinstance(exc, DiskFullError):
        raise DiskFullError(path, what, needed) from exc


def atomic_write(path: Path | str, write: Callable[[Path], object], *, what: str = "file",
                 needed: int | None = None) -> None:  # fmt: skip
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    On any failure the temporary file is removed and the exception propagates (a full disk as a
    :class:`DiskFullError` naming ``path``, ``what`` it is and the bytes it ``needed``); ``path`` keeps what it held.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    except OSError as exc:
        raise_if_disk_full(exc, path, what, needed)
        raise
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        raise_if_disk_full(exc, path, what, needed)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """``path.write_text(text)`` (UTF-8), complete or not at all."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save(tensors: dict[str, Tensor], path: Path | str, metadata: dict[str, str] | None = None, *,
                what: str = "file") -> None:  # fmt: skip
    """A safetensors file of ``tensors``, complete or not at all."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata),
                 what=what, needed=sum(v.numel() * v.element_size() for v in tensors.values()))  # fmt: skip


@contextmanager
def atomic_folder(path: Path | str, *, what: str = "folder", needed: int | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``path``; when the block ends without an exception the staging
    folder replaces ``path`` (an older ``path`` is removed first), otherwise it is removed (a full disk raised
    as a :class:`DiskFullError` naming ``path``, as :func:`atomic_write`).

    Between removing the old folder and the rename a reader finds no ``path``, never a half-written one."""
    path = Path(path)
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
        yield staging
        os.chmod(staging, FOLDER_MODE)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException as exc:
        raise_if_disk_full(exc, path, what, needed)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


class KeyedCache:
    """Computed tensors in ``folder``, one safetensors file per content key: ``get(key, compute)`` reads the
    file of ``key`` or computes, stores and returns it.

    The key names what the value was computed from (a hash of the inputs and settings), so a stale entry is
    never read: other inputs make another key. Files are written atomically, so a killed run leaves only whole
    entries and a rerun computes only the missing ones; an unreadable entry is computed again. ``folder=None``
    caches nothing.
    """

    def __init__(self, folder: Path | str | None):
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        path = self.path(key)
        return path is not None and path.is_file()

    def read(self, key: str) -> dict[str, Tensor] | None:
        """The entry of ``key``, or None when it is absent or unreadable."""
        from safetensors.torch import load_file

        if not self.has(key):
            return None
        try:
            return load_file(self.path(key))
        except Exception as exc:  # a foreign or damaged file: computed again rather than failing the run
            logger.warning("ignoring unreadable cache entry %s (%s); computing it again", self.path(key), exc)
            return None

    def write(self, key: str, tensors: dict[str, Tensor]) -> None:
        if self.folder is not None:
            atomic_save({k: v.detach().cpu() for k, v in tensors.items()}, self.path(key), what="cache entry")

    def get(self, key: str, compute: Callable[..., dict[str, Tensor]], *args: object) -> dict[str, Tensor]:
        """The entry of ``key``, read back, or ``compute(*args)`` stored under ``key`` and returned."""
        found = self.read(key)
        if found is not None:
            return found
        tensors = compute(*args)
        self.write(key, tensors)
        return tensors
