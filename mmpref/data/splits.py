"""Run plumbing both modalities use: a config's train and eval sources, a held-out share of rows, and rows
read a batch at a time."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch

ROWS_PER_BATCH = 1000  # rows checked (and prompts extracted) at a time: memory stays flat in dataset size


def iter_rows(ds: datasets.Dataset) -> Iterator[dict[str, Any]]:
    """The rows of ``ds`` as dicts, read :data:`ROWS_PER_BATCH` at a time (never the whole dataset)."""
    for batch in ds.iter(batch_size=ROWS_PER_BATCH):
        names = list(batch)
        for values in zip(*batch.values()):
            yield dict(zip(names, values))


def config_sources(
    cfg: Any, train_dataset: Any = None, eval_dataset: Any = None
) -> tuple[tuple[Any, dict[str, Any]], tuple[Any, dict[str, Any]] | None]:
    """A training config's train and eval data, each as ``(source, open_rows options)``; the eval entry is
    None when the eval rows are a held-out share of the training rows (a float ``eval_split``) or there are
    none.

    ``train_dataset`` / ``eval_dataset``: rows given in Python (a ``datasets.Dataset`` or ``DatasetDict``, or
    a list of dicts) in place of the config's ``dataset`` / ``eval_dataset``. A string ``eval_split`` names a
    split of the eval data, or of the training data when no eval data is given; eval data without a split
    name is read as its ``train`` split (the one split of a file). ``dataset_revision`` applies to both,
    ``dataset_config`` only to ``dataset`` itself.
    """
    train = cfg.dataset if train_dataset is None else train_dataset
    options = {"config_name": cfg.dataset_config, "split": cfg.train_split, "revision": cfg.dataset_revision}
    named = isinstance(cfg.eval_split, str) and bool(cfg.eval_split)
    evaluation = eval_dataset if eval_dataset is not None else cfg.eval_dataset or None
    if evaluation is None and not named:
        return (train, options), None
    source = train if evaluation is None else evaluation
    same = isinstance(source, (str, os.PathLike)) and str(source) == str(cfg.dataset)
    eval_options = {"config_name": cfg.dataset_config if same else None,
                    "split": cfg.eval_split if named else "train", "revision": cfg.dataset_revision}  # fmt: skip
    return (train, options), (source, eval_options)


def epoch_order(size: int, seed: int, epoch: int, labels: torch.Tensor | None = None, batch_size: int = 1) -> list[int]:
    """The rows of one epoch in a seeded order.

    With ``labels`` (unpaired rows, True = desirable) every batch of ``batch_size`` holds as many desirable as
    undesirable rows (one more desirable for an odd size), as the RPO authors' loader does, so no batch has
    one side only; the epoch ends when the smaller side runs out (each epoch reshuffles both sides).
    """
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(size, generator=g)
    if labels is None or batch_size < 2:
        return order.tolist()
    good, bad = order[labels[order]], order[~labels[order]]
    per_good, per_bad = (batch_size + 1) // 2, batch_size // 2
    batches = min(len(good) // per_good, len(bad) // per_bad)
    return [int(i) for b in range(batches) for i in (*good[b * per_good : (b + 1) * per_good],
                                                      *bad[b * per_bad : (b + 1) * per_bad])]  # fmt: skip


def held_out_split(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, eval)`` row indices of ``n`` rows with ``share`` (at least one row) held out, drawn by ``seed``;
    the training rows keep their order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, int(n * share))
    return sorted(order[n_eval:]), order[:n_eval]


@dataclass
class Splits:
    """A run's training rows and its evaluation rows (None: no eval loss), in whatever form the stage that
    returned them gives (validated rows, then tokenized rows or cached image rows)."""

    train: Any
    eval: Any | None


def prepare_splits(train: Any, evaluation: Any | None, eval_share: float, seed: int,
                   prepare: Callable[[Any], Any]) -> Splits:  # fmt: skip
    """``prepare`` (validation: rows in, usable rows out) applied to the training source and to the eval source;
    without an eval source, ``eval_share`` (> 0) of the usable training rows is held out (:func:`held_out_split`).
    Whatever ``prepare`` returns must take ``len()`` and ``.subset(positions)`` for the held-out share."""
    train_rows = prepare(train)
    if evaluation is not None:
        return Splits(train_rows, prepare(evaluation))
    if eval_share:
        train_order, eval_order = held_out_split(len(train_rows), eval_share, seed)
        return Splits(train_rows.subset(train_order), train_rows.subset(eval_order))
    return Splits(train_rows, None)
