"""Image preference scorers, each computed as its authors' code computes it: PickScore, HPSv2 / HPSv2.1,
ImageReward, the LAION aesthetic predictor and CLIP score.

Every scorer has one interface::

    scorer = load_scorer("pickscore")                     # the authors' published weights (hub id below)
    scorer = load_scorer("pickscore", "runs/my-pickscore") # or a hub id ORG/NAME[@rev], a folder, a checkpoint file
    scores = scorer.score(images, prompts)                 # list[PIL.Image], list[str] -> float32 tensor (n,)

Higher is better for all of them. Models are resolved with :mod:`mmpref.hub`, so ``HF_HUB_OFFLINE=1`` and the
Hugging Face cache behave as with transformers. Scores of different scorers are on different scales and are
never comparable with one another (nor across prompt sets); compare a model with its reference under the same
scorer, prompts and seeds (:mod:`mmpref.metrics.evaluate`).

========== =================================== ===================================================================
name        default model                       score (per image ``x`` with prompt ``p``)
========== =================================== ===================================================================
pickscore   ``yuvalkirstain/PickScore_v1``      ``exp(logit_scale) · cos(E_img(x), E_txt(p))`` (CLIP-H)
hpsv2       ``xswu/HPSv2`` (v2.0 checkpoint)    ``cos(E_img(x), E_txt(p))`` (open_clip ViT-H-14 + HPS weights)
hpsv21      ``xswu/HPSv2`` (v2.1 checkpoint)    same, ``HPS_v2.1_compressed.pt``
imagereward ``THUDM/ImageReward``               ``(MLP(BLIP(x, p)) − 0.16717) / 1.03334``
aesthetic   ``trl-lib/ddpo-aesthetic-predictor`` ``MLP(E_img(x) / ‖E_img(x)‖)`` on OpenAI CLIP ViT-L/14
clipscore   ``timm/vit_large_patch14_clip_224.openai`` ``100 · max(cos(E_img(x), E_txt(p)), 0)``
========== =================================== ===================================================================

Each class's docstring cites the authors' function it reproduces and its exact preprocessing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from mmpref.errors import ConfigError
from mmpref.hub import TRANSFORMERS, open_clip_name, resolve_model

__all__ = [
    "SCORERS",
    "AestheticScore",
    "CLIPScore",
    "HPSv2",
    "ImageReward",
    "PickScore",
    "Scorer",
    "ScorerSpec",
    "load_scorer",
    "parse_scorer_models",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation (clip/clip.py:_transform)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the processor of PickScore's README
# hpsv2/utils.py:hps_version_map
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCH = "ViT-H-14"  # hpsv2/img_score.py: create_model_and_transforms('ViT-H-14', ...)
IMAGEREWARD_TOKENIZER = "bert-base-uncased"  # models/BLIP/blip.py:init_tokenizer
AESTHETIC_FILES = ("aesthetic-model.pth", "sac+logos+ava1-l14-linearMSE.pth")
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"  # OpenAI's ViT-L/14 (clip.load("ViT-L/14")) for transformers
TOKENIZER_FILES = ("tokenizer_config.json", "vocab.txt", "tokenizer.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")  # transformers 5 / earlier


class Scorer:
    """A loaded scorer: :meth:`score` maps (image, prompt) pairs to one float each, higher is better.

    Subclasses implement :meth:`_score_batch` on at most ``batch_size`` RGB images; :meth:`score` converts the
    images to RGB (every author's preprocessing does), batches them and runs without gradients.
    """

    name: str = ""

    def __init__(self, source: str, device: str | torch.device = "cpu", batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source, self.device, self.batch_size = source, torch.device(device), batch_size

    @torch.inference_mode()
    def score(self, images: Sequence, prompts: Sequence[str]) -> Tensor:
        """One score per (image, prompt) pair, float32 on the CPU, shape ``(len(images),)``."""
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts (need one each)")
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            out.append(self._score_batch(batch, list(prompts[start : start + self.batch_size])).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def _score_batch(self, images: list, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"


# ------------------------------------------------------------------------------------------------- helpers


def _checkpoint(key: str, value: str, filenames: Sequence[str], what: str) -> Path:
    """A checkpoint file given directly, or the first of ``filenames`` in a folder or hub repository."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    source = resolve_model(key, value, markers=tuple(filenames), what=what)
    return source.file(source.marker)


def _features(out) -> Tensor:
    """``get_image_features`` / ``get_text_features`` return the projected tensor (transformers 4) or an output
    whose ``pooler_output`` holds it (transformers 5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


def clip_transform(
    size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD
):
    """OpenAI CLIP's ``clip/clip.py:_transform(n_px)``: Resize(n_px, bicubic) of the shorter side (on the PIL
    image), CenterCrop(n_px), ToTensor, Normalize(mean, std). ImageReward's ``_transform`` is the same."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), ToTensor(),
                    Normalize(mean, std)])  # fmt: skip


