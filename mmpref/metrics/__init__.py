"""Evaluation metrics: style alignment of generated images (docs/design.md §9).

Pure functions over embeddings live in :mod:`mmpref.metrics.style`; :mod:`mmpref.metrics.clip_embedder`
turns image files and texts into embeddings (open_clip, cached); :mod:`mmpref.metrics.report` scores folders
and holds the ``style-score`` / ``compare-style`` CLI commands. Importing this package loads neither open_clip
nor any weights.
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
    add_style_commands,
    compare_style,
    evaluate_style,
)
from mmpref.metrics.style import (
    MetricResult,
    bootstrap_ci,
    content_score,
    style_accuracy,
    style_score,
    win_rate,
)

__all__ = [
    "BadImageError",
    "ClipEmbedder",
    "Embedder",
    "EmbedderError",
    "FeatureEmbedder",
    "MetricResult",
    "StyleInputError",
    "add_style_commands",
    "bootstrap_ci",
    "compare_style",
    "content_score",
    "embed_image_files",
    "evaluate_style",
    "list_images",
    "style_accuracy",
    "style_score",
    "win_rate",
]
