"""Style-alignment metrics over embeddings (docs/design.md §9): pure functions, no model in sight.

Every function takes CLIP-like embeddings as ``(n, d)`` tensors of any scale (each row is L2-normalised
inside), computes one value per generated image, and returns a :class:`MetricResult`: the mean of the
per-image values, a percentile-bootstrap confidence interval of that mean, ``n`` and the per-image values.

With ``ĝᵢ`` the normalised embedding of generated image ``i``:

- style score       ``sᵢ = cos(ĝᵢ, c)``, ``c = normalise(mean_j r̂ⱼ)`` the centroid of the style references;
- style accuracy    ``aᵢ = 1[argmax_k cos(ĝᵢ, t̂ₖ) = target]`` over candidate style prompts ``tₖ``;
- content score     ``cᵢ = 100 · max(cos(ĝᵢ, p̂ᵢ), 0)`` against the image's own prompt ``pᵢ`` (CLIPScore);
- win rate          ``wᵢ = 1[aᵢ > bᵢ] + ½ · 1[aᵢ = bᵢ]`` over paired per-prompt scores.

The bootstrap resamples the generated images (or pairs) only; the references and prompts are held fixed, so
the interval describes the uncertainty from the finite generated sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "MetricResult",
    "bootstrap_ci",
    "content_score",
    "style_accuracy",
    "style_centroid",
    "style_predictions",
    "style_score",
    "style_score_per_image",
    "win_rate",
]

DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class MetricResult:
    """A metric's point estimate with its bootstrap interval and the per-item values it averages."""

    name: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    per_item: list[float] = field(repr=False)
    confidence: float = 0.95

    def to_dict(self, per_item: bool = False) -> dict:
        out = {
            "value": self.value,
            "ci": [self.ci_low, self.ci_high],
            "confidence": self.confidence,
            "n": self.n,
        }
        if per_item:
            out["per_item"] = list(self.per_item)
        return out


def bootstrap_ci(
    values: torch.Tensor,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(values)``.

    Draws ``n_resamples`` samples of size ``n`` with replacement from ``values`` using a ``torch.Generator``
    seeded with ``seed`` (the global RNG is untouched), and returns the ``(1 ± confidence) / 2`` quantiles
    of the resampled means. ``n = 1`` (or ``n_resamples = 0``) gives the degenerate interval ``[v, v]``.
    """
    values = values.detach().double().flatten().cpu()
    n = values.numel()
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = values.mean().item()
    if n == 1 or n_resamples <= 0:
        return mean, mean
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_resamples, n), generator=gen)
    means = values[idx].mean(dim=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=means.dtype)).tolist()
    return low, high


def _result(
    name: str, per_item: torch.Tensor, n_resamples: int, confidence: float, seed: int
) -> MetricResult:
    per_item = per_item.detach().double().flatten().cpu()
    low, high = bootstrap_ci(per_item, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return MetricResult(
        name=name,
        value=per_item.mean().item(),
        ci_low=low,
        ci_high=high,
        n=per_item.numel(),
        per_item=per_item.tolist(),
        confidence=confidence,
    )


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
    return _result("style_score", per_image, n_resamples, confidence, seed)


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
    return _result("style_accuracy", correct, n_resamples, confidence, seed)


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
    cos = (F.normalize(gen, dim=-1) * F.normalize(prompts, dim=-1)).sum(dim=-1)
    return _result("content_score", 100.0 * cos.clamp(min=0.0), n_resamples, confidence, seed)


def win_rate(
    a_scores: torch.Tensor,
    b_scores: torch.Tensor,
    tie_tolerance: float = 0.0,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricResult:
    """Win rate of A over B on paired per-prompt scores, ties counting one half.

    ``W = (1/n) Σᵢ (1[aᵢ − bᵢ > τ] + ½ · 1[|aᵢ − bᵢ| ≤ τ])`` with ``τ = tie_tolerance``; the bootstrap
    resamples pairs. ``W = 0.5`` means no preference.
    """
    a = torch.as_tensor(a_scores).detach().double().flatten()
    b = torch.as_tensor(b_scores).detach().double().flatten()
    if a.numel() != b.numel():
        raise ValueError(f"win_rate needs paired scores, got {a.numel()} and {b.numel()}")
    if a.numel() == 0:
        raise ValueError("win_rate needs at least one pair")
    diff = a - b
    wins = (diff > tie_tolerance).double() + 0.5 * (diff.abs() <= tie_tolerance).double()
    return _result("win_rate", wins, n_resamples, confidence, seed)
