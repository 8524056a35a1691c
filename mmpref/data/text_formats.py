"""TRL's text preference formats: which one a dataset is in (:func:`detect_format`), and the prompt cut from
``chosen`` / ``rejected`` when it is implicit (:func:`extract_prompt`; docs/design.md §10).

Formats (TRL's), each standard (strings) or conversational (lists of ``{"role", "content"}``):

* paired, explicit prompt: ``prompt``, ``chosen``, ``rejected`` (+ optional ``score_chosen``, ``score_rejected``);
  in conversational rows ``chosen`` / ``rejected`` hold only the assistant turn(s);
* paired, implicit prompt: ``chosen`` and ``rejected`` are whole texts or conversations and the prompt is
  their common beginning, cut off as TRL's ``extract_prompt`` does (:func:`extract_prompt`); a string
  ``prompt`` beside conversational ``chosen`` / ``rejected`` is replaced the same way, as TRL's
  ``maybe_extract_prompt`` does;
* unpaired: ``prompt``, ``completion``, ``label`` (bool; KTO-style).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets

from mmpref.data.errors import DataError
from mmpref.data.sources import READER_VERSION
from mmpref.data.splits import ROWS_PER_BATCH

PAIRED_COLUMNS = ("prompt", "chosen", "rejected")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
SCORE_COLUMNS = ("score_chosen", "score_rejected")
ACCEPTED_FORMATS = (
    "paired (prompt, chosen, rejected, or just chosen and rejected with the prompt at their start; "
    "optional score_chosen, score_rejected) or unpaired (prompt, completion, label)"
)


def extract_prompt(chosen: str | list, rejected: str | list) -> tuple[str | list, str | list, str | list]:
    """``(prompt, chosen, rejected)`` with the prompt cut from the start of both, as TRL's ``extract_prompt``.

    The prompt is the longest common prefix: of characters for strings, of whole messages for
    conversations. When a string prefix ends in a space, the space goes to the responses. Written as TRL
    writes it (``trl.data_utils.extract_prompt``), edge cases included, so a dataset gives the same prompts
    in both: when one side starts with the whole other side, the last shared element still goes to the
    responses; when the first elements already differ, a space at the very end of ``chosen`` moves one
    character. Both sides must be non-empty.
    """
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # the space before the responses is theirs
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def is_conversation(feature: Any) -> bool:
    """Whether a column holds conversations (lists of message structs) by its feature type."""
    return isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(feature.feature, dict)


def needs_prompt_extraction(features: datasets.Features) -> bool:
    """Paired rows whose prompt is inside ``chosen`` and ``rejected``: no ``prompt`` column, or a string
    prompt beside conversations (TRL's ``maybe_extract_prompt``)."""
    if "prompt" not in features:
        return True
    return is_conversation(features["chosen"]) and not is_conversation(features["prompt"])


def _extracted(batch: dict[str, list]) -> dict[str, list]:
    """A batch of rows with their prompts cut out; rows it cannot split keep ``prompt`` None (a bad row)."""
    out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for chosen, rejected in zip(batch["chosen"], batch["rejected"]):
        kinds = {type(chosen), type(rejected)}
        if len(kinds) == 1 and kinds <= {str, list} and chosen and rejected:  # what extract_prompt takes
            parts = extract_prompt(chosen, rejected)
        else:
            parts = (None, chosen, rejected)
        for key, part in zip(out, parts):
            out[key].append(part)
    return out


def with_extracted_prompts(ds: datasets.Dataset, cache_dir: Path) -> datasets.Dataset:
    """``ds`` with ``prompt`` cut from ``chosen`` / ``rejected``: an Arrow file in ``cache_dir`` keyed by the
    rows' fingerprint (rows in memory stay in memory), written a batch at a time."""
    options: dict[str, Any] = {"keep_in_memory": True}
    if ds.cache_files:
        key = hashlib.sha256(READER_VERSION + ds._fingerprint.encode()).hexdigest()[:32]
        options = {"cache_file_name": str(cache_dir / f"implicit-prompt-{key}.arrow")}
    drop = ["prompt"] if "prompt" in ds.column_names else []
    return ds.map(_extracted, batched=True, batch_size=ROWS_PER_BATCH, remove_columns=drop,
                  desc="implicit prompts", **options)  # fmt: skip



def detect_format(columns: Iterable[str]) -> str:
    """Return ``"paired"`` or ``"unpaired"`` from the column names (paired wins if both fit).

    Paired rows need ``chosen`` and ``rejected``; without ``prompt`` the prompt is implicit in them.
    """
    present = set(columns)
    missing = {
        "paired": [c for c in PAIRED_COLUMNS[1:] if c not in present],
        "unpaired": [c for c in UNPAIRED_COLUMNS if c not in present],
    }
    for fmt, absent in missing.items():
        if not absent:
            return fmt
    raise DataError(
        f"missing columns: {', '.join(missing['paired'])} for paired data, "
        f"{', '.join(missing['unpaired'])} for unpaired data (found: {', '.join(sorted(present)) or 'none'}). "
        f"Accepted formats: {ACCEPTED_FORMATS}"
    )
