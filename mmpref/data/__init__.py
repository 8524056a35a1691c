"""Datasets: hub ids, files, folders or rows in memory in; validated rows and cached prompt embeddings out (docs/design.md §10).

Modules by job: :mod:`~mmpref.data.sources` (opening every source, cache folders, the rows' identity),
:mod:`~mmpref.data.text_formats` (TRL's formats, implicit prompts), :mod:`~mmpref.data.text_checks` (one text
cell: valid Unicode, visible), :mod:`~mmpref.data.validation` (text rows checked, :class:`TextDataset`),
:mod:`~mmpref.data.splits` (train / eval sources, held-out rows, rows a batch at a time),
:mod:`~mmpref.data.embeddings` (prompt embeddings), :mod:`~mmpref.data.errors` (:class:`DataError`,
:class:`BadRow`), :mod:`~mmpref.data.images` (image pairs), :mod:`~mmpref.data.image_stream` (a streamed image
split), :mod:`~mmpref.data.image_inputs` (a pair's pixels and CLIP embeddings), :mod:`~mmpref.data.row_cache`
(per-row tensors), :mod:`~mmpref.data.image_task` (a small drawn image task).
"""

from mmpref.data.embeddings import prompt_embeddings, prompt_text
from mmpref.data.errors import BadRow, DataError
from mmpref.data.sources import load_rows
from mmpref.data.text_formats import PAIRED_COLUMNS, UNPAIRED_COLUMNS, detect_format
from mmpref.data.validation import TextDataset, prepare_text_dataset, validate_rows

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
