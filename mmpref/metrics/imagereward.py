"""ImageReward (Xu et al. 2023, ``THUDM/ImageReward``) rebuilt from transformers' BLIP parts.

The published model is ``ImageReward/ImageReward.py:ImageReward``: BLIP's ViT image encoder
(``models/BLIP/vit.py:VisionTransformer``, ViT-L/16 at 224 px), BLIP's BERT text encoder with a cross-attention
block in every layer (``models/BLIP/med.py:BertModel``, configured by ``med_config.json``), and an MLP head on the
text encoder's first token. Its ``score(prompt, image)`` computes::

    e = ViT(preprocess(image))                                   # (197, 1024) image tokens, after the final norm
    h = BERT(tokenize(prompt), cross-attending to e)[0]          # the [CLS] position, (768,)
    r = (MLP(h) − 0.16717362830052426) / 1.0333394966054072      # its mean/std constants

with ``preprocess`` = Resize(224, bicubic) of the shorter side, CenterCrop(224), RGB, ToTensor,
Normalize(CLIP mean, CLIP std) (``ImageReward.py:_transform``) and ``tokenize`` = ``bert-base-uncased``'s
tokenizer plus the tokens ``[DEC]`` (bos) and ``[ENC]`` (``models/BLIP/blip.py:init_tokenizer``), padded to
``max_length=35`` with truncation. The MLP is 768 → 1024 → 128 → 64 → 16 → 1 linear layers with dropout and no
activation (``ImageReward.py:MLP``).

transformers' ``BlipVisionModel`` and ``BlipTextModel`` are ports of the same two BLIP modules (same fused
``qkv``, same layer order, same post-norm), so the checkpoint loads into them by renaming its keys
(:func:`convert_state_dict`): nothing of the ``image-reward`` package is needed (it pins old ``timm`` and
``fairscale`` releases). The vision tower's shape is read off the checkpoint (width, patch, image size, depth;
heads = width / 64, as in both BLIP ViTs); the published ``ImageReward.pt`` gives ViT-L/16 at 224 px.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "ImageRewardModel",
    "RewardMLP",
    "convert_state_dict",
    "load_imagereward_tokenizer",
    "model_from_checkpoint",
]

IMAGEREWARD_MEAN = 0.16717362830052426  # ImageReward.py: self.mean
IMAGEREWARD_STD = 1.0333394966054072  # ImageReward.py: self.std
TEXT_MAX_LENGTH = 35  # ImageReward.py: score(), tokenizer(..., padding="max_length", max_length=35)
VIT_HEAD_DIM = 64  # BLIP's ViT-B (768 / 12) and ViT-L (1024 / 16)
VIT_LAYER_NORM_EPS = 1e-6  # vit.py: partial(nn.LayerNorm, eps=1e-6)

# BLIP vit.py's parameter names (timm's layout) -> transformers' BlipVisionModel
VIT_KEYS = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
VIT_BLOCK_KEYS = {  # inside blocks.{i} -> encoder.layers.{i}
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


class RewardMLP(nn.Module):
    """``ImageReward.py:MLP``: Linear(d, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64),
    Dropout(0.1), Linear(64, 16), Linear(16, 1); no activations (commented out in the authors' code).

    The LAION aesthetic predictor (``improved-aesthetic-predictor/simple_inference.py:MLP``) is the same stack,
    with the same parameter names (``layers.0`` ... ``layers.7``).
    """

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP BERT with cross-attention + :class:`RewardMLP`; :meth:`forward` gives the *raw* MLP output
    (before the mean/std normalisation), one value per (image, prompt) row."""

    def __init__(self, vision_config, text_config):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = RewardMLP(text_config.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        )
        return self.mlp(text.last_hidden_state[:, 0, :].float()).squeeze(-1)


def convert_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``ImageReward.pt`` keys (``blip.visual_encoder.*`` in timm's layout, ``blip.text_encoder.*`` in BLIP's
    ``med.py`` layout, ``mlp.layers.*``) -> :class:`ImageRewardModel` keys. Keys the scorer does not use
    (``blip.vision_proj``, ``blip.text_proj``, buffers) are dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = vit_key(key[len("blip.visual_encoder.") :])
            if name is not None:
                out["visual_encoder." + name] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            out["text_encoder." + key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            out[key] = value
    return out


def vit_key(key: str) -> str | None:
    """One BLIP ViT parameter name -> its ``BlipVisionModel`` name (None for anything else)."""
    if key in VIT_KEYS:
        return VIT_KEYS[key]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
    if m and m[2] in VIT_BLOCK_KEYS:
        return f"encoder.layers.{m[1]}.{VIT_BLOCK_KEYS[m[2]]}.{m[3]}"
    return None


def vision_config_from(state: dict[str, Tensor]):
    """The ``BlipVisionConfig`` of a checkpoint's ViT, read off its tensor shapes (see the module docstring)."""
    from transformers import BlipVisionConfig

    prefix = "blip.visual_encoder."
    width = state[prefix + "cls_token"].shape[-1]
    patch = state[prefix + "patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state[prefix + "pos_embed"].shape[1] - 1)
    depth = len({k.split(".")[3] for k in state if k.startswith(prefix + "blocks.")})
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=state[prefix + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=width // VIT_HEAD_DIM,
        image_size=patch * grid,
        patch_size=patch,
        hidden_act="gelu",  # vit.py: nn.GELU (exact erf)
        layer_norm_eps=VIT_LAYER_NORM_EPS,
    )


def text_config_from(med_config: dict, encoder_width: int, tokenizer):
    """``BlipTextConfig`` of BLIP's ``med_config.json`` (a BertConfig with ``add_cross_attention``); the cross-
    attention reads the ViT's width (``blip_pretrain.py``: ``encoder_config.encoder_width = vision_width``)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        is_decoder=True,  # builds the cross-attention blocks; forward runs bidirectionally (is_decoder=False)
    )


def load_imagereward_tokenizer(name: str, revision: str | None = None):
    """``blip.py:init_tokenizer``: ``BertTokenizer`` of ``name`` plus ``[DEC]`` as bos and ``[ENC]``."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(name, revision=revision)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def model_from_checkpoint(checkpoint: str | Path, med_config: str | Path, tokenizer) -> ImageRewardModel:
    """Build :class:`ImageRewardModel` for ``checkpoint`` (``ImageReward.pt``) and load it; every parameter of
    the model must come from the checkpoint (a missing or misshapen one raises)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state))
    vision = vision_config_from(state)
    text = text_config_from(json.loads(Path(med_config).read_text()), vision.hidden_size, tokenizer)
    model = ImageRewardModel(vision, text)
    model.load_state_dict(convert_state_dict(state), strict=True)
    return model.eval()