@contextmanager
def _quiet_root_logger():
    """open_clip logs through the root logger; silence its warnings for one call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _is_clip_folder(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "clip"


# ----------------------------------------------------------------------------------------------- PickScore


class PickScore(Scorer):
    """PickScore (Kirstain et al. 2023), as in the README of ``yuvalkirstain/PickScore`` (``calc_probs``)::

        image_embs = model.get_image_features(**processor(images=...));  image_embs /= ‖image_embs‖
        text_embs  = model.get_text_features(**processor(text=..., padding=True, truncation=True, max_length=77))
        text_embs /= ‖text_embs‖
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)

    so ``s(x, p) = exp(logit_scale) · cos(E_img(x), E_txt(p))`` for each image with its own prompt (the README
    then softmaxes over the images of one prompt: :meth:`score` returns the scores, before any softmax).

    ``model``: a ``CLIPModel`` (default ``yuvalkirstain/PickScore_v1``). ``processor``: the ``CLIPProcessor``; by
    default the model's own when it has one (``preprocessor_config.json``), else the README's
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Preprocessing is the processor's: resize the shorter side to
    224 (bicubic, PIL backend as in 2023), center crop 224, rescale 1/255, normalise with CLIP's mean and std.
    """

    name = "pickscore"

    def __init__(self, model: str, processor: str | None = None, device="cpu", batch_size: int = 16):
        from transformers import AutoProcessor, CLIPModel

        super().__init__(model, device, batch_size)
        source = resolve_model("pickscore", model, markers=TRANSFORMERS, what="a CLIPModel (PickScore)")
        if processor is None:
            own = any(source.file(f) is not None for f in PROCESSOR_FILES)
            processor = model if own else PICKSCORE_PROCESSOR
        proc = resolve_model("pickscore", processor, markers=PROCESSOR_FILES, what="a CLIPProcessor")
        self.processor = AutoProcessor.from_pretrained(proc.name, **proc.kwargs, backend="pil")
        self.model = CLIPModel.from_pretrained(source.name, **source.kwargs).eval().to(self.device)

    def _score_batch(self, images: list, prompts: list[str]) -> Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = _features(self.model.get_image_features(pixel_values=pixels))
        text_embs = _features(self.model.get_text_features(**{k: v.to(self.device) for k, v in text.items()}))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (text_embs * image_embs).sum(-1)


# -------------------------------------------------------------------------------------------------- HPSv2


class HPSv2(Scorer):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023), as ``tgxs002/HPSv2``'s ``hpsv2/img_score.py:score``::

        model = create_model_and_transforms('ViT-H-14', ...); model.load_state_dict(checkpoint['state_dict'])
        outputs = model(preprocess_val(image), tokenizer([prompt]))          # output_dict: normalised features
        logits_per_image = outputs["image_features"] @ outputs["text_features"].T
        hps_score = torch.diagonal(logits_per_image)

    so ``s(x, p) = cos(E_img(x), E_txt(p))``, no logit scale: about 0.2–0.3 for real images. The benchmark
    tables of the HPSv2 paper and README print ``100 · s`` (``hpsv2/evaluation.py``: ``image_features @
    text_features.T * 100``); :meth:`score` returns ``s`` as ``score()`` does.

    ``model``: the hub repository ``xswu/HPSv2`` (default), a folder holding ``HPS_v2_compressed.pt`` /
    ``HPS_v2.1_compressed.pt`` (by ``version``), or the checkpoint file. The architecture is open_clip's
    ``ViT-H-14``, or the ``open_clip_config.json`` beside the checkpoint when there is one (``arch`` overrides).
    Preprocessing is the fork's ``image_transform(is_train=False)``: RGB, ToTensor, then (on the tensor)
    Resize(224, bicubic) of the shorter side, CenterCrop(224), Normalize(CLIP mean, CLIP std); torchvision
    (≥ 0.17) antialiases that tensor resize by default. Text: open_clip's tokenizer, context 77.
    """

    name = "hpsv2"

    def __init__(self, model: str, version: str = "v2.0", arch: str | None = None, device="cpu",
                 batch_size: int = 16):  # fmt: skip
        import open_clip
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

        if version not in HPS_FILES:
            raise ConfigError(f"{self.name}: version must be one of {', '.join(HPS_FILES)}, got {version!r}")
        super().__init__(model, device, batch_size)
        self.name = "hpsv2" if version == "v2.0" else "hpsv21"
        checkpoint = _checkpoint(self.name, model, (HPS_FILES[version],), f"an HPS {version} checkpoint")
        config = checkpoint.parent / "open_clip_config.json"
        arch = arch or (f"local-dir:{checkpoint.parent}" if config.is_file() else HPS_ARCH)
        with _quiet_root_logger():  # open_clip warns that it loads no weights: the HPS checkpoint follows
            clip = open_clip.create_model(arch, load_weights=False)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        clip.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
        self.model = clip.eval().to(self.device)
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = clip.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        cfg = getattr(clip.visual, "preprocess_cfg", {}) or {}
        mean, std = cfg.get("mean", OPENAI_CLIP_MEAN), cfg.get("std", OPENAI_CLIP_STD)
        self.preprocess = Compose([ToTensor(), Resize(size, interpolation=InterpolationMode.BICUBIC),
                                   CenterCrop(size), Normalize(mean, std)])  # fmt: skip

    def _score_batch(self, images: list, prompts: list[str]) -> Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        image_features = self.model.encode_image(pixels, normalize=True)
        text_features = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (image_features * text_features).sum(-1)  # the diagonal of image_features @ text_features.T


