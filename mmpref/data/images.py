"""Image preference data (Pick-a-Pic format): rows opened, checked and read as pairs (docs/design.md §10).

Rows come from any source :func:`mmpref.data.sources.open_rows` reads (a hub id such as
``yuvalkirstain/pickapic_v2``, a local file, folder, glob or ``save_to_disk`` folder, or rows in memory) and
hold ``caption``, ``jpg_0``, ``jpg_1`` and ``label_0``:

* images are raw bytes (Pick-a-Pic's binary columns), ``datasets.Image`` features (read undecoded, as
  ``{"bytes": ..., "path": ...}``), or file paths: absolute, or relative to ``image_root`` when given, else to
  the dataset file's folder (the folder itself for a folder source, the cached snapshot for a hub dataset
  read offline, the working directory for rows in memory). ``confine_image_paths`` is for data you do not
  trust: every path must then stay inside that folder once resolved (``..`` and symbolic links followed),
  so a dataset cannot make mmpref read ``/etc/passwd``;
* an image may have at most :data:`MAX_IMAGE_PIXELS` pixels, checked from its header before decoding,
  so a tiny file that claims a huge size (a decompression bomb) is a bad row, not an exhausted memory;
* ``label_0`` is 1 (``jpg_0`` preferred), 0 (``jpg_1`` preferred) or 0.5 (a tie: dropped and counted,
  not an error, as in Diffusion-DPO).

Bad rows (missing columns or values, empty caption, an image that is missing or does not decode, two
identical images, ``label_0`` outside {0, 0.5, 1}) are reported with their 0-based row number, and stop the
run or are skipped with a logged count (``on_bad_rows``), exactly like text data (:mod:`mmpref.data.validation`).

A streamed split is read by :class:`mmpref.data.image_stream.ImageStream`; a decoded pair becomes model inputs
(the training transform, CLIP embeddings) in :mod:`mmpref.data.image_inputs`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import warnings
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from mmpref.data.errors import BadRow, DataError
from mmpref.data.sources import open_rows
from mmpref.data.splits import ROWS_PER_BATCH
from mmpref.data.text_checks import text_problem
from mmpref.data.validation import bad_rows_error, score_problem
from mmpref.files import atomic_write, path_problem

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
IMAGE_SCORE_COLUMNS = ("score_0", "score_1")
LABELS = (0, 0.5, 1)
MAX_IMAGE_PIXELS = 64 * 2**20  # 8192 x 8192: far above any training resolution, ~200 MB decoded as RGB
ImageRef = bytes | Path | Image.Image  # a decoded image once a row has been read and checked


@dataclass(frozen=True)
class ImagePair:
    """One pair as a batch reads it: ``row`` is its 0-based number in the source; images are bytes or file
    paths (:meth:`ImageRows.pair`), or decoded RGB images once checked (:meth:`ImageRows.load`)."""

    row: int
    caption: str
    chosen: ImageRef
    rejected: ImageRef
    scores: tuple[float, float] | None = None  # (chosen, rejected) from score_0 / score_1, for odpo / rdpo


class BadImageRow(DataError):
    """A row whose image turned out bad when it was first read (during training or ``validate-data``)."""

    def __init__(self, source: Path | str, row: int, reason: str):
        self.row, self.reason = row, reason
        super().__init__(
            f"{source}: row {row} (0-based): {reason}. Fix the row, or set `on_bad_rows: skip` to train "
            "without it (`mmpref validate-data CONFIG` lists every bad row before a run)"
        )


class ImageRows:
    """The usable pairs of a source as an index into its memory-mapped Arrow rows.

    Per pair the process holds 8 bytes (its source row number); captions, labels, scores and images are read
    from the Arrow table when a batch asks for them. Cheap checks (columns, captions, labels, scores, null
    images) ran when the rows were opened (:func:`prepare_image_dataset`); images are checked when first read
    (:meth:`load`), and a bad one raises :class:`BadImageRow`.

    ``identity`` says what the rows are (:func:`mmpref.data.sources.rows_identity`): with a row number it keys
    every cache derived from a row. ``bad`` / ``skipped`` / ``ties``: rows dropped by the cheap checks
    (``on_bad_rows: skip``; the list and its length) and tied rows (``label_0`` = 0.5), dropped by design.
    """

    def __init__(self, ds: datasets.Dataset, rows: np.ndarray, *, source: Path | str, cache_dir: Path, identity: str,
                 base: Path, confine_to: Path | None, has_scores: bool, bad: Sequence[BadRow] = (), ties: int = 0):  # fmt: skip
        self.dataset, self.rows = ds, rows
        self.source, self.cache_dir, self.identity = source, cache_dir, identity
        self.base, self.confine_to, self.has_scores = base, confine_to, has_scores
        self.bad, self.skipped, self.ties = list(bad), len(bad), ties
        meta = ["caption", "label_0", *(IMAGE_SCORE_COLUMNS if has_scores else ())]
        self._meta = ds.select_columns(meta)  # reads of these never touch the image bytes
        self._images = ds.select_columns(["jpg_0", "jpg_1", "label_0"])

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, positions: Sequence[int]) -> ImageRows:
        """These positions only (a held-out split); the same source, identity and caches."""
        out = copy.copy(self)
        out.rows = self.rows[np.asarray(positions, dtype=np.int64)]
        return out

    @property
    def pairs(self) -> Sequence[ImagePair]:
        """``pairs[i]`` is :meth:`pair` ``(i)``: a view, nothing is read until indexed."""
        return _PairView(self)

    def row(self, i: int) -> int:
        """The source row number of position ``i``."""
        return int(self.rows[i])

    def meta(self, positions: Sequence[int]) -> tuple[list[int], list[str], list[tuple[float, float]] | None]:
        """(source rows, captions, (chosen, rejected) scores or None) of these positions, without image bytes."""
        rows = [int(self.rows[i]) for i in positions]
        got = self._meta[rows]
        scores = None
        if self.has_scores:
            scores = [(a, b) if label == 1 else (b, a)
                      for a, b, label in zip(got["score_0"], got["score_1"], got["label_0"])]  # fmt: skip
        return rows, got["caption"], scores

    def image_stamps(self, positions: Sequence[int]) -> list[int]:
        """Per position, a number that changes when an image file the row names changes (size or mtime): 0 for
        images stored in the rows themselves (the rows' identity covers those), -1 for a file that is gone."""
        rows = [int(self.rows[i]) for i in positions]
        table = self._images.with_format("arrow")[rows]
        stamps = []
        for k in range(len(rows)):
            parts = [_file_stamp(table.column(c)[k], self.base) for c in ("jpg_0", "jpg_1")]
            if all(p == "" for p in parts):
                stamps.append(0)
            elif any(p is None for p in parts):
                stamps.append(-1)
            else:
                digest = hashlib.sha256("\0".join(parts).encode()).digest()
                stamps.append(int.from_bytes(digest[:8], "little") >> 1 or 1)
        return stamps

    def pair(self, i: int) -> ImagePair:
        """Position ``i`` as image references (bytes or resolved paths), ordered (chosen, rejected)."""
        row = int(self.rows[i])
        rec = {**self._images[row], "caption": self._meta[row]["caption"]}
        refs = [_resolve(rec[c], self.base, self.confine_to)[0] for c in ("jpg_0", "jpg_1")]
        order = (0, 1) if rec["label_0"] == 1 else (1, 0)
        _, _, scores = self.meta([i])
        return ImagePair(row, rec["caption"], refs[order[0]], refs[order[1]], scores[0] if scores else None)

    def load(self, i: int) -> ImagePair:
        """Position ``i`` read and checked: its images decoded to RGB, ordered (chosen, rejected).

        A missing, unreadable, undecodable, oversized or identical image raises :class:`BadImageRow` naming
        the row and the column.
        """
        row = int(self.rows[i])
        rec = self._images[row]
        problems: list[str] = []
        _, _, images = read_pair_images(rec["jpg_0"], rec["jpg_1"], self.base, self.confine_to, problems)
        if problems:
            raise BadImageRow(self.source, row, "; ".join(problems))
        order = (0, 1) if rec["label_0"] == 1 else (1, 0)
        _, captions, scores = self.meta([i])
        return ImagePair(row, captions[0], images[order[0]], images[order[1]], scores[0] if scores else None)

    def find_bad(self, *, desc: str = "check images") -> list[BadRow]:
        """Every row whose images are bad, read in order with a progress bar (memory stays flat)."""
        from mmpref.progress import progress

        bad = []
        for i in progress(range(len(self)), desc=desc, unit="pair"):
            try:
                self.load(i)
            except BadImageRow as exc:
                bad.append(BadRow(exc.row, exc.reason))
        return bad


class _PairView(Sequence):
    def __init__(self, rows: ImageRows):
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self._rows.pair(k) for k in range(len(self))[i]]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._rows.pair(i % len(self))


