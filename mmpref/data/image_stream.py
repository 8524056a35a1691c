"""The streamed image reader (``streaming: true``): :class:`ImageStream` reads an image split as it arrives,
reshuffled each epoch and sharded across processes, checks every row with the same checks as
:mod:`mmpref.data.images` (caption, label, scores, then both images read and decoded) and yields the good ones
as decoded :class:`~mmpref.data.images.ImagePair` objects, raising on or skipping the bad ones."""

from __future__ import annotations

import copy
from pathlib import Path

import datasets
import torch

from mmpref.data.errors import DataError
from mmpref.data.images import (
    IMAGE_COLUMNS,
    IMAGE_SCORE_COLUMNS,
    BadImageRow,
    ImagePair,
    caption_label_problems,
    read_pair_images,
)
from mmpref.data.validation import score_problem


class ImageStream(torch.utils.data.IterableDataset):
    """A streamed image split (``streaming: true``): rows checked as they arrive, yielded as decoded pairs.

    Each epoch reshuffles the stream (``datasets``' shard shuffle plus a ``buffer``-row buffer, seeded by
    ``seed`` and the epoch) and each of ``world`` processes reads its own shards
    (``split_dataset_by_node``). A stream has no row numbers of its own: ``ImagePair.row`` counts the rows
    this process read in this epoch, and messages name the caption too. A bad row raises
    :class:`BadImageRow` (``on_bad_rows: error``) or goes to ``on_bad(exc)`` and is left out (``skip``).
    """

    def __init__(self, ds: datasets.IterableDataset, *, source: str, base: Path, confine_to: Path | None,
                 seed: int, buffer: int, rank: int, world: int, on_bad_rows: str, on_bad=None):  # fmt: skip
        missing = [c for c in IMAGE_COLUMNS if ds.column_names is not None and c not in ds.column_names]
        if missing:
            raise DataError(f"{source}: missing columns {', '.join(missing)} (found: {', '.join(ds.column_names)}); "
                            "image preference data needs caption, jpg_0, jpg_1 and label_0")  # fmt: skip
        for column in ("jpg_0", "jpg_1"):
            if ds.features is not None and isinstance(ds.features.get(column), datasets.Image):
                ds = ds.cast_column(column, datasets.Image(decode=False))
        self.ds, self.source, self.base, self.confine_to = ds, source, base, confine_to
        self.seed, self.buffer, self.rank, self.world = seed, buffer, rank, world
        self.on_bad_rows, self.on_bad = on_bad_rows, on_bad
        self.epoch = 0
        self.has_scores = ds.column_names is not None and all(c in ds.column_names for c in IMAGE_SCORE_COLUMNS)

    def for_epoch(self, epoch: int) -> ImageStream:
        out = copy.copy(self)
        out.epoch = epoch
        return out

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node

        ds = self.ds.shuffle(seed=self.seed, buffer_size=self.buffer)
        ds.set_epoch(self.epoch)
        if self.world > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
        for row, rec in enumerate(ds):
            label = rec.get("label_0")
            reasons = caption_label_problems(rec.get("caption"), label)
            scores = None
            if self.has_scores and not reasons:
                raw = [rec.get(c) for c in IMAGE_SCORE_COLUMNS]
                reasons += [r for c, v in zip(IMAGE_SCORE_COLUMNS, raw) if (r := score_problem(c, v))]
                scores = None if reasons or label == 0.5 else ((raw[0], raw[1]) if label == 1 else (raw[1], raw[0]))
            if not reasons and label == 0.5:
                continue  # a tie: no preference to learn
            images = []
            if not reasons:
                _, _, images = read_pair_images(rec["jpg_0"], rec["jpg_1"], self.base, self.confine_to, reasons)
            if reasons:
                exc = BadImageRow(self.source, row, f"caption {str(rec.get('caption'))[:60]!r}: " + "; ".join(reasons))
                if self.on_bad_rows == "error":
                    raise exc
                if self.on_bad is not None:
                    self.on_bad(exc)
                continue
            order = (0, 1) if label == 1 else (1, 0)
            yield ImagePair(row, rec["caption"], images[order[0]], images[order[1]], scores)
