"""What a dataset that cannot be trained on raises (:class:`DataError`), and one rejected row (:class:`BadRow`)."""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """A dataset that cannot be trained on, with a message that says where and how to fix it."""


@dataclass(frozen=True)
class BadRow:
    """One rejected row: ``row`` is 0-based; ``reason`` joins every problem found in it."""

    row: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"

