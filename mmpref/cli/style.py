"""``mmpref style-score`` and ``mmpref compare-style``: style alignment of image folders
(:mod:`mmpref.metrics.report`)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

_CLIP_HELP = (
    "open_clip model name, or local-dir:FOLDER (open_clip_config.json + weights). Weights are never "
    "downloaded: give a plain name together with --clip-weights, or a local-dir: folder "
    "(default: %(default)s)"
)
_WEIGHTS_HELP = (
    "local open_clip checkpoint file for --clip-model, or a pretrained tag (e.g. openai) whose weights are "
    "already in the Hugging Face cache; ignored for local-dir:"
)


def _clip(args: argparse.Namespace):
    from mmpref.metrics.report import ClipOptions

    return ClipOptions(args.clip_model, args.clip_weights, device=args.device, batch_size=args.batch_size,
                       cache_dir=args.cache_dir, use_cache=not args.no_cache)  # fmt: skip


def _bootstrap(args: argparse.Namespace) -> dict:
    return {"n_resamples": args.n_resamples, "confidence": args.confidence, "seed": args.seed}


@contextmanager
def _skips_listed() -> Iterator[None]:
    """Within: no unreadable-image warnings, since :func:`_print_skipped` lists those files afterwards."""
    from mmpref.metrics.clip_embedder import BadImageWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        yield


def _print_skipped(skipped: Mapping[Path, str]) -> None:
    if skipped:
        listing = "\n".join(f"  {p}: {why}" for p, why in skipped.items())
        print(f"warning: skipped {len(skipped)} unreadable image(s):\n{listing}", file=sys.stderr)


def _style_score(args: argparse.Namespace) -> int:
    from mmpref.metrics.report import format_table, run_style_score

    with _skips_listed():
        result, sheet = run_style_score(
            args.generated,
            args.style_refs,
            out=args.out,
            clip=_clip(args),
            prompts=args.prompts,
            style_names=args.style_names,
            target=args.target,
            style_template=args.style_template,
            sheet_k=args.sheet_k,
            on_bad_images=args.on_bad_images,
            **_bootstrap(args),
        )
    _print_skipped(result.skipped)
    print(format_table(result.metrics))
    print(f"report: {args.out}\ncontact sheet: {sheet}")
    return 0


def _compare_style(args: argparse.Namespace) -> int:
    from mmpref.metrics.report import format_table, run_compare_style

    with _skips_listed():
        result = run_compare_style(
            args.a,
            args.b,
            args.style_refs,
            out=args.out,
            clip=_clip(args),
            tie_tolerance=args.tie_tolerance,
            on_bad_images=args.on_bad_images,
            **_bootstrap(args),
        )
    _print_skipped(result.skipped)
    if result.only_in_a or result.only_in_b:
        print(
            f"note: {len(result.only_in_a)} image(s) only in A and {len(result.only_in_b)} only in B "
            "are not compared",
            file=sys.stderr,
        )
    print(format_table(result.metrics))
    if args.out:
        print(f"report: {args.out}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    from mmpref.metrics.clip_embedder import ON_BAD_IMAGES, default_cache_dir
    from mmpref.metrics.style import DEFAULT_RESAMPLES

    p.add_argument(
        "--style-refs",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder of reference images in the target style",
    )
    p.add_argument("--clip-model", default="ViT-B-32", metavar="NAME", help=_CLIP_HELP)
    p.add_argument("--clip-weights", default=None, metavar="FILE", help=_WEIGHTS_HELP)
    p.add_argument(
        "--device", default="auto", metavar="DEV", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"embedding cache, keyed by model and file content (default: {default_cache_dir()})",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument(
        "--on-bad-images",
        choices=ON_BAD_IMAGES,
        default="skip",
        help="unreadable image files: skip them with a warning naming each, or fail (default: skip)",
    )
    p.add_argument(
        "--n-resamples",
        type=int,
        default=DEFAULT_RESAMPLES,
        metavar="N",
        help="bootstrap resamples (default: %(default)s)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        metavar="P",
        help="bootstrap interval level (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")


def register(sub: argparse._SubParsersAction) -> None:
    from mmpref.metrics.report import DEFAULT_STYLE_TEMPLATE

    p = sub.add_parser(
        "style-score",
        help="style-alignment scores of a folder of generated images",
        description="Style score (mean cosine of each image's CLIP embedding to the style references' "
        "centroid), optional zero-shot style accuracy and content score (CLIPScore), with bootstrap "
        "intervals. Writes a JSON report and, beside it, <out stem>_sheet.png with the best and worst "
        "images.",
    )
    p.add_argument("--generated", required=True, type=Path, metavar="DIR", help="folder of generated images")
    _add_common(p)
    p.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="FILE",
        help="enables the content score. Plain text (any suffix but .json/.jsonl): one prompt per line, "
        "matched to the images sorted by file name; .json: {file name: prompt}; .jsonl: records with "
        "file_name and prompt",
    )
    p.add_argument(
        "--style-names",
        default=None,
        metavar="NAMES",
        help='comma-separated candidate styles for zero-shot accuracy, e.g. "van gogh,sketch,photo"',
    )
    p.add_argument("--target", default=None, help="the target style, one of --style-names")
    p.add_argument(
        "--style-template",
        default=DEFAULT_STYLE_TEMPLATE,
        metavar="TEMPLATE",
        help="text prompt per style name, {} is replaced by the name (default: %(default)r)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("style_report.json"),
        metavar="FILE",
        help="JSON report path (default: %(default)s)",
    )
    p.add_argument(
        "--sheet-k",
        type=int,
        default=8,
        metavar="K",
        help="best and worst K images on the contact sheet (default: %(default)s)",
    )
    p.set_defaults(func=_style_score)

    p = sub.add_parser(
        "compare-style",
        help="win rate of set A over set B by style score, images paired by file name",
        description="Pairs the images of --a and --b by file name and reports the share of pairs where A's "
        "style score beats B's (ties count 1/2), with a bootstrap interval over pairs.",
    )
    p.add_argument("--a", required=True, type=Path, metavar="DIR", help="folder of images from model A")
    p.add_argument("--b", required=True, type=Path, metavar="DIR", help="folder of images from model B")
    _add_common(p)
    p.add_argument(
        "--tie-tolerance",
        type=float,
        default=0.0,
        help="|score A - score B| at or below this is a tie (default: 0)",
    )
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="optional JSON report path")
    p.set_defaults(func=_compare_style)
