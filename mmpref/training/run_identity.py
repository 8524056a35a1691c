"""What a run is, recorded in every checkpoint and checked on ``--resume``, before any weights load.

:func:`run_identity` is the model, the data and the config keys that change the data order, the rows' content or
the objective; every checkpoint's trainer state holds it (``run_identity``). :func:`check_resume` compares a
checkpoint's with the run's: a difference stops the run (:class:`RunChanged`, exit 2) naming each change, unless
the user allows changes; a checkpoint from before identities were recorded resumes with a warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, is_dataclass
from pathlib import Path

from mmpref.training.checkpoint import STATE_FILE, CheckpointError

logger = logging.getLogger(__name__)

# Config keys whose change makes the saved data position point at other rows: a changed one restarts the data.
ORDER_KEYS = ("seed", "batch_size", "train_split", "dataset_config", "dataset_revision", "eval_split", "streaming",
              "shuffle_buffer", "on_bad_rows", "rpo.balance_unpaired")  # fmt: skip
# Config keys that change what the rows hold or what is optimised (whole sections for loss, rpo and lora).
CONTENT_KEYS = ("gradient_accumulation_steps", "max_length", "max_prompt_length", "truncation_mode",
                "image_root", "diffusion.resolution", "diffusion.center_crop", "diffusion.random_flip",
                "diffusion.prompt_dropout", "loss", "rpo", "lora")  # fmt: skip
IN_MEMORY = "in-memory"


class RunChanged(CheckpointError):
    """``--resume`` onto a checkpoint written for another model, other data or another objective."""


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return asdict(cfg) if is_dataclass(cfg) else cfg


def _data(data) -> dict | None:
    """One source's name and identity: its rows' (:attr:`RowSource.identity`), or a stream's name and split."""
    if data is None:
        return None
    if data.rows is not None:
        return {"name": str(data.name), "identity": data.rows.identity}
    options = ":".join(f"{k}={v}" for k, v in sorted(data.options.items()) if v is not None)
    return {"name": str(data.name), "identity": f"stream:{data.name}:{options}"}


def run_identity(run_plan) -> dict:
    """The identity of the run ``run_plan`` (a :class:`~mmpref.training.plan.RunPlan`) describes, as JSON values."""
    source = run_plan.source
    model = {"name": IN_MEMORY, "identity": IN_MEMORY} if source is None else {"name": source.name,
                                                                             "identity": source.identity()}  # fmt: skip
    identity = {"model": model, "dataset": _data(run_plan.train), "eval_dataset": _data(run_plan.eval),
                "config": {key: _get(run_plan.cfg, key) for key in (*ORDER_KEYS, *CONTENT_KEYS)}}  # fmt: skip
    return json.loads(json.dumps(identity))  # as a checkpoint gives it back: tuples as lists


def _source_change(what: str, old: dict | None, new: dict | None) -> str | None:
    if (old or {}).get("identity") == (new or {}).get("identity"):
        return None

    def name(d: dict | None) -> str:
        if d is None:
            return "none"
        return d["name"] if d["name"] == d["identity"] else f"{d['name']} ({d['identity']})"

    verb = "loads" if what == "model" else "reads"
    return f"the checkpoint was written for {what} {name(old)}, this run {verb} {name(new)}"


def differences(recorded: dict, current: dict) -> tuple[list[str], bool]:
    """What changed from ``recorded`` to ``current`` (:func:`run_identity`), each named, and whether the data
    order did (the training data, or an :data:`ORDER_KEYS` key). Keys a checkpoint does not record (written
    before they were) are not compared."""
    changes = [c for what in ("model", "dataset", "eval_dataset") if what in recorded
               and (c := _source_change(what.replace("_", " "), recorded[what], current[what]))]  # fmt: skip
    order = "dataset" in recorded and _source_change("", recorded["dataset"], current["dataset"]) is not None
    old_config = recorded.get("config", {})
    for key, new in current["config"].items():
        if key not in old_config or old_config[key] == new:
            continue
        old = old_config[key]
        order |= key in ORDER_KEYS
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{key}.{k} {old[k]} → {new[k]}" for k in sorted(new) if k in old and old[k] != new[k]]
        else:
            changes.append(f"{key} {old} → {new}")
    return changes, order


def check_resume(checkpoint: Path, current: dict, allow_changes: bool, main_process: bool = True) -> bool:
    """Compare ``checkpoint``'s recorded identity with the run's ``current`` one; returns whether the data must
    restart from its first row (changes allowed, the data order among them).

    Raises :class:`RunChanged` listing the changes unless ``allow_changes``; then they are logged as a warning.
    A checkpoint without a recorded identity resumes with a warning that it cannot be checked."""
    recorded = json.loads((checkpoint / STATE_FILE).read_text()).get("run_identity")
    if recorded is None:
        if main_process:
            logger.warning(f"--resume: {checkpoint} records no run identity (written by an older mmpref): cannot "
                           "check that it was written for this model, data and config")  # fmt: skip
        return False
    changes, order = differences(recorded, current)
    if not changes:
        return False
    if not allow_changes:
        raise RunChanged(f"--resume: {'; '.join(changes)}. Pass --allow-changes (train(..., allow_changes=True)) "
                         f"to resume the weights anyway (checkpoint {checkpoint})")  # fmt: skip
    if main_process:
        then = ("the data restarts from its first row (epoch 0, batch 0); the step count and the LR schedule "
                "continue") if order else "the data position, the step count and the LR schedule continue"  # fmt: skip
        logger.warning(f"--resume with --allow-changes: {'; '.join(changes)}; resuming the weights and optimizer "
                       f"of {checkpoint}: {then}")  # fmt: skip
    return order