def _file_stamp(cell: Any, base: Path) -> str | None:
    """``""`` for an image stored as bytes, else ``"path:size:mtime"`` of its file (None: not a file).
    ``cell`` is an Arrow scalar: the stored bytes are looked at, never copied out."""
    import pyarrow as pa

    if pa.types.is_binary(cell.type) or pa.types.is_large_binary(cell.type):
        return ""
    if pa.types.is_struct(cell.type):  # datasets.Image: {"bytes", "path"}
        if cell["bytes"].is_valid and len(cell["bytes"].as_buffer() or b""):
            return ""
        cell = cell["path"]
    value = cell.as_py()
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        return None
    try:
        path = base / Path(value).expanduser()
        st = path.stat()
    except (OSError, ValueError):
        return None
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


# ------------------------------------------------------------------------------------------ images


def read_image_bytes(ref: bytes | Path) -> bytes:
    return ref if isinstance(ref, bytes) else Path(ref).read_bytes()


def load_image(ref: ImageRef) -> Image.Image:
    """Decode an image reference to RGB (a decoded image is converted, not decoded again)."""
    if isinstance(ref, Image.Image):
        return ref if ref.mode == "RGB" else ref.convert("RGB")
    with Image.open(io.BytesIO(read_image_bytes(ref))) as img:
        return img.convert("RGB")


