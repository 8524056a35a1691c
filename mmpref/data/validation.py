"""Text rows checked before training: every bad row found and reported or skipped, and the validated
dataset a trainer gets (:func:`prepare_text_dataset`; docs/design.md §10).

Bad rows are reported with their 0-based row number before any training starts; they are either an error or
skipped with a logged count, never dropped silently. Rows are checked a batch at a time from the Arrow file,
so memory does not grow with the dataset.

What counts as valid and as visible text: :mod:`mmpref.data.text_checks`.
"""

from __future__ import annotations

import logging
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets

from mmpref.data.errors import BadRow, DataError
from mmpref.data.sources import open_rows
from mmpref.data.splits import ROWS_PER_BATCH, iter_rows
from mmpref.data.text_checks import text_problem, visible
from mmpref.data.text_formats import (
    SCORE_COLUMNS,
    detect_format,
    needs_prompt_extraction,
    with_extracted_prompts,
)

logger = logging.getLogger(__name__)

MAX_LISTED = 20


@dataclass
class TextDataset:
    """A validated dataset, its format, and how many bad rows were skipped to get it.

    ``row_numbers[i]`` is the 0-based row of the source that ``dataset[i]`` came from (skipped rows leave
    gaps), so messages during training name rows as the source numbers them. ``cache_dir``: where caches
    derived from these rows belong (:mod:`mmpref.data.sources`). ``implicit_prompt``: the prompts were cut from
    ``chosen`` and ``rejected`` (:func:`mmpref.data.text_formats.extract_prompt`).
    """

    dataset: datasets.Dataset
    format: str
    skipped: int
    source: Path | str
    row_numbers: Sequence[int]
    cache_dir: Path
    implicit_prompt: bool = False
    bad: list[BadRow] = field(default_factory=list)  # the rows skipped (on_bad_rows: skip), with their reasons

    def __len__(self) -> int:
        return self.dataset.num_rows

    @property
    def labels(self):
        """(rows,) bool tensor of unpaired rows' ``label`` (True = desirable); None for pairs."""
        return label_tensor(self.dataset) if self.format == "unpaired" else None

    def subset(self, positions: Sequence[int]) -> TextDataset:
        """The rows at ``positions`` (an index over the same Arrow file), keeping their source row numbers."""
        return replace(self, dataset=self.dataset.select(positions, keep_in_memory=True),
                       row_numbers=array("q", (self.row_numbers[i] for i in positions)))  # fmt: skip


def label_tensor(ds: datasets.Dataset):
    """(rows,) bool tensor of the ``label`` column of unpaired rows (True = desirable), read through Arrow."""
    import torch

    table = ds.select_columns(["label"]).with_format("arrow")[:]
    return torch.from_numpy(table["label"].to_numpy(zero_copy_only=False).astype(bool))


def validate_rows(ds: datasets.Dataset, fmt: str, *, implicit_prompt: bool = False, needs_scores: bool = False,
                  chosen_scores_higher: bool = False) -> list[BadRow]:  # fmt: skip
    """Every bad row of ``ds`` (one entry per row, all its problems joined by "; ").

    One pass, :data:`ROWS_PER_BATCH` rows at a time: fast enough for 100k rows, flat in memory, and
    it runs before training so a bad row costs seconds, not a crashed run. ``implicit_prompt``: the
    prompts were cut from ``chosen`` / ``rejected``, so a missing prompt is reported as such.
    ``needs_scores``: the loss (odpo, rdpo) reads the score columns of every row; ``chosen_scores_higher``:
    ODPO's offset log(s_w − s_l) also needs the chosen score above the rejected one.
    """
    if fmt not in ("paired", "unpaired"):
        raise ValueError(f"fmt must be 'paired' or 'unpaired', got {fmt!r}")
    text_cols = ("prompt", "chosen", "rejected") if fmt == "paired" else ("prompt", "completion")
    scores = [c for c in SCORE_COLUMNS if fmt == "paired" and c in ds.column_names]
    scores = [c for c in scores if _has_values(ds, c)]  # an all-null column counts as absent
    if (needs_scores or chosen_scores_higher) and len(scores) < 2:
        raise DataError(f"the loss needs the columns score_chosen and score_rejected in every row "
                        f"(found: {', '.join(ds.column_names)}); `mmpref score` adds them with a reward model")  # fmt: skip
    wanted = [*text_cols, *([] if fmt == "paired" else ["label"]), *scores]
    bad = []
    for i, row in enumerate(iter_rows(ds.select_columns(wanted))):
        problems = row_problems(row, fmt, scores, implicit_prompt=implicit_prompt,
                                chosen_scores_higher=chosen_scores_higher)  # fmt: skip
        if problems:
            bad.append(BadRow(i, "; ".join(problems)))
    return bad

def _has_values(ds: datasets.Dataset, column: str) -> bool:
    """Whether any row holds a value in ``column``: Arrow null counts, no Python objects."""
    arrow = ds.select_columns([column]).with_format("arrow")
    return any(b.column(0).null_count < b.num_rows for b in arrow.iter(batch_size=ROWS_PER_BATCH * 100))


