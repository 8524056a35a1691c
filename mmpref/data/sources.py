"""Opening data sources: hub ids, local files, folders, globs, saved datasets, rows in memory, streams
(docs/design.md §10, §11).

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
CLIP embeddings, latents) go to :attr:`RowSource.cache_dir`: the same ``.mmpref_cache`` folder for local
files, ``<datasets cache>/mmpref`` for hub and in-memory data. Files as other tools write them (a UTF-8
byte-order mark, CRLF line ends, in CSV cells too) read as the same data as clean files. A JSON file that does not load is
scanned line by line, only then, so the message names the line (1-based, as editors number them).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.dataset

from mmpref.data.errors import DataError
from mmpref.data.splits import ROWS_PER_BATCH
from mmpref.data.text_checks import lone_surrogate_problem
from mmpref.hub import HUB_ID, file_sha256, folder_fingerprint, split_revision

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
# What datasets' builders raise for files they cannot parse (it wraps the parser's error in the first)
READ_ERRORS = (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError, UnicodeError)
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
    if isinstance(source, RowSource):  # opened already (the run's plan opens each source once)
        return source
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
            if (problem := lone_surrogate_problem(value)) is not None:
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

