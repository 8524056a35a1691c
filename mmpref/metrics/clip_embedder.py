"""Image and text embedders for the style metrics: open_clip with a content-hash cache, or a feature function.

The metrics only need an object with two methods (:class:`Embedder`)::

    embed_images(paths) -> Tensor (n, d)   # one row per path, in order
    embed_texts(texts)  -> Tensor (n, d)

:class:`ClipEmbedder` implements it over open_clip. Weights must be local: an open_clip model name with
``pretrained=`` a checkpoint file (or a tag whose weights are already in the Hugging Face cache), or a
``local-dir:FOLDER`` holding ``open_clip_config.json`` + weights. Embeddings are cached by the SHA-256 of each
image file's bytes (and of each text) under ``cache_dir/<model key>/``, one safetensors file per entry written
atomically, and the model is loaded lazily: re-scoring a folder whose embeddings are all cached neither
imports open_clip nor loads weights (``embedder.model_loaded`` stays ``False``).

:class:`FeatureEmbedder` wraps a deterministic ``PIL.Image -> features`` function instead (tests, quick
hand-made style detectors). Both raise :class:`BadImageError` naming every unreadable file after embedding
the others; :func:`embed_image_files` turns that into a skip-with-warning or an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from mmpref.files import atomic_save
from mmpref.hub import file_sha256, load_open_clip, open_clip_name

__all__ = [
    "IMAGE_SUFFIXES",
    "BadImageError",
    "BadImageWarning",
    "ClipEmbedder",
    "EmbeddedImages",
    "Embedder",
    "EmbedderError",
    "EmbeddingCache",
    "FeatureEmbedder",
    "default_cache_dir",
    "embed_image_files",
    "list_images",
    "load_open_clip",
    "load_rgb",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ON_BAD_IMAGES = ("skip", "error")


class EmbedderError(RuntimeError):
    """The embedding model cannot be set up (missing weights, bad model name, ...)."""


class BadImageError(ValueError):
    """One or more image files cannot be read; ``bad`` maps each path to the reason."""

    def __init__(self, bad: dict[Path, str]):
        self.bad = dict(bad)
        listing = "; ".join(f"{p} ({why})" for p, why in self.bad.items())
        super().__init__(f"{len(self.bad)} unreadable image(s): {listing}")


class BadImageWarning(UserWarning):
    """Unreadable images were skipped."""


@runtime_checkable
class Embedder(Protocol):
    """What the style metrics need: image and text embeddings in a shared space, one row per input."""

    def embed_images(self, paths: Sequence[str | Path]) -> torch.Tensor: ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------- image I/O


def list_images(folder: str | Path) -> list[Path]:
    """The image files (PNG, JPEG, WebP by suffix) directly inside ``folder``, sorted by file name.

    Raises ``FileNotFoundError`` for a missing folder or one without image files, ``NotADirectoryError`` for
    a file. Readability is checked later, by the embedder.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"not a folder: {folder}")
    paths = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.name,
    )
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder: {folder}")
    return paths


def load_rgb(path: str | Path):
    """Decode an image file to an RGB ``PIL.Image``.

    EXIF orientation is applied; images with transparency (RGBA, LA, palette with a transparent index) are
    composited over white; grayscale (8 or 16 bit), palette and CMYK images are converted to RGB. Raises
    :class:`BadImageError` if the file cannot be read or decoded.
    """
    import warnings

    from PIL import Image, ImageOps

    from mmpref.data.images import MAX_IMAGE_PIXELS

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            im = Image.open(path)  # reads the header only
        with im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(
                    f"{im.width}x{im.height} pixels, more than the {MAX_IMAGE_PIXELS} allowed "
                    "(a decompression bomb, or an image to downscale first)"
                )
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):  # 16/32-bit grayscale: PIL's convert() would clip, so rescale
                im = Image.fromarray(_to_uint8(im))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            return im.convert("RGB")
    except Exception as e:  # PIL raises many types for broken files: report them all by name
        raise BadImageError({path: f"{type(e).__name__}: {e}"}) from e


