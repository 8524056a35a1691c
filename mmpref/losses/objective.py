"""The configured objective: one object that knows the loss in use, what it needs and what it refuses.

:class:`Objective` is built once from the ``loss`` and ``rpo`` config sections and answers every
question the rest of mmpref asks about the loss: which inputs the rows must carry
(``needs_scores``, ``needs_embeddings``, ``needs_policy_logps``, ...), whether a modality or a data
format can train with it (:meth:`~Objective.supports`, :meth:`~Objective.accepts`), whether its
parameters are in range (:meth:`~Objective.problems`), the loss of a batch of :class:`LogRatios`
(calling it) and the evaluation metrics (:meth:`~Objective.compared`, :meth:`~Objective.eval_metrics`).
Modality-free like the rest of the core: it sees tensors only (docs/design.md §1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from mmpref.losses._common import (
    LENGTH_NORMALISED,
    REFERENCE_FREE,
    PreferenceLossOutput,
    per_token,
    reward_metrics,
)
from mmpref.losses.dpo import dpo_loss
from mmpref.losses.pairwise import LOSS_TYPES
from mmpref.losses.rpo import RPO_MODES, rpo_loss

ODPO_MIN_SCORE_GAP = 1e-3  # RPO + odpo: log(s_w,i − s_l,j) of a cross pair with s_w,i ≤ s_l,j is clamped here
SCORED = ("odpo", "rdpo")  # read a reward-model score per answer
SMOOTHED = ("robust", "cdpo")  # use label_smoothing ε
# loss.type -> (name, authors, arXiv id): the papers the loss functions cite (model cards)
LOSS_PAPERS = {
    "sigmoid": ("DPO", "Rafailov et al. 2023", "2305.18290"),
    "robust": ("robust DPO", "Chowdhury et al. 2024", "2403.00409"),
    "cdpo": ("conservative DPO (DPO with label smoothing)", "Mitchell 2023", None),
    "ipo": ("IPO", "Azar et al. 2023", "2310.12036"),
    "hinge": ("SLiC-style hinge loss", "Zhao et al. 2023", "2305.10425"),
    "odpo": ("ODPO (DPO with an offset)", "Amini et al. 2024", "2402.10571"),
    "simpo": ("SimPO", "Meng et al. 2024", "2405.14734"),
    "rdpo": ("reward-aware (soft-label) DPO", "Gallego 2024", "2402.08005"),
    "rpo": ("RPO (Relative Preference Optimization)", "Yin et al. 2024", "2402.10958"),
}
# Diffusion's ℓ = −½(‖ε−εθ‖² − ‖ε−εref‖²) is a log-ratio with no log-likelihood of its own: nothing for a
# reference-free loss (SimPO, on the policy's log-probs) or the SFT term (an NLL) to work on.
MODALITY_LOSSES = {"text": LOSS_TYPES, "diffusion": tuple(t for t in LOSS_TYPES if t not in REFERENCE_FREE)}
DATA_FORMATS = ("paired", "unpaired")
_UNPAIRED_WAY = "unpaired rows train with loss.type=rpo and rpo.mode=unpaired"
_LOSS_KEYS = ("type", "beta", "label_smoothing", "gamma", "offset_alpha", "reward_temperature", "sft_weight")
_EVAL_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


@dataclass
class LogRatios:
    """What an adapter returns for a batch of B rows.

    logratios: (B, K) implicit log-ratios ℓ; K = 2 for pairs (chosen, rejected), 1 for unpaired rows.
    lengths: (B, K) response token counts (LMs) or None (diffusion).
    policy_logps: (B, K) policy log-probs, for the optional SFT term and SimPO.
    embeddings: (B, D) one per prompt, or (B, K, D) one per sample, for RPO.
    labels: (B,) bool for unpaired rows: True = desirable.
    scores: (B, 2) reward-model scores (chosen, rejected) for odpo / rdpo.
    row_index: (B,) dataset row of each batch row, to name rows in errors.
    metrics: extra detached scalars the adapter wants logged (e.g. diffusion's raw squared errors);
        merged into the loss metrics, never gathered across processes.
    """

    logratios: Tensor
    row_index: Tensor
    lengths: Tensor | None = None
    policy_logps: Tensor | None = None
    embeddings: Tensor | None = None
    labels: Tensor | None = None
    scores: Tensor | None = None
    metrics: dict[str, Tensor] | None = None


@dataclass(frozen=True)
class _Half:
    """The chosen or the rejected half of a batch: one sample per row (paired rows), or the desirable or
    the undesirable rows (unpaired); each field as in :class:`LogRatios` without the K axis."""

    logratios: Tensor
    lengths: Tensor | None = None
    policy_logps: Tensor | None = None
    embeddings: Tensor | None = None
    scores: Tensor | None = None  # the half's own score, paired rows only

    def select(self, mask: Tensor) -> _Half:
        """The rows of ``mask``."""
        return _Half(
            **{f.name: None if (t := getattr(self, f.name)) is None else t[mask] for f in fields(self)}
        )


def _halves(rows: LogRatios) -> tuple[_Half, _Half]:
    """The chosen and the rejected half: columns 0 and 1 of paired rows, or the rows labelled True and False."""

    def column(t: Tensor | None, j: int) -> Tensor | None:
        return None if t is None else t[:, j]

    emb = rows.embeddings
    if rows.logratios.shape[1] == 2:
        per_sample = emb is not None and emb.ndim == 3
        chosen, rejected = (
            _Half(logratios=column(rows.logratios, j), lengths=column(rows.lengths, j),
                  policy_logps=column(rows.policy_logps, j), embeddings=column(emb, j) if per_sample else emb,
                  scores=column(rows.scores, j))
            for j in (0, 1)
        )  # fmt: skip
        return chosen, rejected
    if rows.labels is None:
        raise ValueError("labels: unpaired rows need one label per row (True = desirable)")
    half = _Half(logratios=column(rows.logratios, 0), lengths=column(rows.lengths, 0),
                 policy_logps=column(rows.policy_logps, 0), embeddings=emb)  # fmt: skip
    good = rows.labels.bool()
    return half.select(good), half.select(~good)


def _data_format(logratios: Tensor) -> str:
    if not isinstance(logratios, Tensor) or logratios.ndim != 2 or logratios.shape[1] not in (1, 2):
        shape = tuple(logratios.shape) if isinstance(logratios, Tensor) else type(logratios).__name__
        raise ValueError(f"logratios: expected (B, 2) paired or (B, 1) unpaired values, got {shape}")
    return "paired" if logratios.shape[1] == 2 else "unpaired"


@dataclass(frozen=True)
class Objective:
    """The preference loss of a run: ``loss.type`` (any of :data:`LOSS_TYPES`, or ``"rpo"``) with its
    parameters, and under RPO the ``rpo`` section's mode and base loss. Keywords and defaults are those of
    the config sections (``rpo_*`` for ``rpo.mode``, ``rpo.temperature``, ``rpo.base_loss``).

    Calling it on a batch of :class:`LogRatios` gives the loss: :func:`mmpref.losses.dpo_loss` on the
    pairs, or :func:`mmpref.losses.rpo_loss` on every chosen × rejected contrast, plus the optional SFT
    term ``sft_weight`` · NLL(chosen) (token-weighted, as TRL's "sft" loss). odpo takes its offsets
    Δ_r = α·log(s_w − s_l) and rdpo its label probabilities p = σ((s_w − s_l)/τ_r) from ``scores``.
    """

    type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    offset_alpha: float = 1.0
    reward_temperature: float = 1.0
    sft_weight: float = 0.0
    rpo_mode: str = "paired"
    rpo_temperature: float = 0.5
    diagonal_weight: float = 0.8
    rpo_base_loss: str = "sigmoid"
    global_batch: bool = False

    @classmethod
    def from_config(cls, loss: Any, rpo: Any = None) -> Objective:
        """From the ``loss`` and ``rpo`` config sections (read by attribute; ``rpo`` None: its defaults)."""
        values = {key: getattr(loss, key) for key in _LOSS_KEYS}
        if rpo is not None:
            values.update(rpo_mode=rpo.mode, rpo_temperature=rpo.temperature, diagonal_weight=rpo.diagonal_weight,
                          rpo_base_loss=rpo.base_loss, global_batch=rpo.global_batch)  # fmt: skip
        return cls(**values)

    # -- what the loss is --------------------------------------------------------------------------------
    @property
    def is_rpo(self) -> bool:
        """RPO: every chosen sample contrasted with every rejected one (Yin et al. 2024)."""
        return self.type == "rpo"

    @property
    def base(self) -> str:
        """The pairwise loss in use: ``loss.type``, or under RPO the ``rpo.base_loss`` on its contrast matrix."""
        return self.rpo_base_loss if self.is_rpo else self.type

    @property
    def type_key(self) -> str:
        """The config key that names :attr:`base`, for messages."""
        return "rpo.base_loss" if self.is_rpo else "loss.type"

    @property
    def reference_free(self) -> bool:
        """SimPO: ℓ is the policy's own log-prob; no reference model."""
        return self.base in REFERENCE_FREE

    @property
    def length_normalised(self) -> bool:
        """ipo and simpo compare per-token values ℓ/|y|."""
        return self.base in LENGTH_NORMALISED

    # -- what the rows must carry ------------------------------------------------------------------------
    @property
    def needs_scores(self) -> bool:
        """odpo and rdpo read a reward-model score per answer (``LogRatios.scores``)."""
        return self.base in SCORED

    @property
    def chosen_scores_higher(self) -> bool:
        """ODPO's per-pair offset log(s_w − s_l) needs s_w > s_l in every row. Under RPO a cross pair's gap
        may be ≤ 0 whatever the rows hold: those are clamped at :data:`ODPO_MIN_SCORE_GAP` instead."""
        return self.base == "odpo" and not self.is_rpo

    @property
    def needs_embeddings(self) -> bool:
        """RPO's paired and unpaired modes weight each contrast by prompt similarity (``LogRatios.embeddings``)."""
        return self.is_rpo and self.rpo_mode != "diagonal"

    @property
    def needs_policy_logps(self) -> bool:
        """SimPO and the SFT term read the policy's log-probs (``LogRatios.policy_logps``)."""
        return self.reference_free or self.sft_weight > 0

    def loss_scale(self, num_processes: int) -> int:
        """What the loop multiplies the loss by before backward: RPO over the global batch computes the
        global loss on every process with gradients into the local rows only, and DDP averages."""
        return num_processes if self.is_rpo and self.global_batch else 1

    # -- what it refuses ---------------------------------------------------------------------------------
    def supports(self, modality: str) -> str | None:
        """None when a model of ``modality`` ("text" or "diffusion") can train with this loss, else why not."""
        if modality not in MODALITY_LOSSES:
            raise ValueError(f"modality: unknown {modality!r}; choose one of {', '.join(MODALITY_LOSSES)}")
        if self.base not in MODALITY_LOSSES[modality]:
            return (f"{self.type_key}: {self.base} needs the policy's own log-probs, which a diffusion UNet does "
                    "not have (its ℓ is a difference of denoising errors); use one of "
                    f"{', '.join(MODALITY_LOSSES[modality])}")  # fmt: skip
        if modality == "diffusion" and self.sft_weight:
            return ("loss.sft_weight: the SFT term is a log-likelihood, which a diffusion UNet does not have; "
                    "set it to 0 for diffusion")  # fmt: skip
        return None

    def accepts(self, data_format: str) -> str | None:
        """None when rows of ``data_format`` can train with this loss, else why not.

        "paired" (prompt, chosen, rejected) rows train with every loss and every RPO mode (``unpaired`` mode
        pools the chosen and the rejected answers: the same loss as ``paired``, margins over all B × B
        pairs). "unpaired" (prompt, completion, label) rows train with ``loss.type=rpo`` and
        ``rpo.mode=unpaired`` only, and not with odpo / rdpo, whose scores come per pair.
        """
        if data_format not in DATA_FORMATS:
            raise ValueError(f"data_format: unknown {data_format!r}; choose one of {', '.join(DATA_FORMATS)}")
        if data_format == "paired":
            return None
        if not self.is_rpo:
            return f"loss.type: {self.type} needs paired rows (prompt, chosen, rejected); {_UNPAIRED_WAY}"
        if self.rpo_mode != "unpaired":
            return f"rpo.mode: {self.rpo_mode} needs paired rows (prompt, chosen, rejected); {_UNPAIRED_WAY}"
        if self.needs_scores:
            return (f"rpo.base_loss: {self.base} needs paired rows with scores (score_chosen, score_rejected); "
                    f"unpaired rows have none")  # fmt: skip
        return None

    def problems(self) -> list[str]:
        """Every out-of-range or inconsistent loss parameter, each message naming its config key."""
        found = []
        choices = (("loss.type", self.type, (*LOSS_TYPES, "rpo")), ("rpo.mode", self.rpo_mode, RPO_MODES),
                   ("rpo.base_loss", self.rpo_base_loss, LOSS_TYPES))  # fmt: skip
        for key, value, allowed in choices:
            if value not in allowed:
                found.append(f"{key}: must be one of {', '.join(allowed)}, got {value!r}")
        ranges = (
            ("loss.beta", self.beta, lambda v: v > 0, "> 0"),
            ("rpo.temperature", self.rpo_temperature, lambda v: v > 0, "> 0"),
            ("loss.reward_temperature", self.reward_temperature, lambda v: v > 0, "> 0"),
            ("loss.sft_weight", self.sft_weight, lambda v: v >= 0, ">= 0"),
            ("loss.gamma", self.gamma, lambda v: v >= 0, ">= 0"),
            ("loss.offset_alpha", self.offset_alpha, lambda v: True, "a number"),
            ("loss.label_smoothing", self.label_smoothing, lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
            ("rpo.diagonal_weight", self.diagonal_weight, lambda v: 0 <= v <= 1, "in [0, 1]"),
        )
        for key, value, ok, wanted in ranges:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                found.append(f"{key}: must be a number, got {value!r}")
            elif not ok(value):  # NaN fails every comparison
                found.append(f"{key}: must be {wanted}, got {value!r}")
            elif not math.isfinite(value):
                found.append(f"{key}: must be finite, got {value!r}")
        if self.label_smoothing and self.base in LOSS_TYPES and self.base not in SMOOTHED:
            found.append(f"loss.label_smoothing: only used when {self.type_key} is one of {', '.join(SMOOTHED)}, "
                         f"not {self.base}; set it to 0")  # fmt: skip
        if self.global_batch and not self.is_rpo:  # the loop scales the loss for RPO's gathered matrix only
            found.append("rpo.global_batch: only for loss.type=rpo (its contrast matrix spans the processes)")
        return found

    # -- the loss ----------------------------------------------------------------------------------------
    def __call__(self, rows: LogRatios) -> PreferenceLossOutput:
        """The loss on a batch of rows (already gathered across processes under ``rpo.global_batch``)."""
        refusal = self.accepts(_data_format(rows.logratios))
        if refusal:
            raise ValueError(refusal)
        if self.needs_policy_logps and rows.policy_logps is None:
            raise ValueError(self._no_policy_logps())
        chosen, rejected = _halves(rows)
        if self.reference_free:  # the policy's own log-probs
            chosen = replace(chosen, logratios=chosen.policy_logps)
            rejected = replace(rejected, logratios=rejected.policy_logps)
        kwargs = {"beta": self.beta, "label_smoothing": self.label_smoothing, "gamma": self.gamma,
                  "chosen_lengths": chosen.lengths, "rejected_lengths": rejected.lengths,
                  **self._score_terms(chosen, rejected)}  # fmt: skip
        if self.is_rpo:
            out = rpo_loss(chosen.logratios, rejected.logratios, mode=self.rpo_mode,
                           chosen_embeddings=chosen.embeddings, rejected_embeddings=rejected.embeddings,
                           temperature=self.rpo_temperature, diagonal_weight=self.diagonal_weight,
                           base_loss=self.base, **kwargs)  # fmt: skip
        else:
            out = dpo_loss(chosen.logratios, rejected.logratios, loss_type=self.base, **kwargs)

        if rows.metrics:
            out.metrics.update(rows.metrics)
        logps, lengths = chosen.policy_logps, chosen.lengths
        if self.sft_weight and logps is not None and logps.numel():
            # token-weighted, as TRL's "sft" loss: the mean NLL over every chosen token of the batch
            nll = -(logps.sum() / lengths.sum()) if lengths is not None else -logps.mean()
            out.metrics["sft/nll"] = nll.detach()
            out.loss = out.loss + self.sft_weight * nll
        return out

    def _no_policy_logps(self) -> str:
        key, value = (
            (self.type_key, self.base) if self.reference_free else ("loss.sft_weight", self.sft_weight)
        )
        return f"{key}: {value} needs the policy's log-probs, and the rows carry no policy_logps"

    def _score_terms(self, chosen: _Half, rejected: _Half) -> dict[str, Tensor]:
        """odpo's ``offsets`` α·log(s_w − s_l) or rdpo's ``label_probs`` σ((s_w − s_l)/τ_r): per pair, or
        under RPO per contrast (B × B'), where a cross pair with s_w,i ≤ s_l,j has its ODPO gap clamped."""
        if not self.needs_scores:
            return {}
        if chosen.scores is None:
            raise ValueError(
                f"{self.type_key}: {self.base} needs score_chosen / score_rejected columns in paired rows"
            )
        if self.is_rpo:
            gap = chosen.scores[:, None] - rejected.scores[None, :]
        else:
            gap = chosen.scores - rejected.scores
        if self.base == "odpo":  # per pair the data guarantee s_w > s_l (chosen_scores_higher)
            gap = gap.clamp_min(ODPO_MIN_SCORE_GAP) if self.is_rpo else gap
            return {"offsets": self.offset_alpha * gap.log()}
        return {"label_probs": torch.sigmoid(gap / self.reward_temperature)}

    # -- evaluation --------------------------------------------------------------------------------------
    def compared(self, rows: LogRatios) -> Tensor:
        """(B, K): the values the loss compares, which the reward metrics show: SimPO's length-averaged
        policy log-probs log πθ(y|x)/|y|, ℓ otherwise (IPO's too: its rewards are on ℓ, as TRL logs them)."""
        if not self.reference_free:
            return rows.logratios
        if rows.policy_logps is None:
            raise ValueError(self._no_policy_logps())
        return per_token(self.base, rows.policy_logps, rows.lengths)

    def eval_metrics(self, compared: Tensor, labels: Tensor | None) -> dict[str, float]:
        """eval/rewards/{accuracies, margins, chosen, rejected} over a whole eval set of :meth:`compared`
        values (B, K): per pair, or for unpaired rows (``labels``) over every desirable × undesirable pair.
        A side with no rows gives NaN where it takes part."""
        if labels is None:
            chosen, rejected = compared[:, 0], compared[:, 1]
        else:
            good = labels.bool()
            chosen, rejected = compared[good, 0], compared[~good, 0]
        metrics = reward_metrics(self.beta, chosen, rejected, cross=labels is not None)
        return {f"eval/{k}": metrics[k].item() if k in metrics else math.nan for k in _EVAL_KEYS}
