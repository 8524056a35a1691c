"""Evaluation metrics: preference scorers and win rates (docs/evaluation.md), style alignment (docs/design.md §9).

:mod:`mmpref.metrics.stats` holds the statistics every evaluation uses (bootstrap intervals, win rates with
ties ½); :mod:`mmpref.metrics.scorers` the image preference scorers (PickScore, HPSv2, ImageReward, the LAION
aesthetic predictor, CLIP score) and :mod:`mmpref.metrics.evaluate` what ``mmpref eval images`` runs. Pure
functions over embeddings live in :mod:`mmpref.metrics.style`; :mod:`mmpref.metrics.clip_embedder` turns image
files and texts into embeddings (open_clip, cached); :mod:`mmpref.metrics.report` scores folders (what
``mmpref style-score`` and ``mmpref compare-style`` run). Importing this package loads neither open_clip nor
any weights.
"""

from mmpref.metrics.clip_embedder import (
    BadImageError,
    ClipEmbedder,
    Embedder,
    EmbedderError,
    FeatureEmbedder,
    embed_image_files,
    list_images,
)
from mmpref.metrics.report import (
    StyleInputError,
    compare_style,
    evaluate_style,
)
from mmpref.metrics.scorers import SCORERS, Scorer, load_scorer
from mmpref.metrics.stats import MetricResult, bootstrap_ci, mean_with_ci, win_rate
from mmpref.metrics.style import content_score, style_accuracy, style_score

__all__ = [
    "BadImageError",
    "ClipEmbedder",
    "Embedder",
    "EmbedderError",
    "FeatureEmbedder",
    "MetricResult",
    "SCORERS",
    "Scorer",
    "StyleInputError",
    "bootstrap_ci",
    "compare_style",
    "content_score",
    "embed_image_files",
    "evaluate_style",
    "list_images",
    "load_scorer",
    "mean_with_ci",
    "style_accuracy",
    "style_score",
    "win_rate",
]
