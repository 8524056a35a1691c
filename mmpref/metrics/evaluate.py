"""``mmpref eval``: a trained model against its reference, scored by preference models, with intervals.

``mmpref eval images`` pairs the images of a trained model and its reference by file name (a ``mmpref sample``
folder holds both, ``reference/`` and ``trained/`` with their ``prompts.jsonl``; or any two folders plus a
prompts file) and, for each scorer of :mod:`mmpref.metrics.scorers`, reports

- the mean score of each side with its bootstrap interval over prompts;
- the win rate of trained over reference, ``W = (1/n) Σᵢ (1[tᵢ > rᵢ] + ½ · 1[tᵢ = rᵢ])`` over the ``n`` prompts,
  with its bootstrap interval (:mod:`mmpref.metrics.stats`);

and writes ``eval_images.json`` (every pair's scores), ``eval_images.md`` (the table) and ``contact_sheet.png``
(the pairs side by side, each image captioned with its scores): :func:`run_eval_images`. ``mmpref eval text`` does
the same for language models (:func:`mmpref.rdpo.reward.run_eval_text`): generations of the trained model and its
reference from the same seeds, judged by one or more reward models, plus answer lengths and the held-out implicit
reward accuracy.

A score means something only against the same scorer, prompts and seeds: scores of different scorers, or of
the same scorer on different prompt sets, are not comparable (docs/evaluation.md).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmpref.devices import resolve_device
from mmpref.files import atomic_write, atomic_write_text
from mmpref.metrics.stats import DEFAULT_RESAMPLES, MetricResult, mean_with_ci, win_rate

__all__ = [
    "ImageEvaluation",
    "ReferenceTrainedPair",
    "ScorerComparison",
    "compare_scores",
    "contact_sheet",
    "evaluate_images",
    "markdown_table",
    "pair_folders",
    "run_eval_images",
]


@dataclass(frozen=True)
class ReferenceTrainedPair:
    """The two image files of one prompt in ``mmpref eval images``: the reference model's and the trained one's
    (not a training pair: that is :class:`mmpref.data.images.ImagePair`, chosen vs rejected)."""

    name: str
    prompt: str
    reference: Path
    trained: Path


@dataclass
class ScorerComparison:
    """One scorer on both sides: per-side means, the win rate of trained over reference, per-pair scores."""

    name: str
    model: str
    reference: MetricResult
    trained: MetricResult
    win_rate: MetricResult
    reference_scores: list[float] = field(repr=False)
    trained_scores: list[float] = field(repr=False)

    def to_dict(self) -> dict:
        return {"model": self.model, "reference": self.reference.to_dict(), "trained": self.trained.to_dict(),
                "win_rate": self.win_rate.to_dict()}  # fmt: skip


def compare_scores(
    name: str,
    model: str,
    reference: torch.Tensor,
    trained: torch.Tensor,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> ScorerComparison:
    """Means with intervals and the win rate (ties ½) of paired per-prompt scores ``trained[i]`` vs ``reference[i]``."""
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    return ScorerComparison(
        name=name,
        model=model,
        reference=mean_with_ci(f"{name}_reference", reference, **boot),
        trained=mean_with_ci(f"{name}_trained", trained, **boot),
        win_rate=win_rate(trained, reference, **boot),
        reference_scores=[float(x) for x in reference],
        trained_scores=[float(x) for x in trained],
    )


# ------------------------------------------------------------------------------------------------ inputs


def _folder_prompts(folder: Path) -> dict[str, str] | None:
    """``prompts.jsonl`` of a ``mmpref sample`` side (file name -> prompt), or None when there is none."""
    path = folder / "prompts.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["file_name"]: r["prompt"] for r in rows}


def pair_folders(
    reference: str | Path, trained: str | Path, prompts: str | Path | None = None
) -> tuple[list[ReferenceTrainedPair], list[str], list[str]]:
    """The image pairs of two folders, matched by file name, with their prompts.

    Prompts come from ``prompts`` (any format of :func:`mmpref.metrics.report.read_prompts`) or else from each
    folder's ``prompts.jsonl`` (``mmpref sample`` writes one per side; where both have one they must agree).
    Returns ``(pairs, only_in_reference, only_in_trained)``. Raises :class:`StyleInputError` when no file name
    is shared or a paired image has no prompt.
    """
    from mmpref.metrics.clip_embedder import list_images
    from mmpref.metrics.report import StyleInputError, read_prompts

    reference, trained = Path(reference), Path(trained)
    ref = {p.name: p for p in list_images(reference)}
    tr = {p.name: p for p in list_images(trained)}
    shared = sorted(ref.keys() & tr.keys())
    if not shared:
        raise StyleInputError(f"{reference} and {trained} share no image file name: nothing to pair")
    if prompts is not None:
        by_name = read_prompts(prompts, [tr[n] for n in shared])
    else:
        sides = [(folder, _folder_prompts(folder)) for folder in (reference, trained)]
        found = [(folder, m) for folder, m in sides if m is not None]
        if not found:
            raise StyleInputError(f"no prompts: neither {reference} nor {trained} has a prompts.jsonl; "
                                  "give --prompts FILE")  # fmt: skip
        by_name = found[-1][1]
        if len(found) == 2:
            differ = [n for n in shared if found[0][1].get(n) != found[1][1].get(n)]
            if differ:
                raise StyleInputError(f"{differ[0]}: the prompts.jsonl of {reference} and {trained} give it "
                                      "different prompts; these are not pairs of one prompt")  # fmt: skip
    missing = [n for n in shared if n not in by_name]
    if missing:
        raise StyleInputError(f"{missing[0]} (and {len(missing) - 1} more) has no prompt")
    pairs = [ReferenceTrainedPair(n, by_name[n], ref[n], tr[n]) for n in shared]
    return pairs, sorted(ref.keys() - tr.keys()), sorted(tr.keys() - ref.keys())


def _score_files(scorer, paths: Sequence[Path], prompts: Sequence[str], chunk: int = 64) -> torch.Tensor:
    """``scorer.score`` over image files, decoding ``chunk`` at a time (a few thousand images stay cheap)."""
    from mmpref.metrics.clip_embedder import load_rgb

    out = [scorer.score([load_rgb(p) for p in paths[i : i + chunk]], list(prompts[i : i + chunk]))
           for i in range(0, len(paths), chunk)]  # fmt: skip
    return torch.cat(out)


def evaluate_images(
    scorers: Mapping[str, object],
    pairs: Sequence[ReferenceTrainedPair],
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, ScorerComparison]:
    """Score both sides of every pair with every scorer (name -> :class:`~mmpref.metrics.scorers.Scorer`)."""
    prompts = [p.prompt for p in pairs]
    out = {}
    for name, scorer in scorers.items():
        ref = _score_files(scorer, [p.reference for p in pairs], prompts)
        tr = _score_files(scorer, [p.trained for p in pairs], prompts)
        out[name] = compare_scores(
            name, getattr(scorer, "source", name), ref, tr, n_resamples, confidence, seed
        )
    return out


# ---------------------------------------------------------------------------------------------- outputs


def markdown_table(results: Mapping[str, ScorerComparison]) -> str:
    """One row per scorer: model, each side's mean [interval], the win rate of trained [interval], n."""
    pct = f"{next(iter(results.values())).win_rate.confidence:.0%}"
    head = (f"| scorer | model | reference mean [{pct} CI] | trained mean [{pct} CI] "
            f"| win rate trained vs reference [{pct} CI] | n |")  # fmt: skip
    lines = [head, "|---|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        ref, tr, w = r.reference, r.trained, r.win_rate
        lines.append(f"| {name} | `{r.model}` | {ref.value:.4f} [{ref.ci_low:.4f}, {ref.ci_high:.4f}] "
                     f"| {tr.value:.4f} [{tr.ci_low:.4f}, {tr.ci_high:.4f}] "
                     f"| {w.value:.3f} [{w.ci_low:.3f}, {w.ci_high:.3f}] | {w.n} |")  # fmt: skip
    return "\n".join(lines)


def contact_sheet(
    pairs: Sequence[ReferenceTrainedPair],
    results: Mapping[str, ScorerComparison],
    cell: int = 160,
    max_rows: int = 16,
):
    """The pairs as rows (prompt, reference, trained; the style of :func:`mmpref.training.sampling.image_grid`),
    each image captioned with its scores, the higher of each pair marked ``*``. At most ``max_rows`` pairs."""
    from PIL import Image, ImageDraw, ImageOps

    from mmpref.metrics.clip_embedder import load_rgb

    rows = list(pairs)[:max_rows]
    label_h, text_w, line_h = 20, max(cell, 160), 12
    caption_h = 4 + line_h * len(results)
    row_h = cell + caption_h
    sheet = Image.new("RGB", (text_w + 2 * cell, label_h + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, side in enumerate(("reference", "trained")):
        draw.text((text_w + j * cell + 4, 4), side, fill="black")
    for i, pair in enumerate(rows):
        y = label_h + i * row_h
        lines = textwrap.wrap(pair.prompt, text_w // 6)[: row_h // 12 - 1]
        draw.multiline_text((4, y + 4), "\n".join([pair.name, *lines]), fill="black")
        for j, path in enumerate((pair.reference, pair.trained)):
            x = text_w + j * cell
            sheet.paste(ImageOps.pad(load_rgb(path), (cell, cell), color="white"), (x, y))
            for k, (name, r) in enumerate(results.items()):
                mine, other = (r.reference_scores[i], r.trained_scores[i])[:: 1 if j == 0 else -1]
                mark = "*" if mine > other else ""
                draw.text((x + 4, y + cell + 2 + k * line_h), f"{name} {mine:.4g}{mark}", fill="black")
    return sheet


# ----------------------------------------------------------------------------------- folders to a report


@dataclass
class ImageEvaluation:
    """Result of :func:`run_eval_images`: the pairs, each scorer's comparison, and the files written."""

    reference: Path
    trained: Path
    pairs: list[ReferenceTrainedPair]
    results: dict[str, ScorerComparison]
    only_in_reference: list[str]
    only_in_trained: list[str]
    table: str
    report_path: Path
    table_path: Path
    sheet_path: Path


def run_eval_images(
    samples: str | Path | None = None,
    *,
    reference: str | Path | None = None,
    trained: str | Path | None = None,
    scorers: str | Sequence[str],
    scorer_models: Sequence[str] | Mapping[str, str] = (),
    prompts: str | Path | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 16,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
    sheet_rows: int = 16,
) -> ImageEvaluation:
    """``mmpref eval images``: score both sides of every pair, write ``eval_images.json``, ``eval_images.md``
    and ``contact_sheet.png`` to ``out`` (default ``<samples>/eval``).

    The sides are ``samples/reference`` and ``samples/trained`` (a ``mmpref sample`` folder) or the folders
    ``reference`` and ``trained``; ``scorers`` names :data:`~mmpref.metrics.scorers.SCORERS` (a list, or one
    comma-separated string) and ``scorer_models`` their weights (``NAME=MODEL`` items, or name -> model).
    Raises :class:`~mmpref.metrics.report.StyleInputError` for inputs that do not fit together, before any
    scorer is loaded.
    """
    from mmpref.metrics.report import StyleInputError
    from mmpref.metrics.scorers import SCORERS, load_scorer, parse_scorer_models

    if samples is not None and (reference or trained):
        raise StyleInputError("give a `mmpref sample` folder or --reference and --trained, not both")
    if samples is not None:
        reference, trained = Path(samples) / "reference", Path(samples) / "trained"
    elif reference and trained:
        reference, trained = Path(reference), Path(trained)
    else:
        raise StyleInputError("give a `mmpref sample` folder (with reference/ and trained/), or --reference "
                              "and --trained folders")  # fmt: skip
    names = [n.strip() for n in scorers.split(",")] if isinstance(scorers, str) else list(scorers)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in SCORERS]
    if not names or unknown:
        raise StyleInputError(f"--scorers: unknown {unknown[0]!r}; choose from {', '.join(SCORERS)}"
                              if unknown else "--scorers: name at least one scorer")  # fmt: skip
    models = dict(scorer_models) if isinstance(scorer_models, Mapping) else parse_scorer_models(scorer_models)
    extra = sorted(set(models) - set(names))
    if extra:
        raise StyleInputError(f"--scorer-model {extra[0]}: not among --scorers")
    if not 0.0 < confidence < 1.0:
        raise StyleInputError(f"--confidence must be in (0, 1), got {confidence}")
    pairs, only_ref, only_tr = pair_folders(reference, trained, prompts)
    out = Path(out) if out else trained.parent / "eval"
    device = resolve_device(device)
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    results = {}
    for name in names:  # one scorer in memory at a time
        scorer = load_scorer(name, models.get(name), device=device, batch_size=batch_size)
        results.update(evaluate_images({name: scorer}, pairs, **boot))
        del scorer
    table = markdown_table(results)
    sheet_path, table_path, report_path = (
        out / "contact_sheet.png",
        out / "eval_images.md",
        out / "eval_images.json",
    )
    atomic_write(
        sheet_path, lambda p: contact_sheet(pairs, results, max_rows=sheet_rows).save(p, format="PNG")
    )
    formulas = "\n".join(f"- {n}: {SCORERS[n].formula}" for n in results)
    heading = f"{len(pairs)} prompts; trained `{trained}` vs reference `{reference}`"
    atomic_write_text(table_path, f"{heading}\n\n{table}\n\n{formulas}\n")
    report = {
        "command": "eval images",
        "reference": str(reference),
        "trained": str(trained),
        "prompts": str(prompts) if prompts else None,
        "bootstrap": boot,
        "scorers": {n: {**r.to_dict(), "formula": SCORERS[n].formula} for n, r in results.items()},
        "unpaired": {"only_in_reference": only_ref, "only_in_trained": only_tr},
        "pairs": [{"file": p.name, "prompt": p.prompt, "reference": str(p.reference), "trained": str(p.trained),
                   "scores": {n: {"reference": r.reference_scores[i], "trained": r.trained_scores[i]}
                              for n, r in results.items()}}
                  for i, p in enumerate(pairs)],
        "table": str(table_path),
        "contact_sheet": str(sheet_path),
    }  # fmt: skip
    atomic_write_text(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return ImageEvaluation(reference, trained, pairs, results, only_ref, only_tr, table, report_path, table_path,
                           sheet_path)  # fmt: skip
