"""Style-alignment evaluation of image folders: the Python entry points behind ``mmpref style-score`` and
``mmpref compare-style``.

``evaluate_style`` scores one folder of generated images against a folder of style references (style score,
optional zero-shot style accuracy and content score); ``compare_style`` pairs two folders by file name and
gives the win rate of A over B by style score. ``run_style_score`` / ``run_compare_style`` go from folders
to a JSON report; they raise on user errors (missing or empty folders, a ``target`` not among the style names,
prompts that do not match the images, weights that are not local), which the CLI reports with exit code 2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmpref.devices import resolve_device
from mmpref.files import atomic_write, atomic_write_text
from mmpref.metrics.clip_embedder import (
    BadImageError,
    ClipEmbedder,
    EmbeddedImages,
    Embedder,
    default_cache_dir,
    embed_image_files,
    list_images,
    load_rgb,
)
from mmpref.metrics.style import (
    DEFAULT_RESAMPLES,
    MetricResult,
    content_score,
    style_accuracy,
    style_predictions,
    style_score,
    win_rate,
)

__all__ = [
    "DEFAULT_STYLE_TEMPLATE",
    "ClipOptions",
    "StyleComparison",
    "StyleEvaluation",
    "StyleInputError",
    "compare_style",
    "evaluate_style",
    "format_table",
    "parse_style_names",
    "read_prompts",
    "run_compare_style",
    "run_style_score",
    "write_contact_sheet",
]

DEFAULT_STYLE_TEMPLATE = "a {} style image"


class StyleInputError(ValueError):
    """The inputs do not fit together (prompts vs images, target vs style names, nothing to pair, ...)."""


@dataclass
class StyleEvaluation:
    """Result of :func:`evaluate_style`: metrics by name, one row per scored image, skipped files."""

    metrics: dict[str, MetricResult]
    rows: list[dict]
    skipped: dict[Path, str] = field(default_factory=dict)
    n_style_refs: int = 0

    def to_dict(self) -> dict:
        return {
            "metrics": {name: m.to_dict() for name, m in self.metrics.items()},
            "n_style_refs": self.n_style_refs,
            "skipped": [{"file": str(p), "reason": why} for p, why in self.skipped.items()],
            "images": self.rows,
        }


@dataclass
class StyleComparison:
    """Result of :func:`compare_style`: style scores of A and B, the win rate of A over B, per-pair rows."""

    metrics: dict[str, MetricResult]
    rows: list[dict]
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    skipped: dict[Path, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "metrics": {name: m.to_dict() for name, m in self.metrics.items()},
            "unpaired": {"only_in_a": self.only_in_a, "only_in_b": self.only_in_b},
            "skipped": [{"file": str(p), "reason": why} for p, why in self.skipped.items()],
            "pairs": self.rows,
        }


# ------------------------------------------------------------------------------------------------ inputs


def parse_style_names(style_names: str | Sequence[str], target: str | None) -> tuple[list[str], int]:
    """Split ``"van gogh, sketch, photo"`` and find ``target`` among the names (case-insensitive).

    Returns ``(names, target_index)``. Raises :class:`StyleInputError` for fewer than two distinct names,
    a missing target, or a target that is not one of the names.
    """
    names = [n.strip() for n in style_names.split(",")] if isinstance(style_names, str) else list(style_names)
    names = [n for n in names if n]
    folded = [n.casefold() for n in names]
    if len(names) < 2 or len(set(folded)) != len(names):
        raise StyleInputError(f"--style-names needs at least two distinct names, got {names}")
    if target is None:
        raise StyleInputError("--target is required with --style-names")
    if target.strip().casefold() not in folded:
        raise StyleInputError(f"--target {target!r} is not among --style-names {names}")
    return names, folded.index(target.strip().casefold())


def _prompt_of(record: dict, where: str) -> tuple[str, str]:
    name = record.get("file_name", record.get("file"))
    prompt = record.get("prompt", record.get("text", record.get("caption")))
    if not isinstance(name, str) or not isinstance(prompt, str):
        raise StyleInputError(f"{where}: expected 'file_name' and 'prompt' string fields, got {record}")
    return name, prompt


def _read_prompt_mapping(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if isinstance(data, list):
            return dict(_prompt_of(r, f"{path}[{i}]") for i, r in enumerate(data))
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise StyleInputError(f"{path}: expected a JSON object mapping file name -> prompt")
        return data
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return dict(_prompt_of(r, f"{path}:{i + 1}") for i, r in enumerate(rows))


def read_prompts(path: str | Path, image_paths: Sequence[Path]) -> dict[str, str]:
    """Prompts by image file name from a prompts file, checked against ``image_paths``.

    - ``.json``: an object ``{"0001.png": "a cat", ...}`` (or a list of records as in JSONL);
    - ``.jsonl``: one record per line with ``file_name`` (or ``file``) and ``prompt`` (or ``text`` /
      ``caption``), e.g. a Hugging Face imagefolder ``metadata.jsonl``;
    - anything else: plain text, one prompt per non-empty line, matched in order to the images sorted by
      file name (the count must equal the number of image files in the folder).

    A mapping may name more files than the folder holds, or name them without the extension; images it
    does not name are left out of the result, and :func:`evaluate_style` rejects any readable image without
    a prompt (unreadable, skipped files need none). Raises :class:`StyleInputError` on a count mismatch or
    a malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise StyleInputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    if path.suffix.lower() in (".json", ".jsonl"):
        try:
            mapping = _read_prompt_mapping(path)
        except json.JSONDecodeError as e:
            raise StyleInputError(f"{path}: invalid JSON: {e}") from e
        found = {p.name: mapping.get(p.name, mapping.get(p.stem)) for p in image_paths}
        return {name: prompt for name, prompt in found.items() if prompt is not None}
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != len(image_paths):
        raise StyleInputError(
            f"{path} has {len(lines)} prompts but the folder has {len(image_paths)} images "
            "(one prompt per line, matched to the images sorted by file name)"
        )
    return {p.name: prompt for p, prompt in zip(image_paths, lines)}


