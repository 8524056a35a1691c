"""``mmpref synth`` and ``mmpref score``: the rDPO data commands (``eval-reward``: :mod:`mmpref.cli.evaluate`).

Each takes a YAML config (its own keys, or a file with ``synth:`` / ``score:`` sections) plus
``dotted.key=value`` overrides; config errors raise ``ConfigError`` naming the key (exit code 2).
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


def add_config_command(sub: argparse._SubParsersAction, name: str, help: str, func, **kwargs) -> None:
    """A command of a YAML config and ``dotted.key=value`` overrides (the rDPO commands, ``eval text``)."""
    p = sub.add_parser(name, help=help, **kwargs)
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. generation.batch_size=4")
    p.set_defaults(func=func)


def register(sub: argparse._SubParsersAction) -> None:
    add_config_command(sub, "synth", "self-critique preference data from a teacher LM (rDPO)", _synth)
    add_config_command(
        sub, "score", "add score_chosen / score_rejected from a reward model or rule:NAME", _score
    )
