"""Models by hub id or local folder: what every model key of a config accepts.

A value names a local folder (it exists on disk) or a Hugging Face Hub model ``ORG/NAME``, optionally
pinned as ``ORG/NAME@revision`` (a branch, tag or commit; the main model also takes the ``revision`` key).
Hub models load through the libraries' own ``from_pretrained`` / ``hf_hub_download``, so the Hugging Face
cache, ``HF_HOME``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` work exactly as with transformers and diffusers.

:func:`resolve_model` runs before anything heavy loads: it fetches the model's small marker file
(``config.json`` for transformers, ``model_index.json`` for a diffusers pipeline, ...), from the cache
when offline. So a typo, a private repo, an id missing from the cache under ``HF_HUB_OFFLINE=1``, or a
folder that is not a model stops the run in a second with the config key, the value and the fix named,
instead of a traceback from deep inside a library. Its weights files on disk are checked from their headers
and sizes (:func:`weights_problem`): a truncated download or a Git LFS pointer is named with the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mmpref.errors import ConfigError, ModelFileError

TRANSFORMERS = ("config.json",)
DIFFUSERS_PIPELINE = ("model_index.json",)
ANY_MODEL = ("model_index.json", "config.json")  # `model` before the modality is known
SENTENCE_TRANSFORMERS = ("modules.json", "config.json")
OPEN_CLIP = ("open_clip_config.json",)
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")  # open_clip's own order  # fmt: skip
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model key: a local ``folder``, or a hub ``name`` at ``revision`` (snapshot ``commit``)."""

    key: str
    name: str  # the folder path or the hub id, as from_pretrained takes it
    revision: str | None
    folder: Path | None  # None for a hub model
    commit: str | None  # the hub snapshot's commit hash
    marker: str  # which marker file was found: says what kind of model it is

    @property
    def is_hub(self) -> bool:
        return self.folder is None

    @property
    def kwargs(self) -> dict:
        """Extra ``from_pretrained`` arguments: the revision of a hub model."""
        return {"revision": self.revision} if self.is_hub and self.revision else {}

    def identity(self) -> str:
        """What the weights are, for cache keys: a folder's file names, sizes and mtimes; a hub commit."""
        if self.is_hub:
            return f"{self.name}@{self.commit}"
        return folder_fingerprint(self.folder)

    def file(self, filename: str) -> Path | None:
        """The model's file ``filename`` (``subfolder/name`` allowed) on disk, or None when it has none."""
        if not self.is_hub:
            path = self.folder / filename
            return path if path.is_file() else None
        return _hub_file(self, filename)