# -------------------------------------------------------------------------------------------- ImageReward


class ImageReward(Scorer):
    """ImageReward (Xu et al. 2023), as ``THUDM/ImageReward``'s ``ImageReward/ImageReward.py:ImageReward.score``:
    ``s(x, p) = (MLP(BLIP(x, p)[CLS]) − 0.16717362830052426) / 1.0333394966054072``; architecture, tokenizer and
    preprocessing in :mod:`mmpref.metrics.imagereward`.

    ``model``: the hub repository ``THUDM/ImageReward`` (default), a folder with ``ImageReward.pt`` and
    ``med_config.json``, or the ``.pt`` file (``med_config.json`` beside it). ``tokenizer``: the folder's own when
    it has one, else ``bert-base-uncased`` as the authors load it.
    """

    name = "imagereward"

    def __init__(self, model: str, tokenizer: str | None = None, device="cpu", batch_size: int = 16):
        from mmpref.metrics.imagereward import (
            IMAGEREWARD_MEAN,
            IMAGEREWARD_STD,
            TEXT_MAX_LENGTH,
            load_imagereward_tokenizer,
            model_from_checkpoint,
        )

        super().__init__(model, device, batch_size)
        path = Path(model).expanduser()
        if path.is_file():
            checkpoint, med_config = path, path.parent / "med_config.json"
            if not med_config.is_file():
                raise ConfigError(f"imagereward: {path} needs BLIP's med_config.json beside it")
        else:
            source = resolve_model("imagereward", model, markers=("med_config.json",),
                                   what="an ImageReward model (ImageReward.pt + med_config.json)")  # fmt: skip
            med_config, checkpoint = source.file("med_config.json"), source.file("ImageReward.pt")
            if checkpoint is None:
                raise ConfigError(f"imagereward: {model} has med_config.json but no ImageReward.pt")
        folder = checkpoint.parent
        if tokenizer is None:
            own = any((folder / f).is_file() for f in TOKENIZER_FILES)
            tokenizer = str(folder) if own else IMAGEREWARD_TOKENIZER
        tok = resolve_model("imagereward", tokenizer, markers=TOKENIZER_FILES, what="a BERT tokenizer")
        self.tokenizer = load_imagereward_tokenizer(tok.name, tok.revision)
        self.model = model_from_checkpoint(checkpoint, med_config, self.tokenizer).to(self.device)
        size = self.model.visual_encoder.config.image_size
        self.preprocess = clip_transform(size)
        self.mean, self.std, self.max_length = IMAGEREWARD_MEAN, IMAGEREWARD_STD, TEXT_MAX_LENGTH

    def _score_batch(self, images: list, prompts: list[str]) -> Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)  # fmt: skip
        rewards = self.model(pixels, text.input_ids, text.attention_mask)
        return (rewards - self.mean) / self.std


