"""Style-alignment metrics over embeddings (docs/design.md §9): pure functions, no model in sight.

Every function takes CLIP-like embeddings as ``(n, d)`` tensors of any scale (each row is L2-normalised
inside), computes one value per generated image, and returns a :class:`MetricResult`: the mean of the
per-image values, a percentile-bootstrap confidence interval of that mean, ``n`` and the per-image values.

With ``ĝᵢ`` the normalised embedding of generated image ``i``:

- style score       ``sᵢ = cos(ĝᵢ, c)``, ``c = normalise(mean_j r̂ⱼ)`` the centroid of the style references;
- style accuracy    ``aᵢ = 1[argmax_k cos(ĝᵢ, t̂ₖ) = target]`` over candidate style prompts ``tₖ``;
- content score     ``cᵢ = 100 · max(cos(ĝᵢ, p̂ᵢ), 0)`` against the image's own prompt ``pᵢ`` (CLIPScore);
- win rate          ``wᵢ = 1[aᵢ > bᵢ] + ½ · 1[aᵢ = bᵢ]`` over paired per-prompt scores.

:class:`MetricResult`, :func:`bootstrap_ci` and :func:`win_rate` live in :mod:`mmpref.metrics.stats` (the one
copy every evaluation uses) and are re-exported here. The bootstrap resamples the generated images (or pairs)
only; the references and prompts are held fixed, so the interval describes the uncertainty from the finite
generated sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmpref.metrics.stats import DEFAULT_RESAMPLES, MetricResult, bootstrap_ci, mean_with_ci, win_rate

__all__ = [
    "MetricResult",
    "bootstrap_ci",
    "clip_score_per_image",
    "content_score",
    "style_accuracy",
    "style_centroid",
    "style_predictions",
    "style_score",
    "style_score_per_image",
    "win_rate",
]

CLIPSCORE_WEIGHT = 100.0  # torchmetrics' CLIPScore; Hessel et al. (2021) use 2.5

def _as_matrix(emb: torch.Tensor, what: str) -> torch.Tensor:
    emb = torch.as_tensor(emb).detach().float()
    if emb.dim() == 1:
        emb = emb.unsqueeze(0)
    if emb.dim() != 2 or emb.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty (n, d) tensor, got shape {tuple(emb.shape)}")
    return emb


def _check_dims(a: torch.Tensor, b: torch.Tensor, what_a: str, what_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{what_a} (d={a.shape[1]}) and {what_b} (d={b.shape[1]}) differ in dimension")


def style_centroid(style_ref_emb: torch.Tensor) -> torch.Tensor:
    """``c = normalise(mean_j r̂ⱼ)``: unit centroid of the normalised reference embeddings, shape ``(d,)``."""
    refs = F.normalize(_as_matrix(style_ref_emb, "style_ref_emb"), dim=-1)
    return F.normalize(refs.mean(dim=0), dim=-1)


def style_score_per_image(gen_image_emb: torch.Tensor, style_ref_emb: torch.Tensor) -> torch.Tensor:
    """``sᵢ = cos(ĝᵢ, c)`` for each generated image, shape ``(n,)``; see :func:`style_score`."""
    gen = _as_matrix(gen_image_emb, "gen_image_emb")
    refs = _as_matrix(style_ref_emb, "style_ref_emb")
    _check_dims(gen, refs, "gen_image_emb", "style_ref_emb")
    return F.normalize(gen, dim=-1) @ style_centroid(refs)


def style_score(
    gen_image_emb: torch.Tensor,
    style_ref_emb: torch.Tensor,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricResult:
    """Style score: mean cosine similarity of each generated image to the style references' centroid.

    ``S = (1/n) Σᵢ cos(ĝᵢ, c)``, ``c = normalise((1/m) Σⱼ r̂ⱼ)``, where ``ĝᵢ``, ``r̂ⱼ`` are the L2-normalised
    embeddings of the ``n`` generated and ``m`` reference images. ``S ∈ [-1, 1]``; it is invariant to the
    scale of either embedding set. With generated = references, ``S = ‖(1/m) Σⱼ r̂ⱼ‖`` (1 for identical
    references).
    """
    per_image = style_score_per_image(gen_image_emb, style_ref_emb)
    return mean_with_ci("style_score", per_image, n_resamples, confidence, seed)


def style_predictions(gen_image_emb: torch.Tensor, style_text_emb: torch.Tensor) -> torch.Tensor:
    """Zero-shot style index per image: ``argmax_k cos(ĝᵢ, t̂ₖ)``, shape ``(n,)`` (ties: lowest ``k``)."""
    gen = _as_matrix(gen_image_emb, "gen_image_emb")
    texts = _as_matrix(style_text_emb, "style_text_emb")
    _check_dims(gen, texts, "gen_image_emb", "style_text_emb")
    return (F.normalize(gen, dim=-1) @ F.normalize(texts, dim=-1).T).argmax(dim=-1)


def style_accuracy(
    gen_image_emb: torch.Tensor,
    style_text_emb: torch.Tensor,
    target_index: int,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricResult:
    """Style accuracy: share of images that CLIP zero-shot classifies as the target style.

    ``A = (1/n) Σᵢ 1[argmax_k cos(ĝᵢ, t̂ₖ) = target_index]`` with ``tₖ`` the text embeddings of the ``K``
    candidate style prompts (rows of ``style_text_emb``). Chance level is ``1/K``.
    """
    k = _as_matrix(style_text_emb, "style_text_emb").shape[0]
    if not 0 <= target_index < k:
        raise ValueError(f"target_index {target_index} is out of range for {k} candidate styles")
    correct = (style_predictions(gen_image_emb, style_text_emb) == target_index).double()
    return mean_with_ci("style_accuracy", correct, n_resamples, confidence, seed)


def clip_score_per_image(
    image_emb: torch.Tensor, text_emb: torch.Tensor, weight: float = CLIPSCORE_WEIGHT
) -> torch.Tensor:
    """CLIPScore of each (image, text) row pair: ``w · max(cos(îᵢ, t̂ᵢ), 0)``, ``w = 100``, shape ``(n,)``.

    Hessel et al. 2021 (``jmhessel/clipscore``, ``clipscore.py:get_clip_score``) define it with ``w = 2.5``
    and ViT-B/32; ``w = 100`` is torchmetrics' ``CLIPScore`` (``functional/multimodal/clip_score.py``), the
    convention of most diffusion papers' tables.
    """
    cos = (F.normalize(image_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(dim=-1)
    return weight * cos.clamp(min=0.0)


def content_score(
    gen_image_emb: torch.Tensor,
    prompt_text_emb: torch.Tensor,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricResult:
    """Content score (CLIPScore): ``C = (1/n) Σᵢ 100 · max(cos(ĝᵢ, p̂ᵢ), 0)``.

    Row ``i`` of ``prompt_text_emb`` is the text embedding of image ``i``'s own prompt. The scale follows
    torchmetrics' ``CLIPScore`` (100·cos, clamped at 0; Hessel et al. 2021 use 2.5·cos instead), so style
    gains can be checked against content loss.
    """
    gen = _as_matrix(gen_image_emb, "gen_image_emb")
    prompts = _as_matrix(prompt_text_emb, "prompt_text_emb")
    _check_dims(gen, prompts, "gen_image_emb", "prompt_text_emb")
    if gen.shape[0] != prompts.shape[0]:
        raise ValueError(
            f"{gen.shape[0]} images but {prompts.shape[0]} prompt embeddings: need one per image"
        )
    return mean_with_ci("content_score", clip_score_per_image(gen, prompts), n_resamples, confidence, seed)
