"""``mmpref eval``: a trained model against its reference, scored by preference models, with intervals.

``mmpref eval images`` pairs the images of a trained model and its reference by file name (a ``mmpref sample``
folder holds both, ``reference/`` and ``trained/`` with their ``prompts.jsonl``; or any two folders plus a
prompts file) and, for each scorer of :mod:`mmpref.metrics.scorers`, reports

- the mean score of each side with its bootstrap interval over prompts;
- the win rate of trained over reference, ``W = (1/n) Σᵢ (1[tᵢ > rᵢ] + ½ · 1[tᵢ = rᵢ])`` over the ``n`` prompts,
  with its bootstrap interval (:mod:`mmpref.metrics.stats`);

and writes ``eval_images.json`` (every pair's scores), ``eval_images.md`` (the table) and ``contact_sheet.png``
(the pairs side by side, each image captioned with its scores). ``mmpref eval text`` does the same for language
models (:func:`mmpref.rdpo.reward.run_eval_text`): generations of the trained model and its reference from the
same seeds, judged by one or more reward models, plus answer lengths and the held-out implicit reward accuracy.

A score means something only against the same scorer, prompts and seeds: scores of different scorers, or of
the same scorer on different prompt sets, are not comparable (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmpref.metrics.stats import DEFAULT_RESAMPLES, MetricResult, mean_with_ci, win_rate

__all__ = [
    "ImagePair",
    "ScorerComparison",
    "compare_scores",
    "contact_sheet",
    "evaluate_images",
    "markdown_table",
    "pair_folders",
]


@dataclass(frozen=True)
class ImagePair:
    """One prompt's image from each side."""

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
) -> tuple[list[ImagePair], list[str], list[str]]:
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
    pairs = [ImagePair(n, by_name[n], ref[n], tr[n]) for n in shared]
    return pairs, sorted(ref.keys() - tr.keys()), sorted(tr.keys() - ref.keys())


def _score_files(scorer, paths: Sequence[Path], prompts: Sequence[str], chunk: int = 64) -> torch.Tensor:
    """``scorer.score`` over image files, decoding ``chunk`` at a time (a few thousand images stay cheap)."""
    from mmpref.metrics.clip_embedder import load_rgb

    out = [scorer.score([load_rgb(p) for p in paths[i : i + chunk]], list(prompts[i : i + chunk]))
           for i in range(0, len(paths), chunk)]  # fmt: skip
    return torch.cat(out)


