"""``mmpref synth``, ``mmpref score`` and ``mmpref eval-reward``: the rDPO data and evaluation commands.

Each takes a YAML config (its own keys, or a file with ``synth:`` / ``score:`` / ``eval:``
sections) plus ``dotted.key=value`` overrides. Config errors raise ``ConfigError``, which
``mmpref.cli.main`` turns into a message naming the key and exit code 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _synth(args: argparse.Namespace) -> int:
    from mmpref.rdpo.config import load_rdpo_config
    from mmpref.rdpo.synth import run_synth

    report = run_synth(load_rdpo_config("synth", args.config, args.overrides))
    print(report.summary())
    return 0


def _score(args: argparse.Namespace) -> int:
    from mmpref.rdpo.config import load_rdpo_config
    from mmpref.rdpo.reward import run_score

    report = run_score(load_rdpo_config("score", args.config, args.overrides))
    print(report.summary())
    return 0


def _eval_reward(args: argparse.Namespace) -> int:
    """``mmpref eval-reward``: an alias of ``mmpref eval text`` (same config, same report)."""
    from mmpref.metrics.evaluate import eval_text_command

    return eval_text_command(args)


def _add(subparsers, name: str, help: str, func) -> None:
    p = subparsers.add_parser(name, help=help)
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. generation.batch_size=4")
    p.set_defaults(func=func)


def add_rdpo_commands(subparsers) -> None:
    """Register ``synth``, ``score`` and ``eval-reward`` on the ``mmpref`` sub-command parser."""
    _add(subparsers, "synth", "self-critique preference data from a teacher LM (rDPO)", _synth)
    _add(subparsers, "score", "add score_chosen / score_rejected from a reward model or rule:NAME", _score)
    _add(subparsers, "eval-reward", "alias of `mmpref eval text`: reward-judged win rate against the reference",
         _eval_reward)
