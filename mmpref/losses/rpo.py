"""RPO: Relative Preference Optimization (Yin et al. 2024, arXiv 2402.10958)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpref.losses._common import (
    REFERENCE_FREE,
    PreferenceLossOutput,
    check_lengths,
    check_loss_args,
    check_tensor,
    mean_or_zero,
    per_token,
    reward_metrics,
)
from mmpref.losses.pairwise import pairwise_loss

RPO_MODES = ("paired", "unpaired", "diagonal")


def contrast_weights(chosen_embeddings: Tensor, rejected_embeddings: Tensor, temperature: float) -> Tensor:
    """w_ij = softmax_j(−d_ij/τ), d_ij = 1 − cos(e_i, e_j): each row sums to 1."""
    e_w = F.normalize(chosen_embeddings, dim=-1)
    e_l = F.normalize(rejected_embeddings, dim=-1)
    distance = 1 - e_w @ e_l.T
    return torch.softmax(-distance / temperature, dim=1)


def rpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    *,
    beta: float,
    mode: str = "paired",
    chosen_embeddings: Tensor | None = None,
    rejected_embeddings: Tensor | None = None,
    temperature: float = 0.5,
    diagonal_weight: float = 0.8,
    base_loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    offsets: Tensor | None = None,
    gamma: float = 0.0,
    label_probs: Tensor | None = None,
) -> PreferenceLossOutput:
    """Contrast every chosen sample i with every rejected sample j, weighted by prompt similarity.

    docs/design.md §6. With L_ij = ℓ_w,i − ℓ_l,j (B × B'):

    - ``paired`` / ``unpaired``: w_ij = softmax_j(−(1 − cos(e_i, e_j))/τ) and
      loss = mean_i mean_j f(w_ij · L_ij), the weight multiplying the logit inside the loss.
      ``paired`` needs B = B' (row i of both sides is one prompt's pair, the diagonal is
      the DPO pair); ``rejected_embeddings`` defaults to ``chosen_embeddings`` there.
      ``unpaired`` takes B ≠ B' and the embeddings of each side's own prompts.
    - ``diagonal``: no embeddings; loss = α·mean_i f(L_ii) + (1−α)·mean_{i≠j} f(L_ij),
      α = ``diagonal_weight`` (all weight on the diagonal when B = 1).

    f is −log σ(β·x) by default, which reproduces the paper; ``base_loss`` picks any loss of
    :func:`mmpref.losses.dpo_loss` instead, with ``offsets`` (odpo) and ``label_probs`` (rdpo)
    given per contrast as B × B' matrices. ``ipo`` / ``simpo`` divide ℓ by the lengths first.

    A side with no samples gives a zero loss that keeps a grad path. ``per_pair`` holds the
    loss per chosen row. ``metrics`` adds ``rpo/diagonal_weight`` (mean w_ii, paired mode); in
    ``unpaired`` mode the reward margins and accuracies are over every chosen × rejected pair.

    Only the tensors are checked here; the scalars are taken as :meth:`mmpref.losses.Objective.problems`
    passes them (β > 0, τ > 0, α ∈ [0, 1]).
    """
    if mode not in RPO_MODES:
        raise ValueError(f"mode: unknown {mode!r}; choose one of {', '.join(RPO_MODES)}")
    check_tensor("chosen_logratios", chosen_logratios, ndim=1)
    check_tensor("rejected_logratios", rejected_logratios, ndim=1)
    b, b2 = chosen_logratios.shape[0], rejected_logratios.shape[0]
    if mode != "unpaired" and b != b2:
        raise ValueError(
            f"rejected_logratios: mode {mode!r} needs as many rejected as chosen samples ({b}), got {b2}"
        )
    check_loss_args(base_loss, offsets=offsets, label_probs=label_probs, shape=(b, b2))
    check_lengths("chosen_lengths", chosen_lengths, b)
    check_lengths("rejected_lengths", rejected_lengths, b2)

    weights = None
    if mode != "diagonal":
        if chosen_embeddings is None:
            raise ValueError(
                f"chosen_embeddings: required in mode {mode!r} (one prompt embedding per chosen sample)"
            )
        if rejected_embeddings is None:
            if mode == "unpaired":
                raise ValueError("rejected_embeddings: required in mode 'unpaired'")
            rejected_embeddings = chosen_embeddings
        check_tensor("chosen_embeddings", chosen_embeddings, ndim=2, size=b)
        check_tensor("rejected_embeddings", rejected_embeddings, ndim=2, size=b2)
        if chosen_embeddings.shape[1] != rejected_embeddings.shape[1]:
            raise ValueError("rejected_embeddings: embedding width differs from chosen_embeddings")
        weights = contrast_weights(chosen_embeddings, rejected_embeddings, temperature)

    chosen = per_token(base_loss, chosen_logratios, chosen_lengths)
    rejected = per_token(base_loss, rejected_logratios, rejected_lengths)
    # the values the loss compares: SimPO's length-averaged log-probs, ℓ otherwise
    shown = (chosen, rejected) if base_loss in REFERENCE_FREE else (chosen_logratios, rejected_logratios)
    metrics = reward_metrics(beta, *shown, cross=mode == "unpaired")

    if b == 0 or b2 == 0:
        zero = chosen.sum() * 0.0 + rejected.sum() * 0.0
        return PreferenceLossOutput(loss=zero, per_pair=chosen * 0.0, metrics=metrics)

    contrast = chosen[:, None] - rejected[None, :]
    h = contrast if weights is None else weights * contrast
    per = pairwise_loss(
        h,
        beta=beta,
        loss_type=base_loss,
        label_smoothing=label_smoothing,
        offsets=offsets,
        gamma=gamma,
        label_probs=label_probs,
    )
    if mode == "diagonal" and b > 1:
        eye = torch.eye(b, dtype=torch.bool, device=per.device)
        off_diagonal = per.masked_fill(eye, 0.0).sum(1) / (b - 1)
        per_row = diagonal_weight * per.diagonal() + (1 - diagonal_weight) * off_diagonal
    elif mode == "diagonal":
        per_row = per.diagonal()
    else:
        per_row = per.mean(1)
    if weights is not None and mode == "paired":
        metrics["rpo/diagonal_weight"] = weights.detach().diagonal().mean()
    return PreferenceLossOutput(loss=mean_or_zero(per_row), per_pair=per_row, metrics=metrics)