def row_problems(
    row: dict[str, Any], fmt: str, score_columns: Sequence[str] = (), *, implicit_prompt: bool = False,
    chosen_scores_higher: bool = False,
) -> list[str]:  # fmt: skip
    """Every problem of one row (empty list: a good row); ``score_columns`` are checked when given.
    ``chosen_scores_higher``: ODPO's offset log(s_w − s_l) needs ``score_chosen`` > ``score_rejected``.

    Total over any input: whatever the values, it returns reasons and never raises. With
    ``implicit_prompt`` the prompt was cut from ``chosen`` / ``rejected``: an empty one means they share
    no beginning, reported once the two themselves are fine.
    """
    text_cols = ("prompt", "chosen", "rejected") if fmt == "paired" else ("prompt", "completion")
    checked = [c for c in text_cols if not (implicit_prompt and c == "prompt")]
    reasons = [r for c in checked if (r := text_problem(c, row.get(c)))]
    if implicit_prompt and not reasons and text_problem("prompt", row.get("prompt")):
        reasons.append("no prompt: 'chosen' and 'rejected' do not start with a common prompt")
    if fmt == "paired":
        if not reasons and _normalise(row["chosen"]) == _normalise(row["rejected"]):
            reasons.append("'chosen' and 'rejected' are identical")
    else:
        label = row.get("label")
        if label is None:
            reasons.append("missing 'label'")
        elif not (isinstance(label, bool) or (isinstance(label, int) and label in (0, 1))):
            reasons.append(f"'label' must be a bool (or 0/1), got {label!r}")
    reasons += [r for c in score_columns if (r := score_problem(c, row.get(c)))]
    if chosen_scores_higher and not reasons and not row["score_chosen"] > row["score_rejected"]:
        reasons.append(f"'score_chosen' ({row['score_chosen']}) must exceed 'score_rejected' "
                       f"({row['score_rejected']}): ODPO's offset log(s_w − s_l) is undefined otherwise")  # fmt: skip
    return reasons


def score_problem(column: str, value: Any) -> str | None:
    """What is wrong with one score cell (a finite number), or None."""
    if value is None:
        return f"missing {column!r} (other rows have it)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{column!r} must be a number, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):  # ints are finite (and may exceed floats)
        return f"{column!r} is {value}"
    return None

def _normalise(value: str | list[dict[str, str]]) -> Any:
    if isinstance(value, str):
        return visible(value)
    return [(m["role"], visible(m["content"])) for m in value]


def bad_rows_error(source: Path | str, bad: list[BadRow], total: int) -> DataError:
    """One message listing the first bad rows, their count, and how to go on without them."""
    listed = "\n".join(f"  {b}" for b in bad[:MAX_LISTED])
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return DataError(
        f"{source}: {len(bad)} of {total} rows are bad (0-based row numbers):\n{listed}{more}\n"
        "Fix them, or set `on_bad_rows: skip` to train without them."
    )


def prepare_text_dataset(
    source: Any,
    *,
    on_bad_rows: str = "error",
    config_name: str | None = None,
    split: str = "train",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    needs_scores: bool = False,
    chosen_scores_higher: bool = False,
) -> TextDataset:
    """Load, detect the format, extract implicit prompts and validate: the one call a trainer makes before step 0.

    ``source``: any source :func:`open_rows` reads, or an in-memory ``datasets.Dataset`` / list of dicts;
    ``config_name``, ``split``, ``revision``, ``cache_dir``: see :func:`open_rows`. ``on_bad_rows="error"``
    stops with a message listing the bad rows; ``"skip"`` drops them and logs how many, so nothing
    disappears without a trace. ``needs_scores``, ``chosen_scores_higher``: see :func:`validate_rows`.
    """
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    rows = open_rows(source, config_name=config_name, split=split, revision=revision, cache_dir=cache_dir)
    ds, name = rows.dataset, rows.name
    try:
        fmt = detect_format(ds.column_names)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from exc
    if ds.num_rows == 0:
        raise DataError(f"{name}: no rows")
    implicit = fmt == "paired" and needs_prompt_extraction(ds.features)
    if implicit:
        ds = with_extracted_prompts(ds, rows.cache_dir)
    try:
        bad = validate_rows(ds, fmt, implicit_prompt=implicit, needs_scores=needs_scores,
                            chosen_scores_higher=chosen_scores_higher)  # fmt: skip
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from exc
    if bad and on_bad_rows == "error":
        raise bad_rows_error(name, bad, ds.num_rows)
    row_numbers: Sequence[int] = range(ds.num_rows)
    if bad:
        drop = {b.row for b in bad}
        row_numbers = array("q", (i for i in range(ds.num_rows) if i not in drop))
        ds = ds.select(row_numbers, keep_in_memory=True)  # an index over the Arrow file, no cache file
        logger.warning(
            "%s: skipped %d of %d bad rows (on_bad_rows=skip); first: %s",
            name,
            len(bad),
            len(bad) + ds.num_rows,
            "; ".join(str(b) for b in bad[:3]),
        )
        if ds.num_rows == 0:
            raise DataError(f"{name}: every row is bad, nothing left to train on; first: {bad[0]}")
    if fmt == "unpaired" and ds.features["label"] != datasets.Value("bool"):
        ds = ds.cast_column("label", datasets.Value("bool"))  # 0/1 ints were accepted above
    return TextDataset(dataset=ds, format=fmt, skipped=len(bad), source=name, row_numbers=row_numbers,
                       cache_dir=rows.cache_dir, implicit_prompt=implicit, bad=bad)  # fmt: skip

