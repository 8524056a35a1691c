"""Image preference data (Pick-a-Pic format), the training transform and CLIP embeddings (docs/design.md §7, §10).

Rows come from any source :func:`mmpref.data.text.open_rows` reads (a hub id such as
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
run or are skipped with a logged count (``on_bad_rows``), exactly like text data (:mod:`mmpref.data.text`).

Transform (diffusers' Diffusion-DPO scripts): the rejected image is first resized to the chosen image's
size, then both are resized together so the shorter side is ``resolution`` (bilinear), cropped to a square
(center crop, or one random crop shared by the pair), and scaled to [-1, 1]. SDXL's micro-conditioning
takes the chosen image's original (h, w) and the crop's top-left corner.

Random flips: the pair is flipped together. With cached latents both orientations are encoded once
(twice the cache, no VAE call during training) and a flip picks the mirrored latents; a random crop is
drawn once per row when the cache is built (seeded), so with caching it is fixed per row.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from mmpref.data.text import (
    BadRow,
    DataError,
    _text_problem,
    bad_rows_error,
    iter_rows,
    open_rows,
    score_problem,
)
from mmpref.hub import folder_fingerprint, load_open_clip, open_clip_name

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
IMAGE_SCORE_COLUMNS = ("score_0", "score_1")
LABELS = (0, 0.5, 1)
MAX_IMAGE_PIXELS = 64 * 2**20  # 8192 x 8192: far above any training resolution, ~200 MB decoded as RGB
ImageRef = bytes | Path


@dataclass(frozen=True)
class ImagePair:
    """One usable row: ``row`` is its 0-based number in the source, images are bytes or file paths."""

    row: int
    caption: str
    chosen: ImageRef
    rejected: ImageRef
    digest: str  # sha256 of caption and both images' bytes, in chosen/rejected order
    scores: tuple[float, float] | None = None  # (chosen, rejected) from score_0 / score_1, for odpo / rdpo


@dataclass
class ImageDataset:
    """The usable pairs of a source and what was dropped; ``cache_dir``: where caches derived from them go
    (latents, CLIP embeddings), as :class:`mmpref.data.text.TextDataset`'s."""

    pairs: list[ImagePair]
    skipped: int  # bad rows dropped with on_bad_rows=skip
    ties: int  # label_0 == 0.5 rows, dropped by design
    source: Path | str
    cache_dir: Path

    def __len__(self) -> int:
        return len(self.pairs)


# ------------------------------------------------------------------------------------------ images


def read_image_bytes(ref: ImageRef) -> bytes:
    return ref if isinstance(ref, bytes) else Path(ref).read_bytes()


def load_image(ref: ImageRef) -> Image.Image:
    """Decode an image reference to RGB."""
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
        try:
            return (path, None) if path.is_file() else (None, f"no such file {path}")
        except OSError as exc:  # e.g. a name too long for the file system
            return None, f"path {value!r} is not usable ({exc.strerror or exc})"
    return None, f"must be bytes or a file path, got {type(value).__name__}"


