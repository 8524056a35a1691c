"""One run per ``output_dir``: an advisory lock, ``output_dir/.mmpref.lock``, that the run holds from right after
its plan (before it writes anything there) to its end.

The lock is the operating system's (``fcntl.flock`` on the file, held open for the run's life), so it dies with
the process: a run killed with ``kill -9`` leaves no lock behind, only the file. The file also holds its
holder's details (JSON: process id, host name, start time, command), so a second run into the folder can name
the run it would collide with; a file whose lock nobody holds is a dead holder's and is taken over with a
warning naming it. A clean end removes the file.

Under several processes (``accelerate launch``) the lock is the main process's: it alone takes it, and the
others learn from it whether the run may go on. Locks are per host unless the filesystem shares them
(docs/reliability.md, *One run per output_dir*).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: runs go unlocked
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".mmpref.lock"


class OutputDirInUse(RuntimeError):
    """Another ``mmpref train`` holds the lock of this ``output_dir``; the message names it."""


def describe(holder: dict | None) -> str:
    """``pid 1234 on host h, started 2026-12-05 07:40:01`` from a lock file's details."""
    if not holder:
        return "details not written yet"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"


class RunLock:
    """The lock of ``folder`` (module docstring): :meth:`acquire` it, :meth:`release` it at the end."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`OutputDirInUse` naming the live holder; a dead holder's file is
        taken over with a warning. Where the filesystem keeps no locks, warn and go on unlocked."""
        if fcntl is None:
            logger.warning(f"output_dir: {self.folder} is not locked (no fcntl here): nothing stops a second run "
                           "into it")  # fmt: skip
            return self
        for _ in range(100):  # the holder may remove the file between our open and our lock: then once more
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise OutputDirInUse(
                    f"output_dir: {self.folder} is in use by another mmpref train ({describe(holder)}); wait for "
                    "it, or choose another output_dir"
                ) from None
            except OSError as exc:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
                os.close(fd)
                logger.warning(f"output_dir: {self.folder} cannot be locked ({exc.strerror or exc}): nothing stops "
                               "a second run into it")  # fmt: skip
                return self
            if _same_file(fd, self.path):
                break
            os.close(fd)  # we locked a file its holder had just removed
        else:
            raise OutputDirInUse(f"output_dir: {self.folder}: its lock file {self.path} keeps changing")
        self._take_over(_read(fd))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": shlex.join(sys.argv)}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _take_over(self, previous: dict | None) -> None:
        """Warn about the dead holder whose file this was (the lock was free, so its process is gone)."""
        if not previous:
            return
        if previous.get("host") not in (None, socket.gethostname()):
            logger.warning(f"output_dir: {self.folder} was locked by {describe(previous)}, another machine, and the "
                           "lock is free: that run has ended, or this filesystem does not share locks between "
                           "machines (then stop one of the two runs); taking it over")  # fmt: skip
        else:
            logger.warning(f"output_dir: {self.folder} was locked by {describe(previous)}, which is gone (killed?); "
                           "taking it over")  # fmt: skip

    def release(self) -> None:
        """Remove the file while still holding the lock, then let go of it."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def _read(fd: int) -> dict | None:
    """The details in a lock file, or None (empty, half-written or not JSON)."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextmanager
def lock_output_dir(folder: Path, accelerator):
    """Hold ``folder``'s lock for the ``with`` block: the main process takes it; under several processes the
    others are told whether it did, and every process raises :class:`OutputDirInUse` when it did not."""
    lock, problem = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(folder).acquire()
        except (OutputDirInUse, OSError) as exc:
            problem = str(exc) if isinstance(exc, OutputDirInUse) else f"output_dir: cannot lock {folder} ({exc})"
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise OutputDirInUse(problem)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
