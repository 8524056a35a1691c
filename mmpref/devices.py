"""Where tensors and models go: the one reading of a ``device`` setting (``"auto"``, ``"cpu"``, ``"cuda:1"``, ...)."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """``"auto"``: cuda when available, else cpu; anything else as :class:`torch.device` reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
