"""The one training loop, on Accelerate, for every modality and loss.

A *task* (a :class:`~mmpref.training.task.Task`: ``TextTask``, ``DiffusionTask``) owns the model, the data
and the reference; it turns a batch into :class:`~mmpref.losses.LogRatios`. This loop owns
everything else: optimizer, schedule, accumulation, logging, evaluation, checkpoints, resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from mmpref.data.splits import epoch_order
from mmpref.files import atomic_folder, is_disk_full, raise_if_disk_full
from mmpref.losses import LogRatios, Objective
from mmpref.progress import progress
from mmpref.training.build import build
from mmpref.training.checkpoint import (
    STATE_FILE,
    Checkpointer,
    check_weights_only,
    find_checkpoint,
    rewind_metrics,
)
from mmpref.training.config import TrainConfig, to_dict
from mmpref.training.disk import DiskNeeds, check_free_space, explain_disk_full, model_folder, run_needs
from mmpref.training.distributed import sharding
from mmpref.training.events import Callback, NonFiniteLossError, StopRequest, TrainingInterrupted
from mmpref.training.model_card import push_to_hub, write_model_card
from mmpref.training.plan import plan
from mmpref.training.plots import plot_metrics
from mmpref.training.run_identity import check_resume, run_identity
from mmpref.training.run_lock import lock_output_dir
from mmpref.training.run_report import peak_host_rss_gib, summary_line
from mmpref.training.task import Task

logger = logging.getLogger(__name__)


def build_optimizer(cfg: TrainConfig, params: list) -> torch.optim.Optimizer:
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)  # fmt: skip
    if cfg.optimizer == "adamw8bit":  # the plan checked that bitsandbytes is installed
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _batches(collate, order, epoch: int, batch_size: int, skip: int, accelerator):
    """This process's batches of epoch ``epoch``'s ``order``, after skipping ``skip`` of them.

    ``collate(rows, epoch=epoch)`` builds each: randomness a task draws per row comes from the run's seed, the
    epoch and the row, never from a global RNG's position, which the loader's read-ahead of one batch (and
    its replay after a resume) would shift.

    ``order`` is a list of row positions, which Accelerate shards over the processes, or a stream (an
    ``IterableDataset`` of rows) that reads this process's own shards already; a resumed stream skips by
    reading its first ``skip`` batches again."""
    loader = DataLoader(order, batch_size=batch_size, shuffle=False, collate_fn=partial(collate, epoch=epoch),
                        drop_last=True)  # fmt: skip
    if not isinstance(order, torch.utils.data.IterableDataset):
        loader = accelerator.prepare_data_loader(loader)
    return iter(accelerator.skip_first_batches(loader, skip) if skip else loader)


@torch.no_grad()
def evaluate(task: Task, model, cfg: TrainConfig, objective: Objective, accelerator: Accelerator,
             step: int = 0) -> dict[str, float]:  # fmt: skip
    """Held-out loss and reward metrics; plus, for a task that generates samples (diffusion), their scores."""
    samples = task.sample_and_score(model, step)
    if task.eval is None:
        return samples
    model.eval()
    loader = accelerator.prepare_data_loader(
        DataLoader(list(range(len(task.eval))), batch_size=cfg.eval_batch_size, collate_fn=task.collate_eval)
    )
    losses, compared, labels = [], [], []
    for batch in loader:
        with accelerator.autocast():  # the numerics of the training forward (and of the precomputed reference)
            rows = task.rows(model, batch)
            losses.append(objective(rows).loss.float().reshape(1))
        compared.append(accelerator.gather_for_metrics(objective.compared(rows).float()))
        if rows.labels is not None:
            labels.append(accelerator.gather_for_metrics(rows.labels))
    model.train()
    loss = accelerator.gather(torch.cat(losses)).mean().item()
    metrics = objective.eval_metrics(torch.cat(compared), torch.cat(labels) if labels else None)
    return {"eval/loss": loss, **metrics, **samples}


def gather_rows(rows: LogRatios, accelerator: Accelerator) -> LogRatios:
    """Concatenate every process's rows; the local slice keeps its autograd graph.

    Each process then computes the same global loss, but gradients flow only into its own
    rows, so the caller scales the loss by the number of processes before backward
    (:meth:`~mmpref.losses.Objective.loss_scale`): DDP's gradient averaging then gives exactly
    the gradient of the global loss.
    """
    if accelerator.num_processes == 1:
        return rows
    gathered = {}
    for f in fields(rows):
        value = getattr(rows, f.name)
        if not isinstance(value, torch.Tensor):  # None, or the local metrics dict
            gathered[f.name] = value
            continue
        parts = [torch.empty_like(value) for _ in range(accelerator.num_processes)]
        torch.distributed.all_gather(parts, value.detach().contiguous())
        parts[accelerator.process_index] = value
        gathered[f.name] = torch.cat(parts)
    return replace(rows, **gathered)


def _checkpoint_state(state: dict, sums: dict[str, float], count: int, accelerator: Accelerator) -> dict:
    """The trainer state plus the metric sums of the log window still open, so a resume logs the same means."""
    if accelerator.num_processes > 1 and sums:
        local = {k: torch.tensor(v, dtype=torch.float64, device=accelerator.device) for k, v in sums.items()}
        sums = {k: v.item() for k, v in accelerator.reduce(local, "mean").items()}
    return {**state, "pending_metrics": {"sums": sums, "count": count}}


def _zero_nonfinite(rows: LogRatios) -> tuple[LogRatios, list[int]]:
    """Zero the model's NaN/inf outputs (the loss core refuses them; the step is skipped or stopped
    anyway) and name the dataset rows that had them."""
    bad = ~torch.isfinite(rows.logratios).all(dim=1)
    if rows.policy_logps is not None:
        bad |= ~torch.isfinite(rows.policy_logps).all(dim=1)
    if not bad.any():
        return rows, []
    zeroed = {name: getattr(rows, name).nan_to_num(0.0, 0.0, 0.0) for name in ("logratios", "policy_logps")
              if getattr(rows, name) is not None}  # fmt: skip
    return replace(rows, **zeroed), rows.row_index[bad].tolist()


def _skip_or_stop(problem: tuple[str, list[int]], step: int, state: dict, cfg: TrainConfig,
                  accelerator: Accelerator) -> None:  # fmt: skip
    """A non-finite loss or gradient: raise (``nonfinite: stop`` or too many skips) or count a skipped step."""
    what, rows = problem
    where = f"step {step}: {what}; dataset rows {rows}"
    if cfg.nonfinite == "stop":
        raise NonFiniteLossError(f"{where} (nonfinite: skip would skip such steps)")
    state["skipped_steps"] += 1
    if state["skipped_steps"] > cfg.max_skipped_steps:
        raise NonFiniteLossError(
            f"{where}: {state['skipped_steps']} steps skipped, more than max_skipped_steps={cfg.max_skipped_steps}"
        )
    if accelerator.is_main_process:
        logger.warning(f"{where}: optimizer step skipped "
                       f"({state['skipped_steps']} of at most {cfg.max_skipped_steps})")  # fmt: skip


def train(
    cfg: TrainConfig,
    resume: str | None = None,
    *,
    train_dataset=None,
    eval_dataset=None,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    callbacks: Sequence[Callback] = (),
    allow_changes: bool = False,
) -> Path:
    """Train as configured; returns the folder of the final model (``output_dir/final``).

    ``resume`` ("latest" or a checkpoint folder) continues a run exactly. A checkpoint written for another
    model, other data or another objective is refused (:class:`~mmpref.training.run_identity.RunChanged`)
    unless ``allow_changes``: then its weights and optimizer are resumed, with the data from its first row
    when the data order changed. SIGTERM or SIGINT during the
    steps saves a checkpoint at the next step boundary and raises :class:`TrainingInterrupted`.
    One run at a time per ``output_dir``: another one's lock there raises
    :class:`~mmpref.training.run_lock.OutputDirInUse`.
    A full disk raises :class:`~mmpref.errors.DiskFullError` naming what was being written and the checkpoint
    to resume from.

    In-memory work, as with TRL's trainer: ``train_dataset`` / ``eval_dataset`` (a ``datasets.Dataset`` or
    a list of row dicts) replace ``dataset`` / ``eval_dataset``; ``model`` and ``tokenizer`` (text: an
    already loaded causal LM and its tokenizer) replace ``model``. Rows are validated as files are.
    """
    if allow_changes and not resume:  # the CLI refuses the flag alone with exit 2 (mmpref.cli.train)
        raise ValueError("allow_changes: only with resume (train(..., resume=..., allow_changes=True))")
    stop = StopRequest()
    given = dict(train_dataset=train_dataset, eval_dataset=eval_dataset, model=model, tokenizer=tokenizer)
    try:
        return _train(cfg, resume, stop, given, list(callbacks), allow_changes)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        error = explain_disk_full(exc, Path(cfg.output_dir))  # the same DiskFullError, or one made from exc
        if error is exc:
            raise
        raise error from exc
    finally:
        stop.disarm()


def _train(cfg: TrainConfig, resume: str | None, stop: StopRequest, given: dict, callbacks: list,
           allow_changes: bool = False) -> Path:  # fmt: skip
    with ExitStack() as held:  # what the run holds until it ends, however it ends: the output_dir lock
        run = _Run(cfg, stop, given, callbacks, held, resume, allow_changes)
        run.resume(resume)
        run.check_disk()
        if run.state["step"] == 0:
            run.log(evaluate(run.task, run.model, cfg, run.objective, run.accelerator), 0)
        run.start_steps()
        while run.state["step"] < run.max_steps:
            run.step()
        return run.finish()


def _make_accelerator(cfg: TrainConfig, trackers: list[str], out: Path) -> Accelerator:
    # Several processes and no GPU (e.g. `accelerate launch --multi_gpu --num_processes 2` on a
    # CPU machine): ask Accelerate for its multi-CPU (gloo) mode instead of silently running alone.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=multi_cpu,
        mixed_precision=cfg.mixed_precision,  # None: the launcher's (ACCELERATE_MIXED_PRECISION) or config file's
        log_with=trackers or None,
        project_dir=str(out),
    )


class _Run:
    """One training run; ``_train`` calls its phases in order: setup (``__init__``), :meth:`resume`,
    :meth:`start_steps`, :meth:`step` until ``max_steps``, :meth:`finish`.

    ``state`` is the trainer state a checkpoint stores; ``sums`` / ``count`` the open log window's metric
    sums and micro-batch count; ``units`` what the task counts, for the throughput report.
    """

    disk: DiskNeeds | None = None  # the estimate of a checkpoint and final/ (check_disk)

    # -- setup: accelerator, plan, the build's stages, optimizer and scheduler ---------------------
    def __init__(self, cfg: TrainConfig, stop: StopRequest, given: dict, callbacks: list, held: ExitStack,
                 resume: str | None = None, allow_changes: bool = False):  # fmt: skip
        self.cfg, self.stop, self.callbacks = cfg, stop, callbacks
        self.out = out = Path(cfg.output_dir)
        self.trackers = [t for t in cfg.report_to if t != "none"]
        self.accelerator = accelerator = _make_accelerator(cfg, self.trackers, out)
        # every config or data-shape mistake stops here, in seconds, before any weights load or anything is written
        self.plan = run_plan = plan(cfg, accelerator, given)
        self.source, self.objective = run_plan.source, run_plan.objective
        held.enter_context(lock_output_dir(out, accelerator))  # one run per output_dir, before anything is written
        # what a checkpoint must have been written for, checked before any weights load
        self.identity, self.checkpoint, self.restart_data = run_identity(run_plan), None, False
        if resume:
            self.checkpoint = find_checkpoint(out, resume, main_process=accelerator.is_main_process)
            self.restart_data = check_resume(self.checkpoint, self.identity, allow_changes, accelerator.is_main_process)
        if accelerator.is_main_process:
            (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        set_seed(cfg.seed)
        self.task, self.max_steps = build(run_plan, accelerator)
        self.accum = cfg.gradient_accumulation_steps
        # unpaired rows: balanced batches
        self.labels = self.task.train.labels if cfg.rpo.balance_unpaired else None
        model = self.task.model
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(cfg, self.params)
        # Not prepared: Accelerate would step a prepared scheduler once per process.
        self.scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=self.max_steps)  # fmt: skip
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(self.scheduler)
        for extra in self.task.checkpoint_objects():  # e.g. the diffusion EMA
            accelerator.register_for_checkpointing(extra)
        self.checkpointer = Checkpointer(accelerator, out / "checkpoints", cfg.keep_checkpoints)

    def order(self, epoch: int):
        """The training rows of ``epoch``: seeded positions, or for a streamed split its reshuffled stream."""
        if self.task.train.streamed:
            return self.task.train.stream(epoch)
        return epoch_order(len(self.task.train), self.cfg.seed, epoch, self.labels, self.cfg.batch_size)

    # -- resume ------------------------------------------------------------------------------------
    def resume(self, resume: str | None) -> None:
        """The state of the checkpoint ``resume`` names, or a fresh one; then the trackers start."""
        accelerator, out = self.accelerator, self.out
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0, "scaler_skipped_steps": 0}
        pending = {"sums": {}, "count": 0}
        if resume:
            ckpt = self.checkpoint  # found, and its identity checked, in __init__
            check_weights_only(ckpt)
            accelerator.load_state(str(ckpt))
            self.state.update(json.loads((ckpt / STATE_FILE).read_text()))
            pending = self.state.pop("pending_metrics", pending)
            if self.restart_data:  # --allow-changes with other data: from its first row
                self.state.update(epoch=0, batch_in_epoch=0)
            if accelerator.is_main_process:  # what comes after the checkpoint is logged again
                rewind_metrics(out / "metrics.jsonl", self.state["step"])
            accelerator.print(f"resumed from {ckpt} at step {self.state['step']}")
        if accelerator.is_main_process and not resume and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        self.state["run_identity"] = self.identity  # recorded in every checkpoint
        if self.trackers:
            accelerator.init_trackers("mmpref", config=_flat(to_dict(self.cfg)))
        # a resumed run completes the log window it stopped in
        self.sums: dict[str, float] = dict(pending["sums"])
        self.count: int = pending["count"]

    def log(self, values: dict, step: int) -> None:
        if self.trackers:
            self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
            for callback in self.callbacks:
                callback.on_log(step, values)

    def check_disk(self) -> None:
        """Before step 1: the checkpoints and final/ estimated against the free space of output_dir (a warning,
        or with fail_on_low_disk LowDiskSpaceError); the sizes also go into a disk-full message."""
        accelerator = self.accelerator
        self.disk = run_needs(self.cfg, accelerator.unwrap_model(self.model), self.params, self.task.checkpoint_objects(),
                              accelerator.num_processes, model_folder(self.source), self.max_steps, self.state["step"])  # fmt: skip
        check_free_space(self.cfg, self.disk, accelerator.is_main_process)

    def start_steps(self) -> None:
        """The batch iterator at the resumed position, the gradient checks, the progress bar, the signals."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        self.batches = _batches(self.task.collate_train, self.order(state["epoch"]), state["epoch"], cfg.batch_size,
                                state["batch_in_epoch"], accelerator)  # fmt: skip
        self.scale = self.objective.loss_scale(accelerator.num_processes)
        self.units, self.t0 = 0, time.perf_counter()
        # Gradients are checked here unless a loss scaler owns overflow: fp16's GradScaler skips those steps
        # itself; DeepSpeed keeps the gradients inside its engine and steps inside backward.
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.check_grads = accelerator.scaler is None and not deepspeed
        self.bar = progress(total=self.max_steps, initial=state["step"], desc="train", accelerator=accelerator)
        self.model.train()
        self.stop.arm()

    # -- one optimizer step ------------------------------------------------------------------------
    def step(self) -> None:
        """Accumulate, check, vote, apply, log; then evaluate, checkpoint or stop as due."""
        step_sums, step_rows, bad_loss = self._accumulate()
        grad_norm, problem = self._check_gradients(bad_loss, step_rows)
        problem, interrupted = self._vote(problem, step_rows)
        self.state["step"] += 1
        step = self.state["step"]
        self._apply(problem, grad_norm, step_sums, step)
        self.bar.update(1)
        if step % self.cfg.log_every == 0 or step == self.max_steps:
            self._log_window(step)
        self._step_boundary(step, interrupted)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        state = self.state
        try:
            batch = next(self.batches)
        except StopIteration:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            self.batches = _batches(self.task.collate_train, self.order(state["epoch"]), state["epoch"], self.cfg.batch_size, 0,
                                    self.accelerator)  # fmt: skip
            batch = next(self.batches)
        state["batch_in_epoch"] += 1
        return batch

    def _accumulate(self) -> tuple[dict[str, float], list[int], tuple[str, list[int]] | None]:
        """Forward and backward of the step's micro-batches: their summed metrics, their dataset rows, and
        the first non-finite loss or log-prob (what, and the micro-batch's rows), if any."""
        cfg, accelerator, model, accum = self.cfg, self.accelerator, self.model, self.accum
        step_sums: dict[str, float] = {}
        step_rows: list[int] = []
        bad_loss = None
        for micro in range(accum):
            batch = self._next_batch()
            sync = micro == accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    rows: LogRatios = self.task.rows(model, batch)
                    if cfg.rpo.global_batch:
                        rows = gather_rows(rows, accelerator)
                    rows, bad_rows = _zero_nonfinite(rows)
                    out_loss = self.objective(rows)
                if bad_loss is None and bad_rows:
                    bad_loss = (f"non-finite log-probs of dataset rows {bad_rows} in micro-batch {micro}",
                                batch["row_index"].tolist())  # fmt: skip
                if bad_loss is None and not torch.isfinite(out_loss.loss):
                    bad_loss = (f"non-finite loss {out_loss.loss.item()} in micro-batch {micro}",
                                batch["row_index"].tolist())  # fmt: skip
                # backward even so: under DDP every process must join the gradient all-reduce
                accelerator.backward(out_loss.loss * self.scale / accum)
            step_rows += batch["row_index"].tolist()
            for k, v in {"loss": out_loss.loss.detach(), **out_loss.metrics}.items():
                step_sums[k] = step_sums.get(k, 0.0) + float(v)
            self.units += self.task.count_units(batch)
        return step_sums, step_rows, bad_loss

    def _check_gradients(self, bad_loss: tuple[str, list[int]] | None, step_rows: list[int]):
        """Clip (or just measure) the gradient norm; the step's problem: a bad loss, else a non-finite norm."""
        grad_norm = None
        if self.cfg.max_grad_norm:
            grad_norm = self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        elif self.check_grads:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        problem = bad_loss
        if problem is None and self.check_grads and grad_norm is not None and not torch.isfinite(grad_norm):
            problem = (f"non-finite gradient (norm {float(grad_norm)}) from a finite loss", step_rows)
        return grad_norm, problem

    def _vote(self, problem: tuple[str, list[int]] | None, step_rows: list[int]):
        """The problem and the stop request of any process, known to all: (problem, interrupted)."""
        interrupted = self.stop.signal_name is not None
        accelerator = self.accelerator
        if accelerator.num_processes > 1:  # every process takes the same decisions
            flags = torch.tensor([problem is not None, interrupted], dtype=torch.float32)
            flags = accelerator.reduce(flags.to(accelerator.device), "sum")
            if problem is None and flags[0] > 0:
                problem = ("non-finite loss or gradient on another process", step_rows)
            interrupted = bool(flags[1] > 0)
        return problem, interrupted

    def _apply(self, problem: tuple[str, list[int]] | None, grad_norm, step_sums: dict[str, float],
               step: int) -> None:  # fmt: skip
        """Skip the step (or stop) on a problem; else step the optimizer, and the schedule and the task's
        hook unless the loss scaler skipped it, and add the step's metrics to the log window."""
        state, optimizer = self.state, self.optimizer
        if problem is not None:
            optimizer.zero_grad(set_to_none=True)
            _skip_or_stop(problem, step, state, self.cfg, self.accelerator)
            return
        optimizer.step()
        if self.accelerator.optimizer_step_was_skipped:  # GradScaler overflow: its business, lr waits too
            state["scaler_skipped_steps"] += 1
        else:
            self.scheduler.step()
            self.task.after_optimizer_step(self.model)
            if self.accelerator.is_main_process:
                for callback in self.callbacks:
                    callback.on_step_end(step, self.model)
            if grad_norm is not None:
                step_sums["grad_norm"] = float(grad_norm) * self.accum
            for k, v in step_sums.items():  # skipped steps stay out of the logged means
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.count += self.accum
        optimizer.zero_grad(set_to_none=True)

    def _log_window(self, step: int) -> None:
        """Log the means of the window's metrics (over the processes), then open a new window."""
        cfg, accelerator, state = self.cfg, self.accelerator, self.state
        means = {k: v / self.count for k, v in self.sums.items()} if self.count else {}
        if means:
            means = accelerator.reduce(_tensor(means, accelerator), "mean")
            means = {k: v.item() for k, v in means.items()}
        means["lr"] = self.scheduler.get_last_lr()[0]
        if cfg.nonfinite == "skip":
            means["skipped_steps"] = state["skipped_steps"]
        means.update(self.task.data_metrics() if accelerator.is_main_process else {})
        if accelerator.scaler is not None:
            means["scaler_skipped_steps"] = state["scaler_skipped_steps"]
        self.bar.set_postfix(
            loss=f"{means.get('loss', math.nan):.4f}",
            acc=f"{means.get('rewards/accuracies', math.nan):.2f}",
        )
        self.log(means, step)
        self.sums, self.count = {}, 0

    def _step_boundary(self, step: int, interrupted: bool) -> None:
        """Evaluate and checkpoint when due; after a signal, checkpoint and raise TrainingInterrupted."""
        cfg, accelerator = self.cfg, self.accelerator
        if cfg.eval_every and step % cfg.eval_every == 0 and step != self.max_steps:
            self.log(evaluate(self.task, self.model, cfg, self.objective, accelerator, step), step)
        if (cfg.save_every and step % cfg.save_every == 0) or interrupted:
            self.task.flush()  # what the checkpoint's resume will read (e.g. lazily cached rows)
            try:
                checkpoint = self.checkpointer.save(_checkpoint_state(self.state, self.sums, self.count, accelerator))
            except BaseException as exc:  # e.g. a full disk: the half-written folder goes, the older ones stay
                self.checkpointer.discard(step)
                raise_if_disk_full(exc, self.checkpointer.path(step), "checkpoint", self.disk and self.disk.checkpoint)
                raise
        if interrupted:
            self.bar.close()
            accelerator.end_training()
            raise TrainingInterrupted(self.stop.signal_name or "a signal on another process", step, checkpoint)

    # -- the end: final evaluation, final/, summary, upload ------------------------------------------
    def finish(self) -> Path:
        cfg, accelerator, model, state = self.cfg, self.accelerator, self.model, self.state
        self.bar.close()
        elapsed = time.perf_counter() - self.t0
        self.task.flush()
        self.task.finalize(model)  # e.g. EMA weights in place of the trained ones
        final_eval = evaluate(self.task, model, cfg, self.objective, accelerator, state["step"])
        self.log(final_eval, state["step"])
        final = self.out / "final"
        accelerator.wait_for_everyone()
        # FSDP / ZeRO-3: the weights are sharded; every process takes part in gathering them for the save
        full_state = accelerator.get_state_dict(model) if sharding(accelerator) in ("zero3", "fsdp") else None
        if accelerator.is_main_process:
            self._save_final(final, full_state, final_eval)
            self._write_summary(final_eval, elapsed)
        accelerator.end_training()
        if cfg.push_to_hub and accelerator.is_main_process:  # last: a failed upload leaves the run complete on disk
            push_to_hub(final, cfg)
        if accelerator.is_main_process:
            for callback in self.callbacks:
                callback.on_train_end(final)
        return final

    def _save_final(self, final: Path, full_state: dict | None, final_eval: dict[str, float]) -> None:
        """The model and its card into ``final`` (main process), which appears complete or not at all."""
        cfg, accelerator, task, out = self.cfg, self.accelerator, self.task, self.out
        with atomic_folder(final, what="final model", needed=self.disk and self.disk.final) as staging:
            task.save(accelerator.unwrap_model(self.model), staging, state_dict=full_state)
            # after save: peft's save_pretrained writes a README.md of its own
            write_model_card(staging, cfg, self.source, final_eval, diffusion=task.modality == "diffusion",
                             steps=self.state["step"], processes=accelerator.num_processes, sdxl=task.is_sdxl,
                             location=cfg.hub_model_id if cfg.push_to_hub else str(final),
                             model=accelerator.unwrap_model(self.model))  # fmt: skip
        plot_metrics(out / "metrics.jsonl", out / "training_curves.png")

    def _write_summary(self, final_eval: dict[str, float], elapsed: float) -> None:
        """``summary.json`` and its printed line (main process): time, throughput, memory, skips, final metrics."""
        accelerator, state, unit = self.accelerator, self.state, self.task.unit
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        summary = {"train_seconds": round(elapsed, 2), f"{unit}_per_second": round(self.units / max(elapsed, 1e-9), 1),
                   "peak_gpu_memory_gib": peak, "peak_host_rss_gib": peak_host_rss_gib(),
                   "skipped_steps": state["skipped_steps"], "steps": state["step"],
                   "mixed_precision": accelerator.mixed_precision, **self.task.data_metrics(), **final_eval}  # fmt: skip
        if accelerator.scaler is not None:
            summary["scaler_skipped_steps"] = state["scaler_skipped_steps"]
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(json.dumps(summary))
        accelerator.print(summary_line(summary, unit, state["step"]))


def _tensor(values: dict[str, float], accelerator: Accelerator) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, device=accelerator.device) for k, v in values.items()}


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat
