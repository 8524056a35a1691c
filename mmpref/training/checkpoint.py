"""Crash-safe checkpoints on top of Accelerate's ``save_state`` / ``load_state``.

A checkpoint ``output_dir/checkpoints/step-N`` is Accelerate's folder (model safetensors, optimizer,
registered scheduler, RNG states, GradScaler with fp16) plus ``trainer_state.json`` (step, data
position, counters) and ``manifest.json`` (size and sha256 of every other file). It is written to a
hidden ``.tmp-step-N`` folder, the manifest last, flushed to disk and renamed into place, so a process
killed at any moment leaves either the complete new checkpoint or none. The manifest is checked on
resume: ``--resume latest`` skips a newest checkpoint that fails it, with a warning, for the one before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from accelerate import Accelerator

from mmpref.files import atomic_write_text

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"
# Accelerate loads these with weights_only=False (custom objects) or swallows their load errors (RNG):
# they are first loaded here with weights_only=True, so a tampered pickle fails before anything runs.
PICKLES_TO_CHECK = ("custom_checkpoint_*.pkl", "random_states_*.pkl")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or holds pickled objects beyond plain tensors and containers."""


def _sha256(path: Path, sync: bool = False) -> str:
    """sha256 of a file; with ``sync`` also flushed to disk, so it survives a power cut once renamed."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
        if sync:
            os.fsync(f.fileno())
    return sha.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> dict:
    """Record size and sha256 of every file in ``folder``; written last, so its presence means complete."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        files[path.relative_to(folder).as_posix()] = {
            "bytes": path.stat().st_size,
            "sha256": _sha256(path, sync=True),
        }
    manifest = {"files": files}
    with open(folder / MANIFEST_FILE, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def verify_checkpoint(folder: Path) -> list[str]:
    """What is wrong with the checkpoint in ``folder``: missing manifest, missing, resized or altered files."""
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST_FILE} (an incomplete or pre-manifest checkpoint)"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST_FILE} unreadable ({e})"]
    problems = []
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"{name} differs from its sha256 in the manifest")
    if not (folder / STATE_FILE).is_file() or STATE_FILE not in files:
        problems.append(f"no {STATE_FILE}")
    return problems


def check_weights_only(folder: Path) -> None:
    """Load every pickle Accelerate would load unsafely (or silently) with ``weights_only=True`` first."""
    from accelerate.utils.other import load  # Accelerate's torch.load, with its numpy RNG allow-list

    for pattern in PICKLES_TO_CHECK:
        for path in sorted(folder.glob(pattern)):
            try:
                load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(
                    f"{path}: refusing to load, not loadable with weights_only=True ({e})"
                ) from e


def find_checkpoint(output_dir: Path, resume: str, main_process: bool = True) -> Path:
    """The checkpoint to resume from: ``resume`` itself, or with ``latest`` the newest that verifies."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume: {path} is not a checkpoint (no {STATE_FILE})")
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(f"--resume: checkpoint {path} is corrupt: {'; '.join(problems)}")
        return path
    root = output_dir / "checkpoints"
    for path in sorted(root.glob("step-*"), reverse=True):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        if main_process:
            logger.warning(f"skipping checkpoint {path}: {'; '.join(problems)}")
    raise FileNotFoundError(f"--resume latest: no complete checkpoint under {root}")


def rewind_metrics(metrics_file: Path, step: int) -> None:
    """Drop what a resumed run will log again: lines after ``step`` and a line cut short by a kill."""
    if not metrics_file.exists():
        return
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_text(metrics_file, "".join(kept))


class Checkpointer:
    """Atomic checkpoints: written to a hidden folder, manifest last, renamed into place when complete."""

    def __init__(self, accelerator: Accelerator, root: Path, keep: int):
        self.accelerator, self.root, self.keep = accelerator, root, keep
        if accelerator.is_main_process and root.is_dir():
            for leftover in root.glob(f"{TMP_PREFIX}*"):  # from a save that a kill interrupted
                logger.warning(f"removing {leftover}, left by an interrupted checkpoint save")
                shutil.rmtree(leftover, ignore_errors=True)

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def save(self, state: dict) -> Path:
        acc = self.accelerator
        final = self.path(state["step"])
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        acc.wait_for_everyone()  # every process has written its RNG state
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            write_manifest(tmp)
            if final.exists():  # moved aside first: a kill between the renames leaves the older ones
                stale = self.root / f"{TMP_PREFIX}old-{final.name}"
                os.replace(final, stale)
                shutil.rmtree(stale)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in sorted(self.root.glob("step-*"))[: -self.keep]:
                # renamed first, so a kill mid-delete leaves no half-deleted step-* folder
                doomed = self.root / f"{TMP_PREFIX}old-{old.name}"
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def discard(self, step: int) -> None:
        """Remove what a failed save of ``step`` left in its hidden folder (a full disk): the complete ones stay."""
        if self.accelerator.is_main_process:
            shutil.rmtree(self.root / f"{TMP_PREFIX}{self.path(step).name}", ignore_errors=True)
