"""A Hugging Face hub cache laid out on disk exactly as ``huggingface_hub`` writes it, to test hub ids offline.

``<cache>/<models|datasets>--ORG--NAME/`` holds ``blobs/<sha256 of the file>``, ``snapshots/<commit>/<path>``
(relative symlinks into ``blobs``) and ``refs/<revision>`` (the commit hash as text).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_hub_repo(cache: Path, repo_id: str, folder: Path, *, repo_type: str = "model",
                   revision: str = "main") -> str:  # fmt: skip
    """Put every file under ``folder`` into the cache as ``repo_id`` at ``revision``; returns the commit."""
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    commit = hashlib.sha1(repo_id.encode() + b"".join(p.read_bytes() for p in files)).hexdigest()
    for path in files:
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


def use_hub_cache(monkeypatch, home: Path) -> Path:
    """Point this process's Hugging Face libraries at ``home`` (``HF_HOME``), offline; returns the hub cache.

    The libraries read these paths when imported, so their module constants are patched too.
    """
    import huggingface_hub.constants as hub_constants

    cache = Path(home) / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache
