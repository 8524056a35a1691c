"""What turns a decoded image pair into model inputs (docs/design.md §7): :func:`pair_pixels`, the training
transform (joint resize, crop and flip of chosen and rejected, as :class:`PairPixels`), and
:class:`PairEmbedder`, the CLIP embeddings of a pair's images and caption that Diffusion-RPO weighs its
contrasts by (modes in :data:`EMBEDDING_MODES`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmpref.data.errors import DataError
from mmpref.data.images import ImagePair, load_image
from mmpref.hub import folder_fingerprint, load_open_clip, open_clip_name

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
    """The training transform of one pair (diffusers' Diffusion-DPO scripts): joint resize, crop, optional flip.

    The rejected image is first resized to the chosen image's size, then both are resized together so the
    shorter side is ``resolution`` (bilinear), cropped to a square (center crop, or one random crop shared by
    the pair), and scaled to [-1, 1]. SDXL's micro-conditioning takes the chosen image's original (h, w) and
    the crop's top-left corner.

    Random flips: the pair is flipped together. With cached latents both orientations are encoded once
    (twice the cache, no VAE call during training) and a flip picks the mirrored latents; a random crop is
    drawn once per row when the cache is built (seeded), so with caching it is fixed per row.
    """
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


class PairEmbedder:
    """L2-normalised CLIP embeddings of image pairs, one per image (chosen, rejected), for Diffusion-RPO.

    ``mode``: ``text`` (the caption's embedding, the same for both images), ``image`` (each image's), or
    ``image+text`` (the normalised mean of the two normalised embeddings: the default, mmpref's reading of
    Diffusion-RPO). open_clip loads on the first call, so a run whose embeddings are all cached never loads
    it. :attr:`identity` names the model, its weights and the mode, for cache keys.
    """

    def __init__(self, model: str | None, weights: str | None = None, mode: str = "image+text",
                 device: str | torch.device = "cpu"):  # fmt: skip
        if mode not in EMBEDDING_MODES:
            raise ValueError(f"mode: must be one of {', '.join(EMBEDDING_MODES)}, got {mode!r}")
        if model is None:
            raise DataError(
                "rpo.clip_model: Diffusion-RPO weights contrasts by CLIP similarity and needs an open_clip model: "
                "a local-dir: folder, or an architecture name plus rpo.clip_weights (a local checkpoint); "
                "or use rpo.mode=diagonal, which needs no embeddings"
            )
        self.model, self.weights, self.mode, self.device = model, weights, mode, device
        self.identity = json.dumps([_identity(open_clip_name("rpo.clip_model", model)), _identity(weights), mode])
        self._clip = None

    def __call__(self, pairs: Sequence[ImagePair], batch_size: int = 32) -> torch.Tensor:
        """(len(pairs), 2, D) float32 on the CPU."""
        if self._clip is None:
            self._clip = load_open_clip(self.model, self.weights, self.device)
        clip, preprocess, tokenizer = self._clip
        norm, device = torch.nn.functional.normalize, self.device
        text = image = None
        with torch.no_grad():
            if self.mode != "image":
                captions = list(dict.fromkeys(p.caption for p in pairs))
                parts = [clip.encode_text(tokenizer(captions[i : i + batch_size]).to(device)).float()
                         for i in range(0, len(captions), batch_size)]  # fmt: skip
                where = {c: k for k, c in enumerate(captions)}
                per_caption = norm(torch.cat(parts), dim=-1)
                text = per_caption[torch.tensor([where[p.caption] for p in pairs])][:, None].expand(-1, 2, -1)
            if self.mode != "text":
                refs = [r for p in pairs for r in (p.chosen, p.rejected)]
                parts = []
                for i in range(0, len(refs), batch_size):
                    batch = torch.stack([preprocess(load_image(r)) for r in refs[i : i + batch_size]]).to(device)
                    parts.append(clip.encode_image(batch).float())
                image = norm(torch.cat(parts), dim=-1).view(len(pairs), 2, -1)
        emb = text if image is None else image if text is None else norm((text + image) / 2, dim=-1)
        return emb.cpu().contiguous()
