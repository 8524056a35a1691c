"""Refined DPO (rDPO, Gallego 2024, arXiv 2402.08005): synthetic self-critique data, reward scoring, evaluation.

The loss itself is ``loss.type: rdpo`` of the training loop (p = σ((s_w − s_l)/τ_r) from the
``score_chosen`` / ``score_rejected`` columns this package writes). Here live the three commands
around it: ``mmpref synth`` (:func:`run_synth`), ``mmpref score`` (:func:`run_score`) and
``mmpref eval text`` / its alias ``mmpref eval-reward`` (:func:`run_eval_text`).

Names are imported on first use, so ``mmpref --help`` does not pay for transformers/datasets.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvalRewardConfig": "config",
    "ScoreConfig": "config",
    "SynthConfig": "config",
    "load_rdpo_config": "config",
    "RULES": "config",
    "compare_rewards": "reward",
    "load_reward": "reward",
    "run_eval_reward": "reward",
    "run_eval_text": "reward",
    "run_score": "reward",
    "run_synth": "synth",
    "make_tiny_reward_model": "tiny_models",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"mmpref.rdpo.{_EXPORTS[name]}"), name)
