"""Per-pair preference losses, as functions of the log-ratio difference.

Every loss here takes ``h = ℓ_w − ℓ_l`` (the chosen minus the rejected implicit log-ratio,
already length-normalised where the loss asks for it) and returns the loss for each element,
with the same shape as ``h``. ``h`` may be a vector (DPO: one entry per pair) or a matrix
(RPO: one entry per chosen × rejected contrast), which is why the core is written this way.

The formulas are those of docs/design.md §5 and §8; ``z = β·h`` throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "robust", "cdpo", "ipo", "hinge", "odpo", "simpo", "rdpo")


def sigmoid_loss(h: Tensor, beta: float) -> Tensor:
    """DPO: −log σ(β·h). Rafailov et al. 2023, arXiv 2305.18290."""
    return -F.logsigmoid(beta * h)


def robust_loss(h: Tensor, beta: float, eps: float) -> Tensor:
    """Robust DPO: [−(1−ε)·log σ(z) + ε·log σ(−z)] / (1 − 2ε).

    Unbiased estimate of the clean-label DPO loss when labels flip with rate ε.
    Chowdhury et al. 2024, arXiv 2403.00409.
    """
    z = beta * h
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def cdpo_loss(h: Tensor, beta: float, eps: float) -> Tensor:
    """Conservative DPO (label smoothing ε): −(1−ε)·log σ(z) − ε·log σ(−z)."""
    z = beta * h
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def ipo_loss(h: Tensor, beta: float) -> Tensor:
    """IPO: (h − 1/(2β))², h on length-averaged log-ratios. Azar et al. 2023, arXiv 2310.12036."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: Tensor, beta: float) -> Tensor:
    """SLiC-style hinge: max(0, 1 − β·h). Zhao et al. 2023, arXiv 2305.10425."""
    return torch.relu(1 - beta * h)


def odpo_loss(h: Tensor, beta: float, offsets: Tensor) -> Tensor:
    """DPO with an offset: −log σ(β·h − Δ_r), Δ_r = α·log(s_w − s_l). Amini et al. 2024, arXiv 2402.10571."""
    return -F.logsigmoid(beta * h - offsets)


def simpo_loss(h: Tensor, beta: float, gamma: float) -> Tensor:
    """SimPO: −log σ(β·h − γ), h on length-averaged policy log-probs (no reference).

    Meng et al. 2024, arXiv 2405.14734.
    """
    return -F.logsigmoid(beta * h - gamma)


def rdpo_loss(h: Tensor, beta: float, label_probs: Tensor) -> Tensor:
    """Reward-aware (soft-label) DPO: −p·log σ(z) − (1−p)·log σ(−z).

    p = σ((r_w − r_l)/τ_r) is the probability, from an external reward model, that the
    synthetic label is right (refined DPO, Gallego 2024, arXiv 2402.08005).
    """
    z = beta * h
    return -label_probs * F.logsigmoid(z) - (1 - label_probs) * F.logsigmoid(-z)


def pairwise_loss(
    h: Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    offsets: Tensor | None = None,
    gamma: float = 0.0,
    label_probs: Tensor | None = None,
) -> Tensor:
    """Dispatch to the loss named ``loss_type``; arguments must already be validated."""
    if loss_type == "sigmoid":
        return sigmoid_loss(h, beta)
    if loss_type == "robust":
        return robust_loss(h, beta, label_smoothing)
    if loss_type == "cdpo":
        return cdpo_loss(h, beta, label_smoothing)
    if loss_type == "ipo":
        return ipo_loss(h, beta)
    if loss_type == "hinge":
        return hinge_loss(h, beta)
    if loss_type == "odpo":
        return odpo_loss(h, beta, offsets)
    if loss_type == "simpo":
        return simpo_loss(h, beta, gamma)
    if loss_type == "rdpo":
        return rdpo_loss(h, beta, label_probs)
    raise ValueError(f"loss_type: unknown {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
