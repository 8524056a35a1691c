"""``mmpref eval images``, ``mmpref eval text`` and its alias ``mmpref eval-reward``: a trained model against
its reference (:mod:`mmpref.metrics.evaluate`, :func:`mmpref.rdpo.reward.run_eval_text`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmpref.cli.rdpo import add_config_command


def _eval_images(args: argparse.Namespace) -> int:
    from mmpref.metrics.evaluate import run_eval_images

    ev = run_eval_images(
        args.samples,
        reference=args.reference,
        trained=args.trained,
        scorers=args.scorers,
        scorer_models=args.scorer_model,
        prompts=args.prompts,
        out=args.out,
        device=args.device,
        batch_size=args.batch_size,
        n_resamples=args.n_resamples,
        confidence=args.confidence,
        seed=args.seed,
        sheet_rows=args.sheet_rows,
    )
    if ev.only_in_reference or ev.only_in_trained:
        print(f"note: {len(ev.only_in_reference)} image(s) only in {ev.reference} and {len(ev.only_in_trained)} "
              f"only in {ev.trained} are not compared", file=sys.stderr)  # fmt: skip
    print(ev.table)
    print(f"report: {ev.report_path}\ntable: {ev.table_path}\ncontact sheet: {ev.sheet_path}")
    return 0


def _eval_text(args: argparse.Namespace) -> int:
    from mmpref.rdpo.config import load_rdpo_config
    from mmpref.rdpo.reward import run_eval_text

    cfg = load_rdpo_config("eval", args.config, args.overrides)
    result = run_eval_text(cfg)
    print(result.summary(cfg))
    print(f"written to {cfg.output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mmpref.metrics.scorers import SCORERS
    from mmpref.metrics.stats import DEFAULT_RESAMPLES

    add_config_command(sub, "eval-reward", "alias of `mmpref eval text`: reward-judged win rate against the reference",
                       _eval_text)  # fmt: skip

    p = sub.add_parser("eval", help="a trained model against its reference: scores, win rates, intervals",
                       description="A trained model against its reference on the same prompts and "
                       "seeds: `images` with preference scorers, `text` with reward models; means, win "
                       "rates (ties 1/2) and bootstrap intervals (docs/evaluation.md).")  # fmt: skip
    eval_sub = p.add_subparsers(dest="eval_command", required=True)

    q = eval_sub.add_parser(
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
    q.set_defaults(func=_eval_images)

    add_config_command(
        eval_sub,
        "text",
        "reward-judged win rates, answer lengths and implicit reward accuracy of a trained LM",
        _eval_text,
        description="Generates answers to held-out prompts with the trained model and its reference (same "
        "seeds), judges them with one or more reward models (win rate, ties 1/2, bootstrap interval over "
        "prompts), reports each side's mean answer length in tokens and, with `preferences`, the held-out "
        "implicit reward accuracy. The config is eval-reward's (an `eval:` section or top-level keys).",
    )