def folder_fingerprint(*paths: Path | str | None) -> str:
    """Cheap identity of local folders or files, for every cache key: names, sizes and mtimes of their files
    (retraining in place changes it). Missing paths and None count as nothing."""
    h = hashlib.sha256()
    for path in paths:
        if path is None or not Path(path).exists():
            continue
        path = Path(path)
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{path.name}/{f.relative_to(path) if f != path else ''}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file's bytes (hex): the content key of data and image caches.

    Read a MiB at a time once, then remembered (:func:`hash_memo_dir`) by the file's resolved path, size,
    modification and change times: an unchanged 300 GB dataset is not read again on the next run, while any
    write to the file (which moves its mtime and ctime) makes it hashed afresh.
    """
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
    memo = hash_memo_dir() / hashlib.sha256(stamp.encode()).hexdigest()[:40]
    try:
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    from mmpref.files import atomic_write_text  # here: importing mmpref.hub stays free of torch

    try:  # a read-only cache folder only costs the re-read next time
        atomic_write_text(memo, digest)
    except OSError:
        pass
    return digest


def hash_memo_dir() -> Path:
    """Where :func:`file_sha256` remembers hashes: ``$MMPREF_CACHE/file-sha256`` (default
    ``~/.cache/mmpref``), one tiny file per (path, size, times) stamp."""
    root = os.environ.get("MMPREF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmpref"
    return Path(root) / "file-sha256"


def split_revision(value: str) -> tuple[str, str | None]:
    """``"ORG/NAME@rev"`` -> ``("ORG/NAME", "rev")``; a value without ``@`` has no revision."""
    name, sep, revision = value.partition("@")
    return (name, revision or None) if sep and not Path(value).exists() else (value, None)


def resolve_model(
    key: str, value: str, *, revision: str | None = None, markers: tuple[str, ...] = TRANSFORMERS,
    what: str = "a transformers model",
) -> ModelSource:  # fmt: skip
    """Check that ``value`` (the config key ``key``) is a usable model, before anything loads.

    A local folder must hold one of ``markers``; a hub id must exist (in the cache when offline) and hold
    one. Raises :class:`ConfigError` naming the key, the value and the fix.
    """
    if not value:
        raise ConfigError(f"{key}: required ({what}: a hub id such as ORG/NAME, or a local folder)")
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{key}: {value} is a file; expected {what} (a model folder or a hub id)")
        found = next((m for m in markers if (path / m).is_file()), None)
        if found is None:
            raise ConfigError(
                f"{key}: {value} is a folder but not {what} (it has no {' or '.join(markers)}); "
                "point it at the folder save_pretrained wrote, or at a hub id"
            )
        source = ModelSource(key, str(path), None, path, None, found)
        check_weight_files(source)
        return source
    name, pinned = split_revision(value)
    if value.startswith((".", "/", "~")) or os.sep in value.replace("/", "") or not HUB_ID.fullmatch(name):
        raise ConfigError(f"{key}: no such folder {value} (and it is not a hub id of the form ORG/NAME)")
    source = ModelSource(key, name, pinned or revision, None, None, "")
    for marker in markers:
        path = _hub_file(source, marker)
        if path is not None:
            commit = path.parts[path.parts.index("snapshots") + 1] if "snapshots" in path.parts else None
            found = ModelSource(key, name, source.revision, None, commit, marker)
            check_weight_files(found, path.parent)  # the files already in the cache (the marker sits at its root)
            return found
    raise ConfigError(f"{key}: the hub repository {name} is not {what} (it has no {' or '.join(markers)})")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weights_problem(path: Path) -> str | None:
    """Why the weights file ``path`` cannot load, from its header and size alone (no weights read): not a file,
    a Git LFS pointer in place of the weights, a safetensors file cut short or with a broken header, a torch zip
    archive without its end; None when nothing is wrong as far as that can tell."""
    from mmpref.files import path_problem

    problem = path_problem(path)
    if problem:
        return problem
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if head.startswith(b"version https://git-lfs"):
            return f"{path} is a Git LFS pointer, not the weights (the download or clone did not fetch them)"
        if path.suffix == ".safetensors":
            n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
            if n < 0 or n > size - 8:
                return f"{path} is truncated or not a safetensors file ({size} bytes)"
            f.seek(8)
            try:
                header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError):
                return f"{path} has a damaged safetensors header"
            if 8 + n + end != size:
                return f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}"
        elif head.startswith(b"PK") and not zipfile.is_zipfile(path):  # torch's zip format, cut short
            return f"{path} is truncated (a torch archive without its end, {size} bytes)"
    return None


def check_weight_files(source: ModelSource, root: Path | None = None) -> None:
    """Every weights file the model ``source`` has on disk (a local folder, or the files of a hub snapshot in the
    cache so far; ``root``: that snapshot's folder when the caller has it) checked by :func:`weights_problem`; the
    first bad one raises :class:`ModelFileError` naming the key, the file and how to get a good copy."""
    root = root or (source.folder if source.folder is not None else _snapshot_root(source))
    if root is None:
        return
    for path in sorted(root.rglob("*")):
        if path.suffix in WEIGHT_SUFFIXES and (problem := weights_problem(path)):
            fix = (f"delete it and download again (huggingface-cli download {source.name} --force-download)"
                   if source.is_hub else "replace it with a complete copy (save_pretrained or download again)")  # fmt: skip
            raise ModelFileError(f"{source.key}: {problem}; {fix}")


def _snapshot_root(source: ModelSource) -> Path | None:
    """The cached snapshot folder of a hub model (its marker file's folder), or None when not cached."""
    marker = _hub_file(source, source.marker) if source.marker else None
    return marker.parent if marker is not None else None


@contextmanager
def weights_named_on_failure(source: ModelSource | None) -> Iterator[None]:
    """Around a ``from_pretrained``: when loading fails and a weights file of ``source`` is damaged, the error
    is a :class:`ModelFileError` naming it (not the library's deserialisation traceback)."""
    try:
        yield
    except Exception as exc:
        if source is not None:
            try:
                check_weight_files(source)
            except ModelFileError as named:
                raise named from exc
        raise


def _hub_file(source: ModelSource, filename: str) -> Path | None:
    """``hf_hub_download`` of one file (from the cache when offline); None when the repo has no such file."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    key, name, rev = source.key, source.name, source.revision
    try:
        return Path(hf_hub_download(name, filename, revision=rev))
    except GatedRepoError as exc:
        raise ConfigError(f"{key}: {name} is gated: accept its terms on the hub, then log in "
                          "(`hf auth login` or HF_TOKEN)") from exc  # fmt: skip
    except RepositoryNotFoundError as exc:
        raise ConfigError(f"{key}: no model {name} on the hub (a typo, or a private repository: log in with "
                          "`hf auth login` or set HF_TOKEN); a local folder works too") from exc  # fmt: skip
    except RevisionNotFoundError as exc:
        raise ConfigError(f"{key}: {name} has no revision {rev!r} (a branch, tag or commit)") from exc
    except LocalEntryNotFoundError as exc:
        if _cached_elsewhere(source, filename):
            return None  # the snapshot is cached, only without this optional file
        where = f"{name}@{rev}" if rev else name
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(
                f"{key}: {where} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                f"HF_HUB_OFFLINE=1 forbids downloading it; download it once (`hf download {name}`) or unset "
                "HF_HUB_OFFLINE, or give a local folder"
            ) from exc
        raise ConfigError(f"{key}: cannot reach the hub to fetch {where} and it is not cached ({exc}); "
                          "check the network, or give a local folder") from exc  # fmt: skip
    except EntryNotFoundError:  # the repository (online) has no such file
        return None
    except HFValidationError as exc:
        raise ConfigError(f"{key}: {name!r} is not a valid hub id ({exc})") from exc


def _cached_elsewhere(source: ModelSource, filename: str) -> bool:
    """Whether the cache holds this revision's snapshot at all (then a missing file is just absent)."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{source.name.replace('/', '--')}"
    ref = repo / "refs" / (source.revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else source.revision
    return bool(commit) and (repo / "snapshots" / commit).is_dir()


def open_clip_name(key: str, value: str) -> str:
    """An open_clip model name for ``value``: ``local-dir:`` folders and architecture names pass through;
    a hub id (``ORG/NAME[@rev]``, or open_clip's ``hf-hub:ORG/NAME``) becomes ``local-dir:`` of its cached
    snapshot once its config and weights are fetched, so the revision pin and the checks above apply."""
    if value.startswith("local-dir:") or Path(value).is_dir():
        folder = value.removeprefix("local-dir:")
        resolve_model(key, folder, markers=OPEN_CLIP, what="an open_clip model folder")
        return f"local-dir:{folder}"
    bare = value.removeprefix("hf-hub:")
    if "/" not in bare:
        return value  # an open_clip architecture name, with its weights given separately
    source = resolve_model(key, bare, markers=OPEN_CLIP, what="an open_clip model")
    weights = next((p for w in OPEN_CLIP_WEIGHTS if (p := _hub_file(source, w)) is not None), None)
    if weights is None:
        raise ConfigError(f"{key}: {source.name} has none of the weights files {', '.join(OPEN_CLIP_WEIGHTS)}")
    return f"local-dir:{weights.parent}"


def load_open_clip(model: str, weights: str | None = None, device=None, key: str = "rpo.clip_model"):
    """``(model, preprocess, tokenizer)`` of an open_clip model, in eval mode with its validation transform:
    the one place open_clip weights are loaded (RPO embeddings, the style metric, the CLIP scorer).

    ``model`` is a hub id (``ORG/NAME[@rev]`` or ``hf-hub:ORG/NAME``, e.g. ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``),
    a ``local-dir:`` folder (open_clip's layout, as :func:`mmpref.tiny_models.make_tiny_clip` writes), a plain
    folder path (read the same way), or an open_clip architecture name with ``weights``: a local
    checkpoint file or one of open_clip's pretrained tags (fetched by open_clip from the hub, or its cache).
    ``key`` names the config key in messages.
    """
    import open_clip

    name, pretrained = open_clip_name(key, model), None
    if not name.startswith("local-dir:"):
        if not weights:
            raise ConfigError(f"{key.replace('model', 'weights')}: the open_clip architecture {model!r} needs "
                              "weights: a checkpoint file or an open_clip pretrained tag; or give a hub id")  # fmt: skip
        pretrained = str(weights)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device or "cpu")
    except RuntimeError as exc:  # open_clip's word for an unknown name, tag or an uncached download
        raise ConfigError(f"{key}: open_clip cannot load {model!r} with weights {weights!r} ({exc})") from exc
    return clip.eval(), preprocess, open_clip.get_tokenizer(name)
