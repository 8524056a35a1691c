"""The statistics of every evaluation in mmpref: a mean with its bootstrap interval, and win rates.

One copy for all callers (style scores, image scorers, text rewards, ``mmpref eval``):

- bootstrap interval  the percentile bootstrap of a mean: ``B`` resamples of the ``n`` items with replacement,
  the ``(1 ∓ confidence)/2`` quantiles (linear interpolation) of the ``B`` resampled means;
- win outcome         ``wᵢ = 1[aᵢ − bᵢ > τ] + ½ · 1[|aᵢ − bᵢ| ≤ τ]`` (ties count one half; ``τ = 0``: exact ties,
  the accuracy rule of :func:`mmpref.losses.tie_accuracy` applied to ``aᵢ − bᵢ``);
- win rate            ``W = (1/n) Σᵢ wᵢ`` over paired per-prompt scores, its interval resampling the prompts.

With ``k`` samples per prompt (scores of shape ``(n, k)``, sample ``j`` of both sides sharing a seed), the item
of the bootstrap is the prompt: ``wᵢ`` is the mean outcome of its ``k`` pairs, so the interval reflects the
finite set of prompts, not only of samples. Resampling uses its own seeded ``torch.Generator``: the global RNG
is untouched and the same inputs give the same interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "DEFAULT_RESAMPLES",
    "MetricResult",
    "bootstrap_ci",
    "mean_with_ci",
    "win_outcomes",
    "win_rate",
]

DEFAULT_RESAMPLES = 1000


@dataclass(frozen=True)
class MetricResult:
    """A metric's point estimate with its bootstrap interval and the per-item values it averages."""

    name: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    per_item: list[float] = field(repr=False)
    confidence: float = 0.95

    def to_dict(self, per_item: bool = False) -> dict:
        out = {
            "value": self.value,
            "ci": [self.ci_low, self.ci_high],
            "confidence": self.confidence,
            "n": self.n,
        }
        if per_item:
            out["per_item"] = list(self.per_item)
        return out


def bootstrap_ci(
    values: torch.Tensor,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(values)``.

    Draws ``n_resamples`` samples of size ``n`` with replacement from ``values`` using a ``torch.Generator``
    seeded with ``seed`` (the global RNG is untouched), and returns the ``(1 ± confidence) / 2`` quantiles
    of the resampled means. ``n = 1`` (or ``n_resamples = 0``) gives the degenerate interval ``[v, v]``.
    """
    values = torch.as_tensor(values).detach().double().flatten().cpu()
    n = values.numel()
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = values.mean().item()
    if n == 1 or n_resamples <= 0:
        return mean, mean
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (n_resamples, n), generator=gen)
    means = values[idx].mean(dim=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=means.dtype)).tolist()
    return low, high


def mean_with_ci(
    name: str,
    values: torch.Tensor,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricResult:
    """``mean(values)`` with its :func:`bootstrap_ci`, as a :class:`MetricResult` named ``name``."""
    per_item = torch.as_tensor(values).detach().double().flatten().cpu()
    low, high = bootstrap_ci(per_item, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return MetricResult(
        name=name,
        value=per_item.mean().item(),
        ci_low=low,
        ci_high=high,
        n=per_item.numel(),
        per_item=per_item.tolist(),
        confidence=confidence,
    )


def win_outcomes(a_scores: torch.Tensor, b_scores: torch.Tensor, tie_tolerance: float = 0.0) -> torch.Tensor:
    """Per pair: ``1[aᵢ − bᵢ > τ] + ½ · 1[|aᵢ − bᵢ| ≤ τ]`` (1 a win of A, ½ a tie, 0 a loss), same shape as the inputs."""
    a = torch.as_tensor(a_scores).detach().double().cpu()
    b = torch.as_tensor(b_scores).detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"win_rate needs paired scores, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError("win_rate needs at least one pair")
    diff = a - b
    return (diff > tie_tolerance).double() + 0.5 * (diff.abs() <= tie_tolerance).double()


def win_rate(
    a_scores: torch.Tensor,
    b_scores: torch.Tensor,
    tie_tolerance: float = 0.0,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricResult:
    """Win rate of A over B on paired per-prompt scores, ties counting one half.

    ``W = (1/n) Σᵢ wᵢ`` with ``wᵢ`` of :func:`win_outcomes` (``τ = tie_tolerance``). Scores of shape ``(n,)``
    are one pair per prompt; ``(n, k)`` are ``k`` pairs per prompt, and ``wᵢ`` is then prompt ``i``'s mean
    outcome. The bootstrap resamples prompts. ``W = 0.5`` means no preference; identical A and B give
    ``W = 0.5`` with the interval ``[0.5, 0.5]``.
    """
    a, b = torch.as_tensor(a_scores), torch.as_tensor(b_scores)
    if a.dim() == 1 and b.dim() == 1 and a.numel() != b.numel():
        raise ValueError(f"win_rate needs paired scores, got {a.numel()} and {b.numel()}")
    outcomes = win_outcomes(a, b, tie_tolerance)
    per_prompt = outcomes.mean(dim=1) if outcomes.dim() == 2 else outcomes.flatten()
    return mean_with_ci("win_rate", per_prompt, n_resamples=n_resamples, confidence=confidence, seed=seed)
