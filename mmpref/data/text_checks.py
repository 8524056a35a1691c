"""One text cell checked: valid Unicode, something visible in it, chat messages well formed.

Unicode: any valid text is accepted (emoji, right-to-left scripts, zero-width joiners inside words).
Two things are not: a lone surrogate (``"\\ud800"`` in JSON; it is not a character and cannot be
encoded as UTF-8, so no tokenizer can read it) and a text with nothing visible in it (only spaces,
zero-width or other format/control characters), which counts as empty. ``chosen`` and ``rejected``
that differ only in invisible characters or in Unicode normalisation (NFC) count as identical.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Characters that render as nothing: C0/C1 controls (tab, newline and CR aside), soft hyphen, Mongolian
# vowel separator, zero-width space/non-joiner/joiner, direction marks, embeddings and isolates, word
# joiner, invisible operators, BOM. Emoji tag sequences (flags) and other format characters are kept.
INVISIBLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]"
)


def lone_surrogate_problem(value: Any) -> str | None:
    """Where a string (or a chat message's content) holds a lone surrogate, which is not valid text."""
    texts = [value] if isinstance(value, str) else []
    if isinstance(value, list):
        texts = [m.get("content") for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    for text in texts:
        if found := LONE_SURROGATE.search(text):
            return (
                f"holds a lone surrogate U+{ord(found.group()):04X} at character {found.start()}, which is "
                "not valid Unicode text; fix the source's encoding (write a surrogate pair as one character)"
            )
    return None


def visible(text: str) -> str:
    """``text`` in NFC, without :data:`INVISIBLE` characters and without whitespace at the ends.

    A text whose visible form is empty counts as empty; two texts with the same visible form are the
    same text. Regular expressions and ``str`` methods only: fast enough for every row of a big dataset.
    """
    return unicodedata.normalize("NFC", INVISIBLE.sub("", text)).strip()


def text_problem(name: str, value: Any) -> str | None:
    """What is wrong with the text cell ``name`` (a string, or a list of chat messages), or None."""
    if value is None:
        return f"missing {name!r}"
    if isinstance(value, str):
        if (problem := lone_surrogate_problem(value)) is not None:
            return f"{name!r} {problem}"
        return None if visible(value) else f"empty {name!r}"
    if isinstance(value, list):
        if not value:
            return f"empty {name!r}"
        for k, msg in enumerate(value):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                return f"{name!r} message {k} needs a string 'role'"
            if not isinstance(msg.get("content"), str):
                return f"{name!r} message {k} needs a string 'content'"
        if (problem := lone_surrogate_problem(value)) is not None:
            return f"{name!r} {problem}"
        if not any(visible(m["content"]) for m in value):
            return f"empty {name!r}"
        return None
    return f"{name!r} must be a string or a list of chat messages, got {type(value).__name__}"

