"""The ``mmpref`` command line: every command's arguments, help and entry point, one error handler.

The commands, by family (each module's ``register`` adds its parsers, in the order of ``mmpref --help``):

- :mod:`mmpref.cli.train`: ``train``, ``validate-data``, ``cache``, ``make-tiny``, ``sample``;
- :mod:`mmpref.cli.style`: ``style-score``, ``compare-style``;
- :mod:`mmpref.cli.rdpo`: ``synth``, ``score``;
- :mod:`mmpref.cli.evaluate`: ``eval-reward``, ``eval images``, ``eval text``.

A command's function takes the parsed arguments, calls the Python API and prints; :func:`main` turns the
errors a user can fix (:func:`user_errors`) into ``mmpref <command>: error: <message>`` on stderr and exit
code 2, and a full disk (:class:`~mmpref.errors.DiskFullError`) into that message and exit code 74.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mmpref.cli import evaluate, rdpo, style, train
from mmpref.cli.train import EXIT_DISK_FULL, EXIT_INTERRUPTED, EXIT_NONFINITE

__all__ = ["EXIT_DISK_FULL", "EXIT_INTERRUPTED", "EXIT_NONFINITE", "build_parser", "configure_logging", "main",
           "user_errors"]  # fmt: skip

DESCRIPTION = "The ``mmpref`` command line: a thin layer over the Python API."
QUIET_HELP = "warnings and errors only: no info messages, no progress bars (before or after the command)"
FAMILIES = (train, style, rdpo, evaluate)


def _commands(sub: argparse._SubParsersAction):
    """Every command parser, nested ones (``eval images``) included."""
    for command in sub.choices.values():
        yield command
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from _commands(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpref", description=DESCRIPTION)
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.register(sub)
    for command in _commands(sub):  # --quiet after the command too, listed in each `mmpref CMD --help`
        command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
        if command.get_default("func") is not None:  # the name errors give: `eval images`, not just `eval`
            command.set_defaults(command_name=command.prog.removeprefix(f"{parser.prog} "))
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


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user fixes by changing a config, an argument or an input: exit code 2, no traceback."""
    from mmpref.data import DataError
    from mmpref.errors import ConfigError, LowDiskSpaceError, ModelFileError
    from mmpref.metrics.clip_embedder import BadImageError, EmbedderError
    from mmpref.metrics.report import StyleInputError
    from mmpref.training.checkpoint import CheckpointError
    from mmpref.training.run_lock import OutputDirInUse

    return (ConfigError, DataError, ModelFileError, CheckpointError, StyleInputError, BadImageError, EmbedderError,
            LowDiskSpaceError, FileNotFoundError, NotADirectoryError, OutputDirInUse)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.quiet)
    from mmpref.errors import DiskFullError
    from mmpref.progress import quiet_bars
    from mmpref.training.model_card import HubUploadError

    fixable = user_errors()
    try:
        with quiet_bars(args.quiet):
            return args.func(args)
    except fixable as e:
        print(f"mmpref {args.command_name}: error: {e}", file=sys.stderr)
        return 2
    except DiskFullError as e:  # what was being written, the sizes, and (a run) the checkpoint to resume from
        print(f"mmpref {args.command_name}: error: {e}", file=sys.stderr)
        return EXIT_DISK_FULL
    except HubUploadError as e:  # the run itself is complete on disk: say so, without a traceback
        print(f"mmpref {args.command_name}: error: {e}", file=sys.stderr)
        return 1