def _resolve(value: Any, base: Path, confine_to: Path | None = None) -> tuple[ImageRef | None, str | None]:
    """(reference, problem) of one image cell; relative paths start at ``base``, and with ``confine_to``
    every path must resolve to a file inside that folder."""
    if value is None:
        return None, "missing"
    if isinstance(value, dict):  # datasets' Image feature
        if value.get("bytes"):
            return _resolve(value["bytes"], base, confine_to)
        value = value.get("path")
        if not value:
            return None, "missing"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (bytes(value), None) if len(value) else (None, "empty bytes")
    if isinstance(value, str):
        if not value.strip():
            return None, "missing"
        if "\x00" in value:
            return None, "path holds a NUL character"
        try:
            # an absolute value replaces base; symlinks are followed
            path = (base.resolve() / Path(value).expanduser()).resolve()
            root = None if confine_to is None else confine_to.resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, an unencodable name
            return None, f"path {value!r} does not resolve ({exc})"
        if root is not None and not path.is_relative_to(root):
            return None, (
                f"path {value!r} points outside the dataset folder {root}; with confine_image_paths, image "
                "paths must stay inside it (copy the images there, or store them as bytes)"
            )
        problem = path_problem(path)  # a folder, a FIFO, unreadable, missing: named as such
        return (None, problem) if problem else (path, None)
    return None, f"must be bytes or a file path, got {type(value).__name__}"


def _decode(data: bytes) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None) or (None, problem): the size is checked from the header before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                if img.width < 1 or img.height < 1:
                    return None, "has no pixels"
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    return None, (
                        f"is {img.width}x{img.height} pixels, more than the {MAX_IMAGE_PIXELS} allowed "
                        "(a decompression bomb, or an image to downscale before training)"
                    )
                return img.convert("RGB"), None
    except Exception as exc:  # PIL raises many types for corrupt data
        return None, f"does not decode as an image ({type(exc).__name__}: {exc})"


def caption_label_problems(caption: Any, label: Any) -> list[str]:
    """What is wrong with a row's caption and label (the checks that read no image)."""
    reasons = []
    if isinstance(caption, str) or caption is None:
        if problem := text_problem("caption", caption):
            reasons.append(problem)
    else:
        reasons.append(f"'caption' must be a string, got {type(caption).__name__}")
    if problem := _label_problem(label):
        reasons.append(problem)
    return reasons


def _label_problem(label: Any) -> str | None:
    if label is None:
        return "missing 'label_0'"
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label not in LABELS:
        return f"'label_0' must be 1, 0 or 0.5, got {label!r}"
    return None