def _as_paths(images: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(images, (str, Path)):
        return list_images(images)
    paths = [Path(p) for p in images]
    if not paths:
        raise StyleInputError("no images given")
    return paths


def _embed(embedder: Embedder, images, on_bad_images: str, what: str) -> EmbeddedImages:
    result = embed_image_files(embedder, _as_paths(images), on_bad_images=on_bad_images)
    if not result.paths:
        raise StyleInputError(f"no readable images in {what}")
    return result


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_style(
    embedder: Embedder,
    generated: str | Path | Sequence[str | Path],
    style_refs: str | Path | Sequence[str | Path],
    *,
    prompts: Mapping[str, str] | None = None,
    style_names: Sequence[str] | None = None,
    target_index: int | None = None,
    style_template: str = DEFAULT_STYLE_TEMPLATE,
    on_bad_images: str = "skip",
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> StyleEvaluation:
    """Score generated images for style alignment (docs/design.md §9).

    ``generated`` / ``style_refs`` are folders (see :func:`~mmpref.metrics.clip_embedder.list_images`) or
    lists of image files. Always computes the style score; with ``style_names`` and ``target_index`` also
    the zero-shot style accuracy over the prompts ``style_template.format(name)``; with ``prompts`` (file
    name → prompt, see :func:`read_prompts`) also the content score. Unreadable images are skipped with a
    warning or raise, per ``on_bad_images``.
    """
    refs = _embed(embedder, style_refs, on_bad_images, "the style references")
    gen = _embed(embedder, generated, on_bad_images, "the generated images")
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    rows = [{"file": p.name, "path": str(p)} for p in gen.paths]
    metrics = {"style_score": style_score(gen.embeddings, refs.embeddings, **boot)}
    for row, s in zip(rows, metrics["style_score"].per_item):
        row["style_score"] = s
    if style_names is not None and target_index is not None:
        metrics["style_accuracy"] = _style_accuracy(
            embedder, gen, rows, style_names, target_index, style_template, boot
        )
    if prompts is not None:
        metrics["content_score"] = _content_score(embedder, gen, rows, prompts, boot)
    skipped = {**refs.skipped, **gen.skipped}
    return StyleEvaluation(metrics, rows, skipped, n_style_refs=len(refs.paths))


def _style_accuracy(
    embedder: Embedder,
    gen: EmbeddedImages,
    rows: list[dict],
    style_names: Sequence[str],
    target_index: int,
    style_template: str,
    boot: dict,
) -> MetricResult:
    text_emb = embedder.embed_texts([style_template.format(name) for name in style_names])
    preds = style_predictions(gen.embeddings, text_emb).tolist()
    for row, k in zip(rows, preds):
        row["style_pred"] = style_names[k]
        row["is_target_style"] = k == target_index
    return style_accuracy(gen.embeddings, text_emb, target_index, **boot)


def _content_score(
    embedder: Embedder, gen: EmbeddedImages, rows: list[dict], prompts: Mapping[str, str], boot: dict
) -> MetricResult:
    missing = [p.name for p in gen.paths if p.name not in prompts]
    if missing:
        listing = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise StyleInputError(f"no prompt for {len(missing)} of {len(gen.paths)} image(s): {listing}")
    texts = [prompts[p.name] for p in gen.paths]
    result = content_score(gen.embeddings, embedder.embed_texts(texts), **boot)
    for row, text, c in zip(rows, texts, result.per_item):
        row["prompt"] = text
        row["content_score"] = c
    return result


def compare_style(
    embedder: Embedder,
    a: str | Path | Sequence[str | Path],
    b: str | Path | Sequence[str | Path],
    style_refs: str | Path | Sequence[str | Path],
    *,
    tie_tolerance: float = 0.0,
    on_bad_images: str = "skip",
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> StyleComparison:
    """Win rate of A over B by per-image style score, images paired by file name (ties count ½).

    Only names present (and readable) in both sets are compared; the others are listed in ``only_in_a`` /
    ``only_in_b``. Raises :class:`StyleInputError` when no name is shared.
    """
    refs = _embed(embedder, style_refs, on_bad_images, "the style references")
    ea = _embed(embedder, a, on_bad_images, "set A")
    eb = _embed(embedder, b, on_bad_images, "set B")
    names_a = {p.name: i for i, p in enumerate(ea.paths)}
    names_b = {p.name: i for i, p in enumerate(eb.paths)}
    shared = sorted(names_a.keys() & names_b.keys())
    if not shared:
        raise StyleInputError("sets A and B share no image file name: nothing to pair")
    boot = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    score_a = style_score(ea.embeddings[[names_a[n] for n in shared]], refs.embeddings, **boot)
    score_b = style_score(eb.embeddings[[names_b[n] for n in shared]], refs.embeddings, **boot)
    sa, sb = torch.tensor(score_a.per_item), torch.tensor(score_b.per_item)
    metrics = {
        "style_score_a": score_a,
        "style_score_b": score_b,
        "win_rate_a_over_b": win_rate(sa, sb, tie_tolerance=tie_tolerance, **boot),
    }
    rows = [
        {"file": n, "style_score_a": x, "style_score_b": y, "win_a": w}
        for n, x, y, w in zip(shared, sa.tolist(), sb.tolist(), metrics["win_rate_a_over_b"].per_item)
    ]
    return StyleComparison(
        metrics,
        rows,
        only_in_a=sorted(names_a.keys() - names_b.keys()),
        only_in_b=sorted(names_b.keys() - names_a.keys()),
        skipped={**refs.skipped, **ea.skipped, **eb.skipped},
    )


# ---------------------------------------------------------------------------------------------- outputs


def format_table(metrics: Mapping[str, MetricResult]) -> str:
    """A plain-text table: metric, score, confidence interval and n, one line per metric."""
    conf = next(iter(metrics.values())).confidence if metrics else 0.95
    rows = [("metric", "score", f"{conf:.0%} CI", "n")]
    rows += [
        (name, f"{m.value:.4f}", f"[{m.ci_low:.4f}, {m.ci_high:.4f}]", str(m.n))
        for name, m in metrics.items()
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    return "\n".join(
        f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:^{widths[2]}}  {d:>{widths[3]}}".rstrip()
        for a, b, c, d in rows
    )


def _thumbnail_cell(path: Path, caption: str, thumb: int):
    from PIL import Image, ImageDraw, ImageOps

    cell = Image.new("RGB", (thumb, thumb + 16), "white")
    try:
        cell.paste(ImageOps.pad(load_rgb(path), (thumb, thumb), color="white"), (0, 0))
    except BadImageError:
        pass
    ImageDraw.Draw(cell).text((2, thumb + 2), caption, fill="black")
    return cell


def write_contact_sheet(rows: Sequence[dict], out_path: str | Path, k: int = 8, thumb: int = 128) -> Path:
    """A PNG with the ``k`` best (top row) and ``k`` worst (bottom row) images by style score, captioned.

    ``rows`` need ``path`` and ``style_score`` (as in :attr:`StyleEvaluation.rows`). With fewer than ``2k``
    images each row shows about half of them.
    """
    from PIL import Image, ImageDraw

    ranked = sorted(rows, key=lambda r: r["style_score"], reverse=True)
    k = max(1, min(k, (len(ranked) + 1) // 2))
    groups = [("best", ranked[:k]), ("worst", ranked[::-1][:k])]
    label_w, cell_h, max_chars = 48, thumb + 16, max(6, thumb // 6 - 6)
    sheet = Image.new("RGB", (label_w + k * (thumb + 4), len(groups) * (cell_h + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for g, (label, group) in enumerate(groups):
        y = g * (cell_h + 4)
        draw.text((4, y + thumb // 2), label, fill="black")
        for j, row in enumerate(group):
            caption = f"{row['style_score']:.3f}  {Path(row['path']).name[:max_chars]}"
            sheet.paste(_thumbnail_cell(Path(row["path"]), caption, thumb), (label_w + j * (thumb + 4), y))
    out_path = Path(out_path)
    atomic_write(out_path, lambda tmp: sheet.save(tmp, format="PNG"))  # never half a sheet under its name
    return out_path


def _write_json(report: dict, out: Path) -> None:
    atomic_write_text(out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------- folders to a report


@dataclass(frozen=True)
class ClipOptions:
    """The CLIP embedder of :func:`run_style_score` and :func:`run_compare_style`.

    ``model`` is an open_clip model name or ``local-dir:FOLDER`` and ``weights`` a local checkpoint file or
    cached pretrained tag for a plain name (see :class:`ClipEmbedder`); ``device`` ``"auto"`` is cuda when
    available; embeddings are cached under ``cache_dir`` (default :func:`default_cache_dir`) unless
    ``use_cache`` is off.
    """

    model: str = "ViT-B-32"
    weights: str | None = None
    device: str = "auto"
    batch_size: int = 32
    cache_dir: Path | None = None
    use_cache: bool = True

    def embedder(self) -> ClipEmbedder:
        return ClipEmbedder(
            self.model,
            pretrained=self.weights,
            device=resolve_device(self.device),
            batch_size=self.batch_size,
            cache_dir=(self.cache_dir or default_cache_dir()) if self.use_cache else None,
        )

    def info(self) -> dict:
        return {"clip_model": self.model, "clip_weights": self.weights}


def _bootstrap(n_resamples: int, confidence: float, seed: int) -> dict:
    if not 0.0 < confidence < 1.0:
        raise StyleInputError(f"--confidence must be in (0, 1), got {confidence}")
    return {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}


def run_style_score(
    generated: str | Path,
    style_refs: str | Path,
    *,
    out: str | Path = "style_report.json",
    clip: ClipOptions = ClipOptions(),
    prompts: str | Path | None = None,
    style_names: str | Sequence[str] | None = None,
    target: str | None = None,
    style_template: str = DEFAULT_STYLE_TEMPLATE,
    sheet_k: int = 8,
    on_bad_images: str = "skip",
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[StyleEvaluation, Path]:
    """``mmpref style-score``: score the folder ``generated`` against the folder ``style_refs`` and write the
    JSON report to ``out`` and, beside it, ``<out stem>_sheet.png`` (:func:`write_contact_sheet`).

    Returns the evaluation and the contact sheet's path. The inputs are checked before any model work: a
    missing or empty folder raises ``FileNotFoundError`` / ``NotADirectoryError``; ``out`` inside
    ``generated``, a ``target`` without ``style_names`` or not among them, a template without ``{}``, prompts
    that do not fit the images or a ``confidence`` outside (0, 1) raise :class:`StyleInputError`.
    """
    images = list_images(generated)
    list_images(style_refs)  # fail fast on a missing/empty folder, before any model work
    out = Path(out)
    if out.resolve().parent == Path(generated).resolve():
        raise StyleInputError(
            "--out must not be inside --generated: the contact sheet would be scored next time"
        )
    names, target_index = (None, None)
    if target is not None and style_names is None:
        raise StyleInputError("--target needs --style-names (the candidate styles to classify among)")
    if style_names is not None:
        names, target_index = parse_style_names(style_names, target)
        if "{}" not in style_template:
            raise StyleInputError(f"--style-template needs a {{}} for the style name, got {style_template!r}")
    prompt_map = read_prompts(prompts, images) if prompts else None
    boot = _bootstrap(n_resamples, confidence, seed)
    result = evaluate_style(
        clip.embedder(),
        images,
        style_refs,
        prompts=prompt_map,
        style_names=names,
        target_index=target_index,
        style_template=style_template,
        on_bad_images=on_bad_images,
        **boot,
    )
    sheet = write_contact_sheet(result.rows, out.with_name(f"{out.stem}_sheet.png"), k=sheet_k)
    report = {
        "command": "style-score",
        "generated": str(generated),
        "style_refs": str(style_refs),
        "prompts": str(prompts) if prompts else None,
        "style_names": names,
        "target": names[target_index] if names else None,
        "style_template": style_template,
        **clip.info(),
        "bootstrap": boot,
        **result.to_dict(),
        "contact_sheet": str(sheet),
    }
    _write_json(report, out)
    return result, sheet


def run_compare_style(
    a: str | Path,
    b: str | Path,
    style_refs: str | Path,
    *,
    out: str | Path | None = None,
    clip: ClipOptions = ClipOptions(),
    tie_tolerance: float = 0.0,
    on_bad_images: str = "skip",
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> StyleComparison:
    """``mmpref compare-style``: :func:`compare_style` of the folders ``a`` and ``b``, its JSON report written
    to ``out`` when given. Missing or empty folders raise before any model work, as in
    :func:`run_style_score`."""
    for folder in (a, b, style_refs):
        list_images(folder)
    boot = _bootstrap(n_resamples, confidence, seed)
    result = compare_style(
        clip.embedder(),
        a,
        b,
        style_refs,
        tie_tolerance=tie_tolerance,
        on_bad_images=on_bad_images,
        **boot,
    )
    if out:
        report = {
            "command": "compare-style",
            "a": str(a),
            "b": str(b),
            "style_refs": str(style_refs),
            **clip.info(),
            "bootstrap": boot,
            **result.to_dict(),
        }
        _write_json(report, Path(out))
    return result