def _to_uint8(im):
    import numpy as np

    return np.clip(np.asarray(im, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)


class EmbeddedImages(NamedTuple):
    """Embeddings of the readable images: ``paths[i]`` ↔ ``embeddings[i]``; ``skipped`` maps path → reason."""

    paths: list[Path]
    embeddings: torch.Tensor
    skipped: dict[Path, str]


def embed_image_files(
    embedder: Embedder, paths: Sequence[str | Path], on_bad_images: str = "skip"
) -> EmbeddedImages:
    """Embed ``paths`` with any :class:`Embedder`, skipping unreadable files (with a warning) or raising.

    ``on_bad_images="skip"`` warns (:class:`BadImageWarning`) with every unreadable file and its reason and
    embeds the rest; ``"error"`` re-raises the embedder's :class:`BadImageError`. The readable images are
    embedded (and cached) before the error is raised, so a retry after removing the bad files is cheap.
    """
    if on_bad_images not in ON_BAD_IMAGES:
        raise ValueError(f"on_bad_images must be one of {ON_BAD_IMAGES}, got {on_bad_images!r}")
    paths = [Path(p) for p in paths]
    try:
        return EmbeddedImages(paths, embedder.embed_images(paths), {})
    except BadImageError as e:
        if on_bad_images == "error":
            raise
        warnings.warn(f"skipped {e}", BadImageWarning, stacklevel=2)
        kept = [p for p in paths if p not in e.bad]
        emb = embedder.embed_images(kept) if kept else torch.empty(0, 0)
        return EmbeddedImages(kept, emb, e.bad)


# ---------------------------------------------------------------------------------------- feature embedder


class FeatureEmbedder:
    """An :class:`Embedder` over plain functions: ``image_fn(PIL RGB image) -> 1-D features``.

    Images are decoded with :func:`load_rgb`, so unreadable files behave as with :class:`ClipEmbedder`.
    ``text_fn(str) -> 1-D features`` is optional; without it :meth:`embed_texts` raises.
    """

    def __init__(self, image_fn: Callable, text_fn: Callable | None = None):
        self.image_fn = image_fn
        self.text_fn = text_fn

    def embed_images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        feats, bad = [], {}
        for p in map(Path, paths):
            try:
                feats.append(torch.as_tensor(self.image_fn(load_rgb(p))).float().flatten())
            except BadImageError as e:
                bad.update(e.bad)
        if bad:
            raise BadImageError(bad)
        return torch.stack(feats) if feats else torch.empty(0, 0)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if self.text_fn is None:
            raise NotImplementedError("this FeatureEmbedder has no text_fn")
        return torch.stack([torch.as_tensor(self.text_fn(t)).float().flatten() for t in texts])


# ---------------------------------------------------------------------------------------- embedding cache


class EmbeddingCache:
    """Content-addressed store: ``root/<kind>/<key[:2]>/<key>.safetensors`` holding one float32 vector.

    Writes go through :func:`mmpref.files.atomic_save` (a temporary file in the same folder renamed into place),
    so a reader never sees a partial file and concurrent writers of the same key are harmless. An unreadable
    entry counts as a miss.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def get(self, kind: str, key: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self._path(kind, key)
        if not path.is_file():
            return None
        try:
            return load_file(path)["embedding"]
        except Exception:  # a foreign or damaged file: recompute and overwrite
            return None

    def put(self, kind: str, key: str, emb: torch.Tensor) -> None:
        atomic_save({"embedding": emb.detach().float().cpu()}, self._path(kind, key))


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mmpref/clip-embeddings`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmpref" / "clip-embeddings"


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------------------------------ CLIP embedder


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _stat_signature(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


class ClipEmbedder:
    """open_clip image/text embedder with lazy model loading and a content-hash embedding cache.

    Args:
        model_name: an open_clip model name (``"ViT-B-32"``, ...), ``"local-dir:FOLDER"``
            (``open_clip_config.json`` + weights, e.g. from :func:`mmpref.tiny_models.make_tiny_clip`) or a hub id
            (``ORG/NAME[@rev]`` or ``hf-hub:ORG/NAME``), fetched into the Hugging Face cache (read offline).
        pretrained: for a plain model name, a local checkpoint file or a tag (``"openai"``, ...) whose weights
            are already cached; required there, since random weights would make every score meaningless.
            Ignored by open_clip for ``local-dir:`` / ``hf-hub:``.
        device: where the model runs.
        batch_size: images (or texts) per forward pass.
        cache_dir: embedding cache root (``None``: no cache). Entries are keyed by the model (name, weights
            file size and mtime) and by each input's SHA-256, so edited images or weights are recomputed.
        progress: show a tqdm bar while embedding uncached inputs (never when quiet or off the main process).
        key: the config key or option that named the model, for error messages.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        key: str = "clip_model",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # a hub id becomes the local-dir: of its cached snapshot (``key`` names it in errors)
        self.model_name = model_name if model_name.startswith("local-dir:") else open_clip_name(key, model_name)
        self.pretrained = str(pretrained) if pretrained is not None else None
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        self.model_key = self._model_key()  # also validates model_name / pretrained, without loading
        self.cache = EmbeddingCache(Path(cache_dir) / self.model_key) if cache_dir is not None else None
        self._model = self._preprocess = self._tokenizer = None
        self._hash_memo: dict[tuple, str] = {}

    # ---- identity and lazy loading

    def _model_key(self) -> str:
        """A short hash of what determines the embeddings: model name and the weights' identity."""
        ident: dict = {"model": self.model_name, "pretrained": self.pretrained}
        if self.model_name.startswith("local-dir:"):
            folder = Path(self.model_name[len("local-dir:") :]).expanduser()
            if not folder.is_dir():
                raise EmbedderError(f"CLIP model folder not found: {folder} (from {self.model_name!r})")
            ident["model"] = f"local-dir:{folder.resolve()}"
            ident["files"] = [_stat_signature(p) for p in sorted(folder.iterdir()) if p.is_file()]
        elif self.model_name.startswith("hf-hub:"):
            pass
        elif self.pretrained is None:
            raise EmbedderError(
                f"no weights for CLIP model {self.model_name!r}: pass a local checkpoint file "
                "(--clip-weights FILE), a cached pretrained tag, or a local-dir:FOLDER model "
                "(weights are never downloaded)"
            )
        elif Path(self.pretrained).expanduser().is_file():
            weights = Path(self.pretrained).expanduser().resolve()
            ident["pretrained"] = str(weights)
            ident["files"] = [_stat_signature(weights)]
        elif _looks_like_path(self.pretrained):
            raise EmbedderError(f"CLIP weights file not found: {self.pretrained}")
        blob = json.dumps(ident, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def model_loaded(self) -> bool:
        """Whether the open_clip model has been loaded (it is only loaded for uncached inputs)."""
        return self._model is not None

    def _ensure_model(self) -> None:
        if self._model is not None:
            return
        try:
            self._model, self._preprocess, self._tokenizer = load_open_clip(
                self.model_name, self.pretrained, self.device
            )
        except Exception as e:
            raise EmbedderError(
                f"could not load CLIP model {self.model_name!r} (pretrained={self.pretrained!r}); weights "
                "must be local (a checkpoint file, a cached tag or a local-dir: folder): "
                f"{type(e).__name__}: {e}"
            ) from e

    def _progress(self, total: int, desc: str, unit: str):
        from mmpref.progress import progress

        return progress(total=total, desc=desc, unit=unit, disable=not self.progress or total == 0)

    # ---- images

    def _content_hash(self, path: Path) -> str:
        st = path.stat()
        memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if memo_key not in self._hash_memo:
            self._hash_memo[memo_key] = file_sha256(path)
        return self._hash_memo[memo_key]

    def _encode_images(self, images: list) -> torch.Tensor:
        self._ensure_model()
        pixels = torch.stack([self._preprocess(im) for im in images]).to(self.device)
        with torch.inference_mode():
            return self._model.encode_image(pixels).float().cpu()

    def embed_images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Raw (unnormalised) image embeddings, shape ``(len(paths), d)``, cached by file content.

        Every readable image is embedded (and cached) first; then, if any file could not be read or decoded,
        :class:`BadImageError` is raised listing all of them (see :func:`embed_image_files` to skip them).
        """
        paths = [Path(p) for p in paths]
        out: list[torch.Tensor | None] = [None] * len(paths)
        bad: dict[Path, str] = {}
        todo: list[tuple[int, str]] = []
        for i, path in enumerate(paths):
            try:
                key = self._content_hash(path)
            except OSError as e:
                bad[path] = f"{type(e).__name__}: {e}"
                continue
            out[i] = self.cache.get("images", key) if self.cache is not None else None
            if out[i] is None:
                todo.append((i, key))
        with self._progress(len(todo), "CLIP images", "img") as bar:
            for batch in _batches(todo, self.batch_size):
                self._embed_image_batch(paths, batch, out, bad)
                bar.update(len(batch))
        if bad:
            raise BadImageError(bad)
        return torch.stack(out) if out else torch.empty(0, 0)

    def _embed_image_batch(
        self, paths: list[Path], batch: Sequence[tuple[int, str]], out: list, bad: dict[Path, str]
    ) -> None:
        images, slots = [], []
        for i, key in batch:
            try:
                images.append(load_rgb(paths[i]))
                slots.append((i, key))
            except BadImageError as e:
                bad.update(e.bad)
        if not images:
            return
        for (i, key), emb in zip(slots, self._encode_images(images)):
            out[i] = emb.clone()
            if self.cache is not None:
                self.cache.put("images", key, out[i])

    # ---- texts

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Raw text embeddings, shape ``(len(texts), d)``, cached by the SHA-256 of each text."""
        texts = [str(t) for t in texts]
        out: list[torch.Tensor | None] = [None] * len(texts)
        todo = []
        for i, text in enumerate(texts):
            key = _sha256_text(text)
            out[i] = self.cache.get("texts", key) if self.cache is not None else None
            if out[i] is None:
                todo.append((i, key))
        with self._progress(len(todo), "CLIP texts", "text") as bar:
            for batch in _batches(todo, self.batch_size):
                self._ensure_model()
                tokens = self._tokenizer([texts[i] for i, _ in batch]).to(self.device)
                with torch.inference_mode():
                    embs = self._model.encode_text(tokens).float().cpu()
                for (i, key), emb in zip(batch, embs):
                    out[i] = emb.clone()
                    if self.cache is not None:
                        self.cache.put("texts", key, out[i])
                bar.update(len(batch))
        return torch.stack(out) if out else torch.empty(0, 0)