def image_row_problems(
    caption: Any, jpg_0: Any, jpg_1: Any, label: Any, base: Path, *, confine_to: Path | None = None
) -> tuple[list[str], list[ImageRef | None], list[bytes | None]]:
    """(problems, image references, image bytes) of one row; no problems means a usable row.

    Relative image paths start at ``base``; ``confine_to`` keeps every path inside that folder.
    Total over any input: whatever the values, it returns reasons and never raises. Every image is
    decoded here, so a corrupt file is a bad row before training, not a crash at step N.
    """
    reasons = caption_label_problems(caption, label)
    refs, blobs, _ = read_pair_images(jpg_0, jpg_1, base, confine_to, reasons)
    return reasons, refs, blobs


def read_pair_images(jpg_0: Any, jpg_1: Any, base: Path, confine_to: Path | None,
                 reasons: list[str]) -> tuple[list[ImageRef | None], list[bytes | None], list[Image.Image | None]]:  # fmt: skip
    """(references, bytes, decoded RGB images) of one row's two image cells, each read and decoded once; their
    problems are appended to ``reasons``, and two identical images are one more when ``reasons`` has none."""
    refs, blobs, images = [], [], []
    for name, value in (("jpg_0", jpg_0), ("jpg_1", jpg_1)):
        ref, problem = _resolve(value, base, confine_to)
        data = image = None
        if problem is None:
            try:
                data = read_image_bytes(ref)
            except OSError as exc:
                problem = f"unreadable ({exc})"
        if problem is None:
            image, problem = _decode(data) if data else (None, "is an empty file")
        if problem:
            reasons.append(f"{name!r} {problem}")
        refs.append(ref)
        blobs.append(data if problem is None else None)
        images.append(image)
    if not reasons and blobs[0] == blobs[1]:
        reasons.append("'jpg_0' and 'jpg_1' are the same image")
    return refs, blobs, images


