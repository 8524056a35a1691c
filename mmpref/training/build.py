"""A run's build: the task's stages called in order, each taking what the one before returned
(docs/design.md §3). The plan (:mod:`mmpref.training.plan`) has checked the config before this runs."""

from __future__ import annotations

import importlib
import logging

from accelerate import Accelerator

from mmpref.data.splits import Splits
from mmpref.training.config import TrainConfig
from mmpref.training.plan import DEFAULT_EPOCHS, RunPlan, plan, schedule_length
from mmpref.training.task import Task

logger = logging.getLogger(__name__)

TASKS = {"text": "mmpref.training.text_task:TextTask", "diffusion": "mmpref.training.diffusion_task:DiffusionTask"}


def make_task(run_plan: RunPlan, accelerator: Accelerator) -> Task:
    """The task of the plan's modality; its constructor only stores the plan and the accelerator."""
    module, name = TASKS[run_plan.modality].split(":")
    return getattr(importlib.import_module(module), name)(run_plan, accelerator)


def build(run_plan: RunPlan, accelerator: Accelerator) -> tuple[Task, int]:
    """The run's stages in order (:class:`~mmpref.training.task.Task`), each taking what the one before returned:
    validated rows, the schedule checked against them, the models, the artifacts batches read, the reference,
    the module to train. Returns the task (holding all of it) and the number of optimizer steps."""
    task = make_task(run_plan, accelerator)
    splits = task.prepare_splits()
    max_steps = check_schedule(run_plan, splits)
    models = task.load_models()
    splits = task.build_artifacts(models, splits)
    task.make_reference(models, splits)
    task.wrap_for_training(models)
    return task, max_steps


def build_task(cfg: TrainConfig, accelerator: Accelerator, given: dict | None = None) -> Task:
    """The plan and the built task of ``cfg`` (:func:`build`), for scripts that drive a task themselves."""
    return build(plan(cfg, accelerator, given), accelerator)[0]


def check_schedule(run_plan: RunPlan, splits: Splits) -> int:
    """``max_steps``, or the steps of ``num_epochs`` over the usable training rows; a
    :class:`~mmpref.data.errors.DataError` when leaving out bad rows left too few for one optimizer step."""
    cfg = run_plan.cfg
    if run_plan.streamed:  # no length to count: the plan required max_steps
        return cfg.max_steps
    size = len(splits.train)
    labels = getattr(splits.train, "labels", None) if cfg.rpo.balance_unpaired else None
    max_steps = schedule_length(cfg, size, labels, run_plan.processes)
    if cfg.max_steps is None:
        logger.info("%d steps: %s epochs of the training rows", max_steps, cfg.num_epochs or DEFAULT_EPOCHS)
    return max_steps