def _decode_problem(data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                if img.width < 1 or img.height < 1:
                    return "has no pixels"
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    return (
                        f"is {img.width}x{img.height} pixels, more than the {MAX_IMAGE_PIXELS} allowed "
                        "(a decompression bomb, or an image to downscale before training)"
                    )
                img.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        return f"does not decode as an image ({type(exc).__name__}: {exc})"
    return None


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
    reasons = []
    if isinstance(caption, str) or caption is None:
        if problem := _text_problem("caption", caption):
            reasons.append(problem)
    else:
        reasons.append(f"'caption' must be a string, got {type(caption).__name__}")
    if problem := _label_problem(label):
        reasons.append(problem)
    refs, blobs = [], []
    for name, value in (("jpg_0", jpg_0), ("jpg_1", jpg_1)):
        data = None
        ref, problem = _resolve(value, base, confine_to)
        if problem is None:
            try:
                data = read_image_bytes(ref)
            except OSError as exc:
                data, problem = None, f"unreadable ({exc})"
            if data is not None:
                problem = _decode_problem(data) if data else "is an empty file"
        if problem:
            reasons.append(f"{name!r} {problem}")
        refs.append(ref)
        blobs.append(data if problem is None else None)
    if not reasons and blobs[0] == blobs[1]:
        reasons.append("'jpg_0' and 'jpg_1' are the same image")
    return reasons, refs, blobs


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
) -> ImageDataset:
    """Load Pick-a-Pic-style rows, validate every one, order each pair as (chosen, rejected).

    Optional ``score_0`` / ``score_1`` columns (a reward model's score of ``jpg_0`` / ``jpg_1``) feed odpo and
    rdpo: ``needs_scores`` requires them, ``chosen_scores_higher`` also the preferred image's score above the
    other's (ODPO's log(s_w − s_l)).

    ``source``, ``config_name``, ``split``, ``revision``: as :func:`mmpref.data.text.open_rows` takes them
    (an in-memory ``datasets.Dataset`` or list of dicts too). ``image_root`` and ``confine_image_paths``:
    where relative image paths start and whether paths must stay there (module docstring). Rows are read a
    batch at a time and every image is decoded once here, so a corrupt file stops the run before step 0
    (or is skipped).
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    rows = open_rows(source, config_name=config_name, split=split, revision=revision)
    ds, name = rows.dataset, rows.name
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
        base = rows.folder or Path.cwd()
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
    pairs, bad, ties = [], [], 0
    for i, row in enumerate(iter_rows(ds)):
        caption, label = row["caption"], row["label_0"]
        reasons, refs, blobs = image_row_problems(caption, row["jpg_0"], row["jpg_1"], label, base,
                                                  confine_to=confine_to)  # fmt: skip
        order = (0, 1) if label == 1 else (1, 0)
        scores = None
        if has_scores:
            raw = [row[c] for c in IMAGE_SCORE_COLUMNS]
            found = [r for c, v in zip(IMAGE_SCORE_COLUMNS, raw) if (r := score_problem(c, v))]
            reasons += found
            if not found:
                scores = (float(raw[order[0]]), float(raw[order[1]]))
                if chosen_scores_higher and label != 0.5 and not scores[0] > scores[1]:
                    reasons.append(f"the preferred image's score ({scores[0]}) must exceed the other's "
                                   f"({scores[1]}): ODPO's offset log(s_w − s_l) is undefined otherwise")  # fmt: skip
        if reasons:
            bad.append(BadRow(i, "; ".join(reasons)))
            continue
        if label == 0.5:
            ties += 1
            continue
        h = hashlib.sha256(caption.encode())
        for k in order:
            h.update(hashlib.sha256(blobs[k]).digest())
        pairs.append(ImagePair(i, caption, refs[order[0]], refs[order[1]], h.hexdigest(), scores))

    if bad and on_bad_rows == "error":
        raise bad_rows_error(name, bad, ds.num_rows)
    if bad:
        logger.warning("%s: skipped %d of %d bad rows (on_bad_rows=skip); first: %s", name, len(bad),
                       ds.num_rows, "; ".join(str(b) for b in bad[:3]))  # fmt: skip
    if ties:
        logger.info("%s: dropped %d tied rows (label_0 = 0.5)", name, ties)
    if not pairs:
        raise DataError(f"{name}: no usable pairs ({len(bad)} bad rows, {ties} ties)")
    return ImageDataset(pairs=pairs, skipped=len(bad), ties=ties, source=name, cache_dir=rows.cache_dir)


# --------------------------------------------------------------------------------------- transform


@dataclass
class PairPixels:
    pixels: torch.Tensor  # (2, 3, R, R) in [-1, 1]: chosen, rejected
    original_size: tuple[int, int]  # (h, w) of the chosen image
    crop_top_left: tuple[int, int]  # (top, left) in the resized image, mirrored when flipped
    mirrored_left: int  # the crop's left edge in the mirrored resized image (what a flip reports)


def pair_pixels(
    pair: ImagePair,
    resolution: int,
    *,
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> PairPixels:
    """The training transform of one pair (module docstring): joint resize, crop, optional flip."""
    chosen, rejected = load_image(pair.chosen), load_image(pair.rejected)
    w0, h0 = chosen.size
    if rejected.size != chosen.size:
        rejected = rejected.resize((w0, h0), Image.BILINEAR)
    scale = resolution / min(w0, h0)
    w, h = max(resolution, round(w0 * scale)), max(resolution, round(h0 * scale))
    if center_crop:
        top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    else:
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=generator))
    box = (left, top, left + resolution, top + resolution)
    arrays = [
        np.asarray(im.resize((w, h), Image.BILINEAR).crop(box), dtype=np.float32) for im in (chosen, rejected)
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    # diffusers' SDXL scripts flip before cropping, so a flipped pair's crop_top_left is measured in the mirrored
    # image: the same pixels as this crop-then-flip, with the left edge at w - resolution - left
    mirrored = w - resolution - left
    if flip:
        pixels = pixels.flip(-1)
    return PairPixels(pixels.contiguous(), (h0, w0), (top, mirrored if flip else left), mirrored)


# ---------------------------------------------------------------------------------- CLIP embeddings

EMBEDDING_MODES = ("text", "image", "image+text")


def _identity(path: str | None) -> Any:
    """A CLIP model name or weights file for cache keys: local paths by their files, names as they are."""
    if path is None:
        return None
    p = Path(path.removeprefix("local-dir:"))
    return [str(p.resolve()), folder_fingerprint(p)] if p.exists() else path


def clip_embeddings(
    pairs: Sequence[ImagePair],
    *,
    model: str | None,
    weights: str | None = None,
    mode: str = "image+text",
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """L2-normalised (N, 2, D) CLIP embeddings, one per image (chosen, rejected), for Diffusion-RPO.

    ``mode``: ``text`` (the caption's embedding, the same for both images), ``image`` (each image's), or
    ``image+text`` (the normalised mean of the two normalised embeddings: the default, mmpref's reading of
    Diffusion-RPO). Computed once and cached in ``cache_dir`` under a hash of the model, the mode and every
    pair's content; a cache hit does not load CLIP.
    """
    if mode not in EMBEDDING_MODES:
        raise ValueError(f"mode: must be one of {', '.join(EMBEDDING_MODES)}, got {mode!r}")
    if model is None:
        raise DataError(
            "rpo.clip_model: Diffusion-RPO weights contrasts by CLIP similarity and needs an open_clip model: "
            "a local-dir: folder, or an architecture name plus rpo.clip_weights (a local checkpoint); "
            "or use rpo.mode=diagonal, which needs no embeddings"
        )
    from mmpref.data.text import _read_cache, _write_cache
    from mmpref.progress import progress

    cache_file = None
    if cache_dir is not None:
        key = json.dumps([_identity(open_clip_name("rpo.clip_model", model)), _identity(weights), mode,
                          [p.digest for p in pairs]])  # fmt: skip
        cache_file = (
            Path(cache_dir) / f"clip_embeddings_{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
        )
    emb = _read_cache(cache_file)
    if emb is not None and emb.shape[0] == 2 * len(pairs):  # stored as (2N, D)
        return emb.view(len(pairs), 2, -1)

    clip, preprocess, tokenizer = load_open_clip(model, weights, device)
    norm = torch.nn.functional.normalize
    with torch.no_grad():
        text = image = None
        if mode != "image":
            captions = list(dict.fromkeys(p.caption for p in pairs))
            starts = progress(range(0, len(captions), batch_size), desc="CLIP captions", unit="batch")
            parts = [clip.encode_text(tokenizer(captions[i : i + batch_size]).to(device)).float()
                     for i in starts]  # fmt: skip
            where = {c: k for k, c in enumerate(captions)}
            per_caption = norm(torch.cat(parts), dim=-1)
            text = per_caption[torch.tensor([where[p.caption] for p in pairs])][:, None].expand(-1, 2, -1)
        if mode != "text":
            refs = [r for p in pairs for r in (p.chosen, p.rejected)]
            parts = []
            for i in progress(range(0, len(refs), batch_size), desc="CLIP images", unit="batch"):
                batch = torch.stack([preprocess(load_image(r)) for r in refs[i : i + batch_size]]).to(device)
                parts.append(clip.encode_image(batch).float())
            image = norm(torch.cat(parts), dim=-1).view(len(pairs), 2, -1)
    emb = text if image is None else image if text is None else norm((text + image) / 2, dim=-1)
    emb = emb.cpu().contiguous()
    if cache_file is not None:
        _write_cache(cache_file, emb.reshape(len(pairs) * 2, -1).contiguous())
    return emb