# ---------------------------------------------------------------------------------------------- aesthetic


class AestheticScore(Scorer):
    """LAION aesthetic predictor v2 (``christophschuhmann/improved-aesthetic-predictor``,
    ``simple_inference.py``)::

        image_features = model2.encode_image(preprocess(pil_image))          # clip.load("ViT-L/14")
        im_emb_arr = normalized(image_features)                               # x / ‖x‖₂ (‖x‖ = 0 -> 1)
        prediction = model(im_emb_arr)                                        # MLP(768), sac+logos+ava1-l14-linearMSE.pth

    so ``s(x) = MLP(e / ‖e‖)`` with ``e`` the CLIP ViT-L/14 image embedding; about 1–10 (the AVA rating scale).
    The prompt is not used.

    ``model``: the MLP weights: a hub repository (default ``trl-lib/ddpo-aesthetic-predictor``, the file TRL's
    DDPO example loads, ``aesthetic-model.pth``), a folder with ``aesthetic-model.pth`` or the authors'
    ``sac+logos+ava1-l14-linearMSE.pth``, or the file. ``clip_model``: the ``CLIPModel`` (default
    ``openai/clip-vit-large-patch14``, OpenAI's ViT-L/14 weights in transformers, whose ``get_image_features``
    is ``encode_image``); a folder that holds a CLIP ``config.json`` beside the MLP is used as its CLIP.
    Preprocessing is ``clip.load``'s (:func:`clip_transform` at the CLIP's image size, 224).
    """

    name = "aesthetic"

    def __init__(self, model: str, clip_model: str | None = None, device="cpu", batch_size: int = 16):
        from transformers import CLIPModel

        from mmpref.metrics.imagereward import RewardMLP

        super().__init__(model, device, batch_size)
        weights = _checkpoint("aesthetic", model, AESTHETIC_FILES, "the aesthetic predictor's MLP weights")
        if clip_model is None:
            clip_model = str(weights.parent) if _is_clip_folder(weights.parent) else AESTHETIC_CLIP
        source = resolve_model("aesthetic", clip_model, markers=TRANSFORMERS, what="a CLIPModel")
        self.clip = CLIPModel.from_pretrained(source.name, **source.kwargs).eval().to(self.device)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        self.mlp = RewardMLP(state["layers.0.weight"].shape[1])
        self.mlp.load_state_dict(state)
        self.mlp.eval().to(self.device)
        self.preprocess = clip_transform(self.clip.config.vision_config.image_size)

    def _score_batch(self, images: list, prompts: list[str]) -> Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        emb = _features(self.clip.get_image_features(pixel_values=pixels)).float()
        norm = torch.linalg.vector_norm(emb, dim=-1, keepdim=True)
        return self.mlp(emb / torch.where(norm == 0, torch.ones_like(norm), norm)).squeeze(-1)


# ---------------------------------------------------------------------------------------------- CLIP score


