"""The modality-free loss core: it only ever sees per-sample implicit log-ratios ℓ (docs/design.md §1).

:class:`Objective` is the configured loss (what it needs, what it refuses, its value on a batch of
:class:`LogRatios`); the functions below it are the losses themselves.
"""

from mmpref.losses._common import PreferenceLossOutput, tie_accuracy
from mmpref.losses.dpo import dpo_loss
from mmpref.losses.objective import LogRatios, Objective
from mmpref.losses.pairwise import LOSS_TYPES, pairwise_loss
from mmpref.losses.rpo import RPO_MODES, contrast_weights, rpo_loss

__all__ = [
    "LOSS_TYPES",
    "RPO_MODES",
    "LogRatios",
    "Objective",
    "PreferenceLossOutput",
    "contrast_weights",
    "dpo_loss",
    "pairwise_loss",
    "rpo_loss",
    "tie_accuracy",
]
