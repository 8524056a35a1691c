"""Datasets: hub ids, files, folders or rows in memory in; validated rows and cached prompt embeddings out (docs/design.md §10)."""

from mmpref.data.text import (
    PAIRED_COLUMNS,
    UNPAIRED_COLUMNS,
    BadRow,
    DataError,
    TextDataset,
    detect_format,
    load_rows,
    prepare_text_dataset,
    prompt_embeddings,
    prompt_text,
    validate_rows,
)

__all__ = [
    "PAIRED_COLUMNS",
    "UNPAIRED_COLUMNS",
    "BadRow",
    "DataError",
    "TextDataset",
    "detect_format",
    "load_rows",
    "prepare_text_dataset",
    "prompt_embeddings",
    "prompt_text",
    "validate_rows",
]