class CLIPScore(Scorer):
    """CLIP score: ``s(x, p) = 100 · max(cos(E_img(x), E_txt(p)), 0)``, mmpref's content score
    (:func:`mmpref.metrics.style.clip_score_per_image`) on open_clip (:func:`~mmpref.metrics.clip_embedder.load_open_clip`).

    ``w = 100`` is torchmetrics' ``CLIPScore`` (``torchmetrics/functional/multimodal/clip_score.py:
    _clip_score_update``, default model ``openai/clip-vit-large-patch14``), the convention of diffusion papers'
    tables; Hessel et al. 2021 (``jmhessel/clipscore``, ``clipscore.py:get_clip_score``) use ``w = 2.5`` with
    ViT-B/32, so their numbers are 2.5/100 of these for the same model. ``model``: an open_clip hub id (default
    ``timm/vit_large_patch14_clip_224.openai``, OpenAI's ViT-L/14), a ``local-dir:`` folder, or an open_clip
    architecture name with ``weights`` a checkpoint file. Preprocessing is the model's open_clip validation
    transform (bicubic resize of the shorter side, center crop, CLIP mean/std).
    """

    name = "clipscore"

    def __init__(self, model: str, weights: str | None = None, device="cpu", batch_size: int = 16):
        from mmpref.hub import load_open_clip

        super().__init__(model, device, batch_size)
        self.model, self.preprocess, self.tokenizer = load_open_clip(open_clip_name("clipscore", model), weights,
                                                                     self.device)  # fmt: skip

    def _score_batch(self, images: list, prompts: list[str]) -> Tensor:
        from mmpref.metrics.style import clip_score_per_image

        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        image_features = self.model.encode_image(pixels)
        text_features = self.model.encode_text(self.tokenizer(prompts).to(self.device))
        return clip_score_per_image(image_features, text_features)


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ScorerSpec:
    """A scorer's loader, the authors' published weights it loads by default, and its formula in one line."""

    build: Callable[..., Scorer]
    default_model: str
    formula: str


SCORERS: dict[str, ScorerSpec] = {
    "pickscore": ScorerSpec(PickScore, "yuvalkirstain/PickScore_v1", "exp(logit_scale)·cos(img, text)"),
    "hpsv2": ScorerSpec(partial(HPSv2, version="v2.0"), "xswu/HPSv2", "cos(img, text), HPS v2.0"),
    "hpsv21": ScorerSpec(partial(HPSv2, version="v2.1"), "xswu/HPSv2", "cos(img, text), HPS v2.1"),
    "imagereward": ScorerSpec(ImageReward, "THUDM/ImageReward", "(MLP(BLIP(img, text)) − 0.1672) / 1.0333"),
    "aesthetic": ScorerSpec(
        AestheticScore, "trl-lib/ddpo-aesthetic-predictor", "MLP(img / ‖img‖), CLIP ViT-L/14"
    ),
    "clipscore": ScorerSpec(
        CLIPScore, "timm/vit_large_patch14_clip_224.openai", "100·max(cos(img, text), 0)"
    ),
}


def load_scorer(name: str, model: str | None = None, *, device: str | torch.device = "cpu", batch_size: int = 16,
                **options) -> Scorer:  # fmt: skip
    """The scorer ``name`` (a key of :data:`SCORERS`) with ``model`` (hub id, folder or checkpoint file; default
    the authors' published weights). ``options`` go to the scorer's class (``processor=`` for pickscore,
    ``clip_model=`` for aesthetic, ``tokenizer=`` for imagereward, ``arch=`` for hpsv2, ``weights=`` for clipscore)."""
    if name not in SCORERS:
        raise ConfigError(f"scorer: unknown {name!r}; choose from {', '.join(SCORERS)}")
    spec = SCORERS[name]
    return spec.build(model or spec.default_model, device=device, batch_size=batch_size, **options)


def parse_scorer_models(items: Sequence[str]) -> dict[str, str]:
    """``["pickscore=ORG/NAME", "aesthetic=./folder"]`` -> ``{"pickscore": "ORG/NAME", ...}``, names checked."""
    models = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value:
            raise ConfigError(f"--scorer-model: expected NAME=MODEL, got {item!r}")
        if name.strip() not in SCORERS:
            raise ConfigError(
                f"--scorer-model: unknown scorer {name.strip()!r}; choose from {', '.join(SCORERS)}"
            )
        models[name.strip()] = value.strip()
    return models
