"""DPO and its pairwise relatives over matched (chosen, rejected) pairs."""

from __future__ import annotations

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


def dpo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    offsets: Tensor | None = None,
    gamma: float = 0.0,
    label_probs: Tensor | None = None,
) -> PreferenceLossOutput:
    """Pairwise preference loss on implicit log-ratios ℓ = log πθ(y|x) − log πref(y|x).

    With z = β·(ℓ_w − ℓ_l), per pair (docs/design.md §5, §8):

    ========  ====================================================  ==========================
    sigmoid   −log σ(z)                                             Rafailov et al. 2023
    robust    [−(1−ε)·log σ(z) + ε·log σ(−z)] / (1 − 2ε)            Chowdhury et al. 2024
    cdpo      −(1−ε)·log σ(z) − ε·log σ(−z)                         conservative DPO
    ipo       (ℓ_w/|y_w| − ℓ_l/|y_l| − 1/(2β))²                     Azar et al. 2023
    hinge     max(0, 1 − z)                                         SLiC (Zhao et al. 2023)
    odpo      −log σ(z − Δ_r), Δ_r given as ``offsets``             Amini et al. 2024
    simpo     −log σ(β·(ℓ_w/|y_w| − ℓ_l/|y_l|) − γ)                 Meng et al. 2024
    rdpo      −p·log σ(z) − (1−p)·log σ(−z), p as ``label_probs``   Gallego 2024
    ========  ====================================================  ==========================

    ε is ``label_smoothing``. ``ipo`` and ``simpo`` divide ℓ by ``chosen_lengths`` /
    ``rejected_lengths`` (response token counts) when given; diffusion passes none.
    ``simpo`` is reference-free: pass the policy's summed log-probs as the "log-ratios".

    Returns a :class:`PreferenceLossOutput`; ``metrics`` holds rewards/chosen (β·ℓ_w),
    rewards/rejected (β·ℓ_l), rewards/margins and rewards/accuracies (ties count 0.5); for ``simpo``
    the rewards are β times the length-averaged log-probs the loss compares.

    Only the tensors are checked here; the scalars are taken as :meth:`mmpref.losses.Objective.problems`
    passes them (β > 0, ε ∈ [0, 0.5) and used by robust / cdpo only).
    """
    check_tensor("chosen_logratios", chosen_logratios, ndim=1)
    n = chosen_logratios.shape[0]
    check_tensor("rejected_logratios", rejected_logratios, ndim=1, size=n)
    check_loss_args(loss_type, offsets=offsets, label_probs=label_probs, shape=(n,))
    check_lengths("chosen_lengths", chosen_lengths, n)
    check_lengths("rejected_lengths", rejected_lengths, n)

    chosen = per_token(loss_type, chosen_logratios, chosen_lengths)
    rejected = per_token(loss_type, rejected_logratios, rejected_lengths)
    per_pair = pairwise_loss(
        chosen - rejected,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        offsets=offsets,
        gamma=gamma,
        label_probs=label_probs,
    )
    # SimPO's rewards are its length-averaged log-probs (as TRL's CPO/SimPO trainer logs them)
    shown = (chosen, rejected) if loss_type in REFERENCE_FREE else (chosen_logratios, rejected_logratios)
    return PreferenceLossOutput(
        loss=mean_or_zero(per_pair), per_pair=per_pair, metrics=reward_metrics(beta, *shown)
    )
