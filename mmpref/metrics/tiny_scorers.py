"""Tiny random scorers in their authors' published layouts, for tests and the offline demo.

Each maker writes a folder that :func:`mmpref.metrics.scorers.load_scorer` loads exactly as it loads the real
weights (the same files, key names and loaders); only the sizes are tiny (32 px images, widths 32–128) and
the weights random, so the scores mean nothing. Nothing is downloaded: tokenizers are written from
:func:`mmpref.tiny_models.tiny_corpus`. The same ``seed`` gives the same weights; the global RNG is untouched.

    >>> from mmpref.metrics.tiny_scorers import TINY_SCORERS
    >>> folder = TINY_SCORERS["pickscore"]("/tmp/tiny-pickscore")
    >>> load_scorer("pickscore", str(folder))
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from mmpref.tiny_models import _clip_text_config, _seeded, _write_clip_tokenizer, make_tiny_clip, tiny_corpus

__all__ = [
    "TINY_SCORERS",
    "make_tiny_aesthetic",
    "make_tiny_hpsv2",
    "make_tiny_imagereward",
    "make_tiny_pickscore",
    "make_tiny_scorers",
]

IMAGE_SIZE = 32


def _tiny_clip_model(folder: Path, seed: int, logit_scale: float = 2.0):
    """A transformers ``CLIPModel`` (32 px, patch 8, width 32) + ``CLIPProcessor`` saved in ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    tokenizer = _write_clip_tokenizer(folder)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=8, projection_dim=32, hidden_act="quick_gelu")  # fmt: skip
    config = CLIPConfig(text_config=_clip_text_config(tokenizer).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=32, logit_scale_init_value=logit_scale)  # fmt: skip
    model = _seeded(seed, lambda: CLIPModel(config))
    model.save_pretrained(folder)
    size = {"shortest_edge": IMAGE_SIZE}
    image_processor = CLIPImageProcessor(size=size, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return model


def make_tiny_pickscore(out_dir: str | Path, seed: int = 0) -> Path:
    """A PickScore-layout folder: ``CLIPModel`` weights and config plus its processor (``logit_scale`` = 2,
    so ``exp(logit_scale)`` ≈ 7.39 shows in every score)."""
    out_dir = Path(out_dir)
    _tiny_clip_model(out_dir, seed)
    return out_dir


def make_tiny_hpsv2(out_dir: str | Path, seed: int = 0) -> Path:
    """An HPSv2-layout folder: ``HPS_v2_compressed.pt`` and ``HPS_v2.1_compressed.pt`` (``{"state_dict": ...}``
    of an open_clip model, different weights each) beside the tiny architecture's ``open_clip_config.json``."""
    import open_clip

    out_dir = Path(out_dir)
    make_tiny_clip(out_dir, seed=seed)
    (out_dir / "open_clip_model.safetensors").unlink()  # HPS ships its own checkpoint, not open_clip's file
    cfg = json.loads((out_dir / "open_clip_config.json").read_text())["model_cfg"]
    for i, name in enumerate(("HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt")):
        model = _seeded(seed + 1 + i, lambda: open_clip.CLIP(**cfg))
        torch.save({"state_dict": model.state_dict()}, out_dir / name)
    return out_dir


def _write_bert_vocab(folder: Path) -> Path:
    """A WordPiece ``vocab.txt``: BERT's specials, every character (plain and ``##``), the corpus' words."""
    words = sorted(
        {w for line in tiny_corpus() for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", line.lower())}
    )
    chars = sorted({c for w in words for c in w})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return path


def make_tiny_imagereward(out_dir: str | Path, seed: int = 0) -> Path:
    """An ImageReward-layout folder: ``ImageReward.pt`` with the authors' key names (``blip.visual_encoder.*`` in
    timm's ViT layout, ``blip.text_encoder.*`` in BLIP's ``med.py`` layout, ``mlp.layers.*``, and the unused
    ``blip.vision_proj`` / ``blip.text_proj``), ``med_config.json``, and a BERT tokenizer (``vocab.txt``).
    ViT: 32 px, patch 8, width 128 (2 heads of 64), 2 blocks; BERT: width 32, 2 heads, 2 layers."""
    from transformers import BertTokenizer

    from mmpref.metrics.imagereward import (
        VIT_BLOCK_KEYS,
        VIT_KEYS,
        ImageRewardModel,
        load_imagereward_tokenizer,
        text_config_from,
        vision_config_from,
    )

    out_dir = Path(out_dir)
    BertTokenizer(str(_write_bert_vocab(out_dir)), do_lower_case=True).save_pretrained(out_dir)
    tokenizer = load_imagereward_tokenizer(str(out_dir))
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(tokenizer),
           "encoder_width": 128, "add_cross_attention": True}  # fmt: skip
    (out_dir / "med_config.json").write_text(json.dumps(med, indent=2))
    width, patch, depth = 128, 8, 2
    shapes = {"blip.visual_encoder.cls_token": torch.zeros(1, 1, width),
              "blip.visual_encoder.patch_embed.proj.weight": torch.zeros(width, 3, patch, patch),
              "blip.visual_encoder.pos_embed": torch.zeros(1, (IMAGE_SIZE // patch) ** 2 + 1, width),
              **{f"blip.visual_encoder.blocks.{i}.mlp.fc1.weight": torch.zeros(2 * width, width) for i in range(depth)}}  # fmt: skip
    vision = vision_config_from(shapes)

    def build() -> ImageRewardModel:
        model = ImageRewardModel(vision, text_config_from(med, width, tokenizer))
        with torch.no_grad():  # BLIP's init leaves the tiny towers near-constant: unit-gain weights instead
            for p in model.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
                else:
                    p.add_(0.1 * torch.randn_like(p))
        return model

    model = _seeded(seed, build)
    state = {}
    timm_names = {v: k for k, v in VIT_KEYS.items()}
    block_names = {v: k for k, v in VIT_BLOCK_KEYS.items()}
    for key, value in model.state_dict().items():
        if key.startswith("visual_encoder."):
            name = key[len("visual_encoder.") :]
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
            name = f"blocks.{m[1]}.{block_names[m[2]]}.{m[3]}" if m else timm_names[name]
            state["blip.visual_encoder." + name] = value
        elif key.startswith("text_encoder."):
            state["blip." + key] = value
        else:
            state[key] = value
    state["blip.vision_proj.weight"] = torch.zeros(
        256, width
    )  # in the published checkpoint, unused by score()
    state["blip.text_proj.weight"] = torch.zeros(256, 32)
    torch.save(state, out_dir / "ImageReward.pt")
    return out_dir


def make_tiny_aesthetic(out_dir: str | Path, seed: int = 0) -> Path:
    """An aesthetic-predictor folder: the MLP's ``aesthetic-model.pth`` (``layers.0`` ... ``layers.7``, input 32)
    beside a tiny transformers ``CLIPModel`` (its ``config.json``, weights and processor) as its CLIP."""
    from mmpref.metrics.imagereward import RewardMLP

    out_dir = Path(out_dir)
    _tiny_clip_model(out_dir, seed)

    def build() -> RewardMLP:
        mlp = RewardMLP(32)
        with torch.no_grad():
            for p in mlp.parameters():
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)  # O(1) outputs
            mlp.layers[0].weight.mul_(10)  # a random CLIP's unit embeddings differ little between images
        return mlp

    torch.save(_seeded(seed + 1, build).state_dict(), out_dir / "aesthetic-model.pth")
    return out_dir


TINY_SCORERS: dict[str, Callable[..., Path]] = {
    "pickscore": make_tiny_pickscore,
    "hpsv2": make_tiny_hpsv2,
    "hpsv21": make_tiny_hpsv2,
    "imagereward": make_tiny_imagereward,
    "aesthetic": make_tiny_aesthetic,
    "clipscore": make_tiny_clip,
}


def make_tiny_scorers(out_dir: str | Path, names=("pickscore", "hpsv2", "imagereward", "aesthetic", "clipscore"),
                      seed: int = 0) -> dict[str, str]:  # fmt: skip
    """Write one tiny folder per scorer under ``out_dir``; returns ``{name: model}`` for ``load_scorer`` (the
    ``clipscore`` entry as ``local-dir:FOLDER``)."""
    out_dir = Path(out_dir)
    models = {}
    for name in names:
        folder = TINY_SCORERS[name](out_dir / name, seed=seed)
        models[name] = f"local-dir:{folder}" if name == "clipscore" else str(folder)
    return models
