"""Tensor checks, length normalisation, reward metrics and the result object shared by the losses.

The core checks tensors only (shapes, dtypes, finiteness, token counts, probabilities); the ranges of
scalar parameters (β > 0, ε ∈ [0, 0.5), τ > 0, α ∈ [0, 1]) are :meth:`mmpref.losses.Objective.problems`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmpref.losses.pairwise import LOSS_TYPES

LENGTH_NORMALISED = ("ipo", "simpo")  # compare per-token values ℓ/|y|
REFERENCE_FREE = ("simpo",)  # ℓ is the policy's own log-prob; its rewards are the per-token values


@dataclass
class PreferenceLossOutput:
    """What every loss returns.

    loss: scalar mean of ``per_pair`` (what you call ``backward`` on).
    per_pair: the loss per pair (DPO) or per chosen row (RPO), for logging or reweighting.
    metrics: detached scalar tensors keyed like TRL's (``rewards/chosen``, ...).
    """

    loss: Tensor
    per_pair: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def mean_or_zero(x: Tensor) -> Tensor:
    """Mean that stays a differentiable 0 on an empty tensor instead of NaN."""
    return x.mean() if x.numel() else x.sum() * 0.0


def check_tensor(name: str, t: Tensor, *, ndim: int, size: int | None = None, dim: int = 0) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim}-D tensor, got shape {tuple(t.shape)}")
    if size is not None and t.shape[dim] != size:
        raise ValueError(f"{name}: expected size {size} along dim {dim}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or inf")


def check_loss_args(
    loss_type: str,
    *,
    offsets: Tensor | None,
    label_probs: Tensor | None,
    shape: tuple[int, ...],
) -> None:
    """Checks the tensors one pairwise loss needs; ``shape`` is that of the h it will see."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: unknown {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if loss_type == "odpo":
        if offsets is None:
            raise ValueError("offsets: required for loss_type 'odpo' (Δ_r = α·log(s_w − s_l) per pair)")
        _check_same_shape("offsets", offsets, shape)
    if loss_type == "rdpo":
        if label_probs is None:
            raise ValueError("label_probs: required for loss_type 'rdpo' (p = σ((r_w − r_l)/τ_r) per pair)")
        _check_same_shape("label_probs", label_probs, shape)
        if ((label_probs < 0) | (label_probs > 1)).any():
            raise ValueError("label_probs: values must lie in [0, 1]")


def _check_same_shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    check_tensor(name, t, ndim=len(shape))
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def check_lengths(name: str, lengths: Tensor | None, size: int) -> None:
    if lengths is None:
        return
    if not isinstance(lengths, Tensor) or lengths.ndim != 1 or lengths.shape[0] != size:
        raise ValueError(f"{name}: expected a 1-D tensor of {size} token counts")
    if not (lengths > 0).all():
        raise ValueError(f"{name}: token counts must be > 0")


def tie_accuracy(margins: Tensor) -> Tensor:
    """Per margin: 1 when positive, 0.5 for a tie, 0 when negative (the one accuracy rule everywhere)."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


def per_token(loss_type: str, values: Tensor, lengths: Tensor | None) -> Tensor:
    """ℓ/|y| for the losses that compare per-token values (ipo, simpo) when token counts are given, else ℓ.

    IPO (Azar et al. 2023) and SimPO (Meng et al. 2024) average over the response's tokens; diffusion
    has no token counts and passes none.
    """
    return values / lengths if loss_type in LENGTH_NORMALISED and lengths is not None else values


def reward_metrics(
    beta: float, chosen: Tensor, rejected: Tensor, *, cross: bool = False
) -> dict[str, Tensor]:
    """rewards/* of TRL: β·v per side, margins β·(v_w − v_l) and accuracies (ties count 0.5).

    Pass the values the loss compares, v: SimPO's length-averaged log-probs, ℓ otherwise. Margins are
    over matched pairs (row i with row i), or with ``cross`` over every chosen × rejected pair (unpaired
    rows). A side with no samples has no rewards, and then there are no margins nor accuracies.
    """
    with torch.no_grad():
        c, r = chosen.detach(), rejected.detach()
        metrics = {}
        if c.numel():
            metrics["rewards/chosen"] = (beta * c).mean()
        if r.numel():
            metrics["rewards/rejected"] = (beta * r).mean()
        if c.numel() and r.numel():
            margins = beta * (c[:, None] - r[None, :] if cross else c - r)
            metrics["rewards/margins"] = margins.mean()
            metrics["rewards/accuracies"] = tie_accuracy(margins).mean()
        return metrics
