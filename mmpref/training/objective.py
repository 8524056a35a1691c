"""From per-row adapter outputs to the configured loss of the core (modality-free)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from mmpref.losses import PreferenceLossOutput, dpo_loss, rpo_loss
from mmpref.training.config import LossConfig, RPOConfig, base_loss

ODPO_MIN_SCORE_GAP = 1e-3  # RPO + odpo: log(s_w,i − s_l,j) of a cross pair with s_w,i ≤ s_l,j is clamped here


@dataclass
class Rows:
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


def gather_rows(rows: Rows, accelerator) -> Rows:
    """Concatenate every process's rows; the local slice keeps its autograd graph.

    Each process then computes the same global loss, but gradients flow only into its own
    rows, so the caller scales the loss by the number of processes before backward: DDP's
    gradient averaging then gives exactly the gradient of the global loss.
    """
    if accelerator.num_processes == 1:
        return rows
    gathered = {}
    for f in fields(rows):
        value = getattr(rows, f.name)
        if not isinstance(value, Tensor):  # None, or the local metrics dict
            gathered[f.name] = value
            continue
        parts = [torch.empty_like(value) for _ in range(accelerator.num_processes)]
        torch.distributed.all_gather(parts, value.detach().contiguous())
        parts[accelerator.process_index] = value
        gathered[f.name] = torch.cat(parts)
    return replace(rows, **gathered)


@dataclass(frozen=True)
class Side:
    """The chosen or the rejected side of a batch: one sample per row (of the paired rows), or the
    desirable or undesirable rows (unpaired); each field as in :class:`Rows` without the K axis."""

    logratios: Tensor
    lengths: Tensor | None = None
    policy_logps: Tensor | None = None
    embeddings: Tensor | None = None
    scores: Tensor | None = None  # the side's own score, paired rows only

    def select(self, mask: Tensor) -> Side:
        """The rows of ``mask``."""
        return Side(**{f.name: None if (t := getattr(self, f.name)) is None else t[mask] for f in fields(self)})


def _split(rows: Rows) -> tuple[Side, Side]:
    """The chosen and the rejected side."""

    def column(t: Tensor | None, j: int) -> Tensor | None:
        return None if t is None else t[:, j]

    emb = rows.embeddings
    if rows.logratios.shape[1] == 2:
        per_sample = emb is not None and emb.ndim == 3
        chosen, rejected = (
            Side(logratios=column(rows.logratios, j), lengths=column(rows.lengths, j),
                 policy_logps=column(rows.policy_logps, j), embeddings=column(emb, j) if per_sample else emb,
                 scores=column(rows.scores, j))
            for j in (0, 1)
        )  # fmt: skip
        return chosen, rejected
    if rows.labels is None:
        raise ValueError("unpaired rows need labels")
    side = Side(logratios=column(rows.logratios, 0), lengths=column(rows.lengths, 0),
                policy_logps=column(rows.policy_logps, 0), embeddings=emb)  # fmt: skip
    good = rows.labels.bool()
    return side.select(good), side.select(~good)


def preference_loss(loss_cfg: LossConfig, rpo_cfg: RPOConfig, rows: Rows) -> PreferenceLossOutput:
    """The configured loss on a batch of rows (already gathered across processes if asked)."""
    paired = rows.logratios.shape[1] == 2
    chosen, rejected = _split(rows)
    base = base_loss(loss_cfg, rpo_cfg)
    if base == "simpo":  # reference-free: the policy's own log-probs
        chosen = replace(chosen, logratios=chosen.policy_logps)
        rejected = replace(rejected, logratios=rejected.policy_logps)
    kwargs = {"beta": loss_cfg.beta, "label_smoothing": loss_cfg.label_smoothing, "gamma": loss_cfg.gamma,
              "chosen_lengths": chosen.lengths, "rejected_lengths": rejected.lengths}  # fmt: skip
    if base in ("odpo", "rdpo"):
        if chosen.scores is None:
            raise ValueError(f"loss {base!r} needs score_chosen / score_rejected columns in paired rows")
        # RPO contrasts every chosen with every rejected sample: one score gap per contrast
        if loss_cfg.type == "rpo":
            gap = chosen.scores[:, None] - rejected.scores[None, :]
        else:
            gap = chosen.scores - rejected.scores
        if base == "odpo":  # per pair the data guarantee s_w > s_l; RPO's cross pairs need the clamp
            gap = gap.clamp_min(ODPO_MIN_SCORE_GAP) if loss_cfg.type == "rpo" else gap
            kwargs["offsets"] = loss_cfg.offset_alpha * gap.log()
        else:
            kwargs["label_probs"] = torch.sigmoid(gap / loss_cfg.reward_temperature)

    if loss_cfg.type == "rpo":
        if rpo_cfg.mode == "diagonal" and not paired:
            raise ValueError("rpo.mode 'diagonal' needs paired rows (prompt, chosen, rejected)")
        out = rpo_loss(chosen.logratios, rejected.logratios, mode=rpo_cfg.mode,
                       chosen_embeddings=chosen.embeddings, rejected_embeddings=rejected.embeddings,
                       temperature=rpo_cfg.temperature, diagonal_weight=rpo_cfg.diagonal_weight,
                       base_loss=base, **kwargs)  # fmt: skip
    else:
        if not paired:
            raise ValueError(f"loss.type {loss_cfg.type!r} needs paired rows; unpaired data trains with "
                             "loss.type=rpo and rpo.mode=unpaired")  # fmt: skip
        out = dpo_loss(chosen.logratios, rejected.logratios, loss_type=base, **kwargs)

    if rows.metrics:
        out.metrics.update(rows.metrics)
    logps, lengths = chosen.policy_logps, chosen.lengths
    if loss_cfg.sft_weight and logps is not None and logps.numel():
        # token-weighted, as TRL's "sft" loss: the mean NLL over every chosen token of the batch
        nll = -(logps.sum() / lengths.sum()) if lengths is not None else -logps.mean()
        out.metrics["sft/nll"] = nll.detach()
        out.loss = out.loss + loss_cfg.sft_weight * nll
    return out