def prepare_image_dataset(
    source: Any,
    *,
    on_bad_rows: str = "error",
    config_name: str | None = None,
    split: str = "train",
    revision: str | None = None,
    image_root: str | Path | None = None,
    confine_image_paths: bool = False,
    needs_scores: bool = False,
    chosen_scores_higher: bool = False,
) -> ImageRows:
    """Open Pick-a-Pic-style rows as an index (:class:`ImageRows`) after the checks that read no image bytes.

    Columns, captions, labels, scores and null image cells are checked here, a batch of Arrow rows at a time;
    images are checked when first read (by a batch, the cache fill, or ``mmpref validate-data``), so opening a
    dataset of a million pairs takes seconds and holds 8 bytes per pair.

    Optional ``score_0`` / ``score_1`` columns (a reward model's score of ``jpg_0`` / ``jpg_1``) feed odpo and
    rdpo: ``needs_scores`` requires them, ``chosen_scores_higher`` also the preferred image's score above the
    other's (ODPO's log(s_w − s_l)).

    ``source``, ``config_name``, ``split``, ``revision``: as :func:`mmpref.data.sources.open_rows` takes them
    (an in-memory ``datasets.Dataset`` or list of dicts too). ``image_root`` and ``confine_image_paths``:
    where relative image paths start and whether paths must stay there (module docstring).
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    src = open_rows(source, config_name=config_name, split=split, revision=revision)
    ds, name = src.dataset, src.name
    missing = [c for c in IMAGE_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{name}: missing columns {', '.join(missing)} (found: {', '.join(ds.column_names) or 'none'}); "
            "image preference data needs caption, jpg_0, jpg_1 (bytes or file paths) and label_0 (1, 0 or 0.5)"
        )
    if ds.num_rows == 0:
        raise DataError(f"{name}: no rows")
    if image_root is not None:
        base = Path(image_root).expanduser()
        if not base.is_dir():
            raise DataError(f"image_root: no such folder {image_root}")
    else:
        base = src.folder or Path.cwd()
    confine_to = base if confine_image_paths else None
    if confine_to is not None and image_root is None and base.parent.name == "snapshots":
        confine_to = base.parent.parent  # a hub snapshot's files link into its repo's blobs/ folder
    has_scores = all(c in ds.column_names for c in IMAGE_SCORE_COLUMNS)
    if (needs_scores or chosen_scores_higher) and not has_scores:
        raise DataError(f"{name}: the loss needs the columns score_0 and score_1 (a score of jpg_0 and of jpg_1) "
                        f"in every row (found: {', '.join(ds.column_names)})")  # fmt: skip
    ds = ds.select_columns(list(IMAGE_COLUMNS) + (list(IMAGE_SCORE_COLUMNS) if has_scores else []))
    for column in ("jpg_0", "jpg_1"):  # datasets.Image: the stored bytes / path, not a decoded PIL image
        if isinstance(ds.features[column], datasets.Image) and ds.features[column].decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))
    rows, bad, ties = _remembered_checks(ds, src, has_scores, chosen_scores_higher)
    if bad and on_bad_rows == "error":
        raise bad_rows_error(name, bad, ds.num_rows)
    if bad:
        logger.warning("%s: skipped %d of %d bad rows (on_bad_rows=skip); first: %s", name, len(bad),
                       ds.num_rows, "; ".join(str(b) for b in bad[:3]))  # fmt: skip
    if ties:
        logger.info("%s: dropped %d tied rows (label_0 = 0.5)", name, ties)
    if not len(rows):
        raise DataError(f"{name}: no usable pairs ({len(bad)} bad rows, {ties} ties)")
    return ImageRows(ds, rows, source=name, cache_dir=src.cache_dir, identity=src.identity, base=base,
                     confine_to=confine_to, has_scores=has_scores, bad=bad, ties=ties)  # fmt: skip


CHECKS_VERSION = "mmpref-image-checks-2"  # in the key of remembered checks: a change to them makes new entries


def _remembered_checks(ds: datasets.Dataset, src, has_scores: bool, chosen_scores_higher: bool) -> tuple[np.ndarray, list[BadRow], int]:
    """:func:`_cheap_checks`, remembered in the data's cache folder under the rows' identity, so a rerun on
    the same data opens it in constant time (reading 8 bytes a pair) instead of checking every caption again."""
    key = json.dumps([CHECKS_VERSION, src.identity, has_scores, chosen_scores_higher, ds.num_rows])
    path = src.cache_dir / f"image-rows-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    try:
        with np.load(path) as saved:
            bad = [BadRow(int(r), str(why)) for r, why in zip(saved["bad_rows"], saved["bad_reasons"])]
            return saved["rows"].copy(), bad, int(saved["ties"])
    except (OSError, KeyError, ValueError):  # not there yet, or unreadable: check again
        pass
    rows, bad, ties = _cheap_checks(ds, has_scores, chosen_scores_higher)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
            np.savez(f, rows=rows, ties=np.int64(ties), bad_rows=np.array([b.row for b in bad], dtype=np.int64),
                     bad_reasons=np.array([b.reason for b in bad], dtype=str))  # fmt: skip

    try:
        atomic_write(path, save)
    except OSError:  # a read-only cache folder only costs the checks next time
        pass
    return rows, bad, ties


def _cheap_checks(ds: datasets.Dataset, has_scores: bool, chosen_scores_higher: bool) -> tuple[np.ndarray, list[BadRow], int]:
    """(usable source rows, bad rows, ties) from every column but the image bytes: the images' null cells
    come from Arrow's validity bitmaps, so no image is read. Arrow's compute functions accept the rows that
    are plainly fine (:func:`_plainly_fine`), a whole batch at a time; only the others are looked at one by
    one in Python, for their exact reasons."""
    columns = ["caption", "label_0", "jpg_0", "jpg_1", *(IMAGE_SCORE_COLUMNS if has_scores else ())]
    usable, bad, ties, start = array("q"), [], 0, 0
    for batch in ds.select_columns(columns).with_format("arrow").iter(batch_size=ROWS_PER_BATCH * 10):
        fine = _plainly_fine(batch, has_scores, chosen_scores_higher)
        labels = batch.column("label_0").to_numpy(zero_copy_only=False)
        for k in np.flatnonzero(fine):
            if labels[k] == 0.5:
                ties += 1
            else:
                usable.append(start + int(k))
        for k in np.flatnonzero(~fine):
            row = {c: batch.column(c)[int(k)].as_py() for c in columns if c not in ("jpg_0", "jpg_1")}
            reasons = _row_problems(row, [batch.column(c)[int(k)].is_valid for c in ("jpg_0", "jpg_1")],
                                    has_scores, chosen_scores_higher)  # fmt: skip
            if reasons:
                bad.append(BadRow(start + int(k), "; ".join(reasons)))
            elif row["label_0"] == 0.5:
                ties += 1
            else:
                usable.append(start + int(k))
        start += batch.num_rows
    return np.sort(np.frombuffer(usable, dtype=np.int64)), bad, ties


# INVISIBLE of mmpref.data.text_checks in RE2's syntax, for Arrow's regular expressions
INVISIBLE_RE2 = ("[\\x{00}-\\x{08}\\x{0b}\\x{0c}\\x{0e}-\\x{1f}\\x{7f}-\\x{9f}\\x{ad}\\x{180e}\\x{200b}-\\x{200f}"
                 "\\x{202a}-\\x{202e}\\x{2060}-\\x{2064}\\x{2066}-\\x{206f}\\x{feff}]")


def _plainly_fine(batch, has_scores: bool, chosen_scores_higher: bool) -> np.ndarray:
    """Per row of an Arrow batch: a caption with something visible, ``label_0`` in {0, 0.5, 1}, both images
    present, finite scores (the preferred one higher, for ODPO). False means "look closer", not "bad"."""
    import pyarrow as pa
    import pyarrow.compute as pc

    caption, label = batch.column("caption"), batch.column("label_0")
    if not (pa.types.is_string(caption.type) or pa.types.is_large_string(caption.type)):
        return np.zeros(batch.num_rows, dtype=bool)
    if not (pa.types.is_floating(label.type) or pa.types.is_integer(label.type)):
        return np.zeros(batch.num_rows, dtype=bool)
    visible = pc.utf8_length(pc.utf8_trim_whitespace(pc.replace_substring_regex(caption, INVISIBLE_RE2, "")))
    fine = pc.and_(pc.greater(visible, 0), pc.is_in(pc.cast(label, pa.float64()), value_set=pa.array([0.0, 0.5, 1.0])))
    for column in ("jpg_0", "jpg_1"):
        fine = pc.and_(fine, pc.is_valid(batch.column(column)))
    if has_scores:
        s0, s1 = (pc.cast(batch.column(c), pa.float64()) for c in IMAGE_SCORE_COLUMNS)
        fine = pc.and_(fine, pc.and_(pc.is_finite(s0), pc.is_finite(s1)))
        if chosen_scores_higher:
            one = pc.equal(pc.cast(label, pa.float64()), 1.0)
            higher = pc.if_else(one, pc.greater(s0, s1), pc.greater(s1, s0))
            fine = pc.and_(fine, pc.or_(higher, pc.equal(pc.cast(label, pa.float64()), 0.5)))
    return pc.fill_null(fine, False).to_numpy(zero_copy_only=False).astype(bool)


def _row_problems(row: dict, images_present: list[bool], has_scores: bool, chosen_scores_higher: bool) -> list[str]:
    """Every problem of one row that reading no image can find (a row :func:`_plainly_fine` did not accept)."""
    label = row["label_0"]
    reasons = caption_label_problems(row["caption"], label)
    reasons += [f"{c!r} missing" for c, present in zip(("jpg_0", "jpg_1"), images_present) if not present]
    if has_scores:
        raw = [row[c] for c in IMAGE_SCORE_COLUMNS]
        found = [r for c, v in zip(IMAGE_SCORE_COLUMNS, raw) if (r := score_problem(c, v))]
        reasons += found
        if not found and chosen_scores_higher and label in (0, 1):
            w, l = (raw[0], raw[1]) if label == 1 else (raw[1], raw[0])
            if not w > l:
                reasons.append(f"the preferred image's score ({float(w)}) must exceed the other's "
                               f"({float(l)}): ODPO's offset log(s_w − s_l) is undefined otherwise")  # fmt: skip
    return reasons


def validate_image_data(rows: ImageRows) -> list[BadRow]:
    """Every bad row of an opened dataset: those the cheap checks dropped are already counted in
    ``rows.skipped``; this reads and decodes every image (``mmpref validate-data``)."""
    return rows.find_bad(desc=f"check images of {rows.source}")