def evaluate_images(
    scorers: Mapping[str, object],
    pairs: Sequence[ImagePair],
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
    pairs: Sequence[ImagePair], results: Mapping[str, ScorerComparison], cell: int = 160, max_rows: int = 16
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


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


# -------------------------------------------------------------------------------------------------- CLI


def eval_images_command(args: argparse.Namespace) -> int:
    """``mmpref eval images``: score both sides, print the table, write the report, table and contact sheet."""
    from mmpref.metrics.report import StyleInputError
    from mmpref.metrics.scorers import SCORERS, load_scorer, parse_scorer_models
    from mmpref.rdpo.generation import resolve_device

    if args.samples is not None and (args.reference or args.trained):
        raise StyleInputError("give a `mmpref sample` folder or --reference and --trained, not both")
    if args.samples is not None:
        reference, trained = Path(args.samples) / "reference", Path(args.samples) / "trained"
    elif args.reference and args.trained:
        reference, trained = Path(args.reference), Path(args.trained)
    else:
        raise StyleInputError("give a `mmpref sample` folder (with reference/ and trained/), or --reference "
                              "and --trained folders")  # fmt: skip
    names = [n.strip() for n in args.scorers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCORERS]
    if not names or unknown:
        raise StyleInputError(f"--scorers: unknown {unknown[0]!r}; choose from {', '.join(SCORERS)}"
                              if unknown else "--scorers: name at least one scorer")  # fmt: skip
    models = parse_scorer_models(args.scorer_model)
    extra = sorted(set(models) - set(names))
    if extra:
        raise StyleInputError(f"--scorer-model {extra[0]}: not among --scorers")
    if not 0.0 < args.confidence < 1.0:
        raise StyleInputError(f"--confidence must be in (0, 1), got {args.confidence}")
    pairs, only_ref, only_tr = pair_folders(reference, trained, args.prompts)
    out = Path(args.out) if args.out else trained.parent / "eval"
    device = resolve_device(args.device)
    boot = {"n_resamples": args.n_resamples, "confidence": args.confidence, "seed": args.seed}
    results = {}
    for name in names:  # one scorer in memory at a time
        scorer = load_scorer(name, models.get(name), device=device, batch_size=args.batch_size)
        results.update(evaluate_images({name: scorer}, pairs, **boot))
        del scorer
    table = markdown_table(results)
    sheet_path, table_path, report_path = (
        out / "contact_sheet.png",
        out / "eval_images.md",
        out / "eval_images.json",
    )
    _atomic_write(
        sheet_path, lambda p: contact_sheet(pairs, results, max_rows=args.sheet_rows).save(p, format="PNG")
    )
    formulas = "\n".join(f"- {n}: {SCORERS[n].formula}" for n in results)
    _atomic_write(table_path, lambda p: p.write_text(
        f"{len(pairs)} prompts; trained `{trained}` vs reference `{reference}`\n\n{table}\n\n{formulas}\n",
        encoding="utf-8"))  # fmt: skip
    report = {
        "command": "eval images",
        "reference": str(reference),
        "trained": str(trained),
        "prompts": str(args.prompts) if args.prompts else None,
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
    _atomic_write(report_path, lambda p: p.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8"))  # fmt: skip
    if only_ref or only_tr:
        print(f"note: {len(only_ref)} image(s) only in {reference} and {len(only_tr)} only in {trained} are not "
              "compared", file=sys.stderr)  # fmt: skip
    print(table)
    print(f"report: {report_path}\ntable: {table_path}\ncontact sheet: {sheet_path}")
    return 0


def eval_text_command(args: argparse.Namespace) -> int:
    """``mmpref eval text`` (and its alias ``mmpref eval-reward``): see :func:`mmpref.rdpo.reward.run_eval_text`."""
    from mmpref.rdpo.config import load_rdpo_config
    from mmpref.rdpo.reward import run_eval_text

    cfg = load_rdpo_config("eval", args.config, args.overrides)
    result = run_eval_text(cfg)
    print(result.summary(cfg))
    print(f"written to {cfg.output}")
    return 0


def _user_errors(fn):
    """Input problems of ``eval images`` (missing folders, unpaired prompts) -> ``mmpref eval: error: ...``, 2."""
    import functools

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from mmpref.metrics.clip_embedder import BadImageError
        from mmpref.metrics.report import StyleInputError

        try:
            return fn(args)
        except (StyleInputError, BadImageError, NotADirectoryError) as e:
            print(f"mmpref eval {args.eval_command}: error: {e}", file=sys.stderr)
            return 2

    return run


def add_eval_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``mmpref eval images`` and ``mmpref eval text``."""
    from mmpref.metrics.scorers import SCORERS

    p = subparsers.add_parser("eval", help="a trained model against its reference: scores, win rates, intervals",
                              description="A trained model against its reference on the same prompts and "
                              "seeds: `images` with preference scorers, `text` with reward models; means, win "
                              "rates (ties 1/2) and bootstrap intervals (docs/evaluation.md).")  # fmt: skip
    sub = p.add_subparsers(dest="eval_command", required=True)

    q = sub.add_parser(
        "images",
        help="image preference scores and win rates of trained vs reference images",
        description="Pairs the images of a trained model and its reference by file name and reports, for each "
        "scorer, each side's mean score and the win rate of trained over reference (ties 1/2), with bootstrap "
        "intervals over prompts. Writes eval_images.json, eval_images.md and contact_sheet.png.",
    )
    q.add_argument("samples", nargs="?", type=Path, default=None,
                   help="a `mmpref sample` output folder (reference/ and trained/, each with prompts.jsonl)")  # fmt: skip
    q.add_argument(
        "--reference", type=Path, default=None, metavar="DIR", help="reference images (instead of SAMPLES)"
    )
    q.add_argument(
        "--trained", type=Path, default=None, metavar="DIR", help="trained images, same file names"
    )
    q.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="prompts by file name (.json/.jsonl) or one a line in file order; default: the folders' "
                        "prompts.jsonl")  # fmt: skip
    q.add_argument(
        "--scorers", required=True, metavar="NAMES", help=f"comma-separated, from: {', '.join(SCORERS)}"
    )
    q.add_argument("--scorer-model", action="append", default=[], metavar="NAME=MODEL",
                   help="a scorer's model: hub id ORG/NAME[@rev], folder or checkpoint file (repeatable); default: "
                        "the authors' published weights (docs/evaluation.md)")  # fmt: skip
    q.add_argument(
        "--out", type=Path, default=None, metavar="DIR", help="output folder (default: <samples>/eval)"
    )
    q.add_argument(
        "--device", default="auto", metavar="DEV", help="cpu, cuda, cuda:1 (default: cuda if available)"
    )
    q.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per scorer forward pass")
    q.add_argument(
        "--n-resamples", type=int, default=DEFAULT_RESAMPLES, metavar="N", help="bootstrap resamples"
    )
    q.add_argument(
        "--confidence", type=float, default=0.95, metavar="P", help="interval level (default 0.95)"
    )
    q.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    q.add_argument("--sheet-rows", type=int, default=16, metavar="N", help="pairs on the contact sheet")
    q.set_defaults(func=_user_errors(eval_images_command))

    t = sub.add_parser(
        "text",
        help="reward-judged win rates, answer lengths and implicit reward accuracy of a trained LM",
        description="Generates answers to held-out prompts with the trained model and its reference (same "
        "seeds), judges them with one or more reward models (win rate, ties 1/2, bootstrap interval over "
        "prompts), reports each side's mean answer length in tokens and, with `preferences`, the held-out "
        "implicit reward accuracy. The config is eval-reward's (an `eval:` section or top-level keys).",
    )
    t.add_argument("config", type=Path)
    t.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. generation.batch_size=4")
    t.set_defaults(func=eval_text_command)
