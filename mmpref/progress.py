"""Progress bars of the long phases (tokenizing, caches, reference log-probs, training) and quiet mode.

Bars are tqdm's, shown on the local main process only, and hidden when ``TQDM_DISABLE`` is set (tqdm's own
switch, read here at each bar so that setting it later still counts; ``mmpref --quiet`` sets it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

_NOT_SET = ("", "0", "false", "no")


def bars_enabled(accelerator: Any = None) -> bool:
    """Whether to show a bar: not quiet, and on the local main process (``accelerator``'s, or the launcher's
    ``LOCAL_RANK`` when there is no accelerator at hand)."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in _NOT_SET:
        return False
    if accelerator is not None:
        return accelerator.is_local_main_process
    return os.environ.get("LOCAL_RANK", "0") == "0"


def progress(iterable: Iterable | None = None, *, desc: str, accelerator: Any = None, disable: bool = False,
             **kwargs: Any) -> tqdm:  # fmt: skip
    """A described tqdm bar, off when quiet or off the local main process (:func:`bars_enabled`)."""
    off = disable or not bars_enabled(accelerator)
    return tqdm(iterable, desc=desc, disable=off, dynamic_ncols=True, **kwargs)


def _library_switches() -> list[tuple[Any, Any, Any]]:
    """(is enabled, disable, enable) of the progress bars of each Hugging Face library mmpref runs."""
    import datasets
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub
    import transformers.utils.logging as transformers_logging

    return [
        (transformers_logging.is_progress_bar_enabled, transformers_logging.disable_progress_bar,
         transformers_logging.enable_progress_bar),
        (diffusers_logging.is_progress_bar_enabled, diffusers_logging.disable_progress_bar,
         diffusers_logging.enable_progress_bar),
        (datasets.is_progress_bar_enabled, datasets.disable_progress_bar, datasets.enable_progress_bar),
        (lambda: not hub.are_progress_bars_disabled(), hub.disable_progress_bars, hub.enable_progress_bars),
    ]  # fmt: skip


@contextmanager
def quiet_bars(quiet: bool = True) -> Iterator[None]:
    """Within: no progress bars, mmpref's or the Hugging Face libraries' (``TQDM_DISABLE=1`` also reaches
    tqdm in child processes). Everything is restored on exit, so in-process callers (tests) are unaffected."""
    if not quiet:
        yield
        return
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    switched = []
    for enabled, disable, enable in _library_switches():
        if enabled():
            disable()
            switched.append(enable)
    try:
        yield
    finally:
        for enable in switched:
            enable()
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before
