"""The reference model of a run, in one of three kinds, each with the same small surface.

The plan (:mod:`mmpref.training.plan`) picks the kind; a task's ``make_reference`` stage builds it:

* :class:`Precomputed` (text, ``precompute_ref: true``): the policy before its first update *is* the reference,
  so its log-probs of every row are computed once, before training, and read back from the batch; no second
  model is held.
* :class:`FrozenCopy`: a frozen, eval-mode copy of the weights as they are before training (full fine-tuning).
* :class:`AdaptersOff` (LoRA): the trained model itself with its adapters switched off for the call.

A causal LM's reference gives ``logps(model, batch)`` (summed response log-probs, (B, K)); a diffusion UNet's
gives ``predict(model, *args, **kwargs)`` (the UNet's prediction, called as the UNet is). ``model`` is the model
being trained, as the loop passes it (possibly wrapped by Accelerate); only :class:`AdaptersOff` reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from mmpref.adapters.causal_lm import response_logps
from mmpref.adapters.lm_head import copy_without_chunked_head

logger = logging.getLogger(__name__)


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside DDP / FSDP / compile wrappers (what carries the adapters)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` (unwrapped) with its LoRA adapters switched off inside the block: peft's ``PeftModel`` (text) or
    diffusers' peft integration (``unet.add_adapter``)."""
    model = unwrapped(model)
    if hasattr(model, "disable_adapter"):  # peft.PeftModel
        with model.disable_adapter():
            yield model
        return
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


class Precomputed:
    """Reference log-probs computed once before training and carried by each batch (``batch["ref_logps"]``).

    :meth:`build` computes them with the untrained policy and hands them to the splits; the step then reads them.
    """

    kind = "precomputed"

    @classmethod
    def build(cls, model: nn.Module, splits: list, compute: Callable[[nn.Module, object], Tensor]) -> Precomputed:
        """``compute(model, split)`` for every split (each split keeps its ``ref_logps``); ``model`` is the policy
        before training, put in eval mode for the pass and back in train mode after it."""
        model.eval()
        for split in splits:
            split.ref_logps = compute(model, split)
        model.train()
        return cls()

    def logps(self, model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 0) -> Tensor:
        return batch["ref_logps"]


class FrozenCopy:
    """A frozen, eval-mode copy of ``model`` as it is now (before training), on ``device`` in ``dtype``."""

    kind = "frozen_copy"

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.module = copy_without_chunked_head(model).requires_grad_(False).eval()
        if device is not None or dtype is not None:
            self.module.to(device, dtype)

    @torch.no_grad()
    def logps(self, model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 0) -> Tensor:
        return response_logps(self.module, batch, chunk_size=chunk_size)[0]

    @torch.no_grad()
    def predict(self, model: nn.Module, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextmanager
    def as_model(self, model: nn.Module) -> Iterator[nn.Module]:
        """The reference as a module, for what takes a whole model (a diffusers pipeline that samples)."""
        yield self.module


class AdaptersOff:
    """LoRA's reference: the trained model itself with its adapters switched off (:func:`adapters_off`)."""

    kind = "adapters_off"

    @torch.no_grad()
    def logps(self, model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 0) -> Tensor:
        with adapters_off(model):
            return response_logps(model, batch, chunk_size=chunk_size)[0]

    @torch.no_grad()
    def predict(self, model: nn.Module, *args, **kwargs):
        with adapters_off(model) as base:
            return base(*args, **kwargs)

    @contextmanager
    def as_model(self, model: nn.Module) -> Iterator[nn.Module]:
        with adapters_off(model) as base:
            yield base


Reference = Precomputed | FrozenCopy | AdaptersOff
