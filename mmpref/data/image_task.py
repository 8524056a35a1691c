"""A small, learnable image preference task, procedurally drawn (no downloads, no model needed).

Each pair shows one scene twice, a coloured shape (circle, square, triangle or cross) on a plain
background, named by its caption ("a red circle on a blue background"). The *chosen* image carries a
"style" the rejected one lacks: broad diagonal stripes over the whole picture (period 16 or 24 px,
wide enough to survive the VAE's 8× downsampling: finer stripes average out in the latents) and a warm
tint. A model that learns the preference denoises striped, warm images better than the reference does, and this shows on
held-out pairs as implicit-reward accuracy above chance. Captions fall in a few clusters (one per shape),
which gives Diffusion-RPO's similarity weights something to find.

Rows are in Pick-a-Pic format (``caption``, ``jpg_0``, ``jpg_1`` as PNG paths relative to the JSONL file,
``label_0``); which side holds the chosen image is random, so ``label_0`` is 1 or 0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 170),
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}


def random_scene(rng: random.Random, size: int) -> tuple[str, dict]:
    """(caption, scene) of one scene drawn by ``rng``: a shape, its colour and the background's, its size and place."""
    shape = rng.choice(SHAPES)
    fg, bg = rng.sample(list(COLORS), 2)
    scale = rng.uniform(0.45, 0.7) * size
    cx, cy = (rng.uniform(0.4, 0.6) * size for _ in range(2))
    return f"a {fg} {shape} on a {bg} background", dict(shape=shape, fg=fg, bg=bg, scale=scale, cx=cx, cy=cy)


def draw_scene(scene: dict, size: int, styled: bool, rng: random.Random) -> Image.Image:
    """The scene, plain or with the preferred style (stripes + warm tint)."""
    img = Image.new("RGB", (size, size), COLORS[scene["bg"]])
    d = ImageDraw.Draw(img)
    r, cx, cy, fg = scene["scale"] / 2, scene["cx"], scene["cy"], COLORS[scene["fg"]]
    if scene["shape"] == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif scene["shape"] == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif scene["shape"] == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    else:
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    a = np.asarray(img, dtype=np.float32)
    if styled:
        period, phase = rng.choice((16, 24)), rng.randrange(24)
        y, x = np.mgrid[0:size, 0:size]
        stripes = ((x + y + phase) % period) < period / 2
        a = np.where(stripes[..., None], a * 0.55, a)
        a = a * np.array([1.1, 0.95, 0.75]) + np.array([20.0, 8.0, 0.0])
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_image_style_task(
    out_dir: str | Path,
    n_train: int = 160,
    n_eval: int = 48,
    size: int = 64,
    seed: int = 0,
    n_style_refs: int = 16,
) -> tuple[Path, Path]:
    """Write ``images/*.png``, ``train.jsonl``, ``eval.jsonl`` and ``style_refs/*.png`` (styled scenes only)
    under ``out_dir``; returns the two JSONL files."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        path = out_dir / f"{split}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                caption, scene = random_scene(rng, size)
                names = []
                for styled in (True, False):
                    name = f"images/{split}-{i:04d}-{'styled' if styled else 'plain'}.png"
                    draw_scene(scene, size, styled, rng).save(out_dir / name, optimize=True)
                    names.append(name)
                label = rng.choice((0, 1))  # 1: jpg_0 is the chosen (styled) image
                jpg_0, jpg_1 = names if label == 1 else names[::-1]
                f.write(
                    json.dumps({"caption": caption, "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": label}) + "\n"
                )
        files.append(path)
    # style references for the style metric (mmpref style-score --style-refs, samples.style_refs): styled
    # scenes of their own, drawn from a separate RNG so the pairs above do not depend on them
    refs, ref_rng = out_dir / "style_refs", random.Random(seed + 1)
    refs.mkdir(exist_ok=True)
    for i in range(n_style_refs):
        _, scene = random_scene(ref_rng, size)
        draw_scene(scene, size, True, ref_rng).save(refs / f"ref-{i:03d}.png", optimize=True)
    return files[0], files[1]
