"""The ``mmpref`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# `mmpref train` exit codes besides 0: 1 a non-finite loss or gradient stopped the run; 2 a config,
# data or checkpoint problem stopped it before training; 75 (sysexits' EX_TEMPFAIL) SIGTERM / SIGINT
# stopped it at a step boundary after saving a checkpoint, and `--resume` continues it.
EXIT_NONFINITE = 1
EXIT_INTERRUPTED = 75
TINY_SCORER_KINDS = ("pickscore", "hpsv2", "imagereward", "aesthetic")  # clipscore takes `make-tiny clip`
QUIET_HELP = "warnings and errors only: no info messages, no progress bars (before or after the command)"


def _train(args: argparse.Namespace) -> int:
    from mmpref.training import load_config, train
    from mmpref.training.loop import NonFiniteLossError, TrainingInterrupted

    cfg = load_config(args.config, args.overrides)
    try:
        final = train(cfg, resume=args.resume)
    except TrainingInterrupted as e:
        print(f"mmpref train: {e}; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLossError as e:
        print(f"mmpref train: error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    print(f"final model: {final}")
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from mmpref.tiny_models import MAKERS, pretrain_tiny_sd15
    from mmpref.training.config import ConfigError

    if args.kind in TINY_SCORER_KINDS:  # a scorer in its authors' layout, for `mmpref eval images` demos
        from mmpref.metrics.tiny_scorers import TINY_SCORERS

        path = TINY_SCORERS[args.kind](args.out_dir, seed=args.seed)
    elif args.pretrain_on is None:
        path = MAKERS[args.kind](args.out_dir, seed=args.seed)
    else:  # a tiny SD 1.5 whose UNet already denoises the task's images: a reference worth aligning
        import tempfile

        if args.kind != "sd15":
            raise ConfigError("--pretrain-on: only for make-tiny sd15")
        with tempfile.TemporaryDirectory() as tmp:
            random_init = MAKERS["sd15"](Path(tmp) / "sd15", seed=args.seed)
            path = pretrain_tiny_sd15(random_init, args.pretrain_on, args.out_dir, unet_steps=args.unet_steps,
                                      vae_steps=args.vae_steps, seed=args.seed)  # fmt: skip
    print(f"tiny {args.kind} written to {path}")
    return 0


def _commands(sub: argparse._SubParsersAction):
    """Every command parser, nested ones (``eval images``) included."""
    for command in sub.choices.values():
        yield command
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from _commands(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpref", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="preference-train a model from a YAML config")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. loss.type=rpo max_steps=20")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the latest checkpoint in output_dir, or from the given one")  # fmt: skip
    p.set_defaults(func=_train)

    p = sub.add_parser("make-tiny", help="write a tiny random model folder (for demos and tests)")
    p.add_argument("kind", choices=["lm", "sd15", "sdxl", "clip", *TINY_SCORER_KINDS])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-on", type=Path, default=None, metavar="DATASET",
                   help="sd15: train the UNet on plain denoising of this image dataset's images")  # fmt: skip
    p.add_argument("--unet-steps", type=int, default=400, help="with --pretrain-on: UNet denoising steps")
    p.add_argument("--vae-steps", type=int, default=0,
                   help="with --pretrain-on: first train the VAE as an autoencoder of the images (600: pictures)")  # fmt: skip
    p.set_defaults(func=_make_tiny)

    from mmpref.training.sampling import add_sample_command

    add_sample_command(sub)
    from mmpref.metrics.report import add_style_commands

    add_style_commands(sub)
    from mmpref.rdpo.cli import add_rdpo_commands

    add_rdpo_commands(sub)
    from mmpref.metrics.evaluate import add_eval_commands

    add_eval_commands(sub)  # mmpref eval images | text
    for command in _commands(sub):  # --quiet after the command too, listed in each `mmpref CMD --help`
        command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    return parser


class _Stderr(logging.StreamHandler):
    """A handler writing to the ``sys.stderr`` of each message (tests and wrappers replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(quiet: bool = False) -> None:
    """mmpref's log messages to stderr: info and up from the main process; warnings only when quiet,
    or on the other processes of a launched run (so each message appears once)."""
    log = logging.getLogger("mmpref")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    other_process = os.environ.get("RANK", "0") != "0"
    log.setLevel(logging.WARNING if quiet or other_process else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    from mmpref.data import DataError
    from mmpref.progress import quiet_bars
    from mmpref.training.checkpoint import CheckpointError
    from mmpref.training.config import ConfigError
    from mmpref.training.model_card import HubUploadError

    args = build_parser().parse_args(argv)
    configure_logging(args.quiet)
    try:
        with quiet_bars(args.quiet):
            return args.func(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"mmpref {args.command}: error: {e}", file=sys.stderr)
        return 2
    except HubUploadError as e:  # the run itself is complete on disk: say so, without a traceback
        print(f"mmpref {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
