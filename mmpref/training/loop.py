"""The one training loop, on Accelerate, for every modality and loss.

A *task* (``TextTask``; diffusion plugs in the same way) owns the model, the data and the
reference; it turns a batch into :class:`~mmpref.training.objective.Rows`. This loop owns
everything else: optimizer, schedule, accumulation, logging, evaluation, checkpoints, resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from mmpref.hub import ModelSource
from mmpref.losses import tie_accuracy
from mmpref.progress import progress
from mmpref.training.checkpoint import (
    STATE_FILE,
    Checkpointer,
    check_weights_only,
    find_checkpoint,
    rewind_metrics,
)
from mmpref.training.config import ConfigError, TrainConfig, base_loss, check_paths, model_source, to_dict
from mmpref.training.distributed import sharding
from mmpref.training.model_card import push_to_hub, write_model_card
from mmpref.training.objective import Rows, gather_rows, preference_loss
from mmpref.training.plots import plot_metrics
from mmpref.training.run_report import peak_host_rss_gib, summary_line

logger = logging.getLogger(__name__)
DEFAULT_EPOCHS = 3  # when neither max_steps nor num_epochs is set, as TRL's num_train_epochs


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient went NaN or inf; the message names the step and the dataset rows."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training at a step boundary, after a checkpoint was saved there."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(
            f"{signal_name} received: stopped after step {step}, checkpoint saved to {checkpoint}"
        )
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class _StopRequest:
    """Turns SIGTERM / SIGINT into a request that the loop honours at the next step boundary.

    The first signal only records the request and puts the previous handler back, so a second one
    acts as usual: Ctrl-C twice interrupts at once, a second SIGTERM terminates.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs handlers in the main thread only, and sets them only from there
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.pop(signum, None) or signal.SIG_DFL)
        print(f"{self.signal_name}: saving a checkpoint at the end of this step, then stopping "
              "(send it again to stop at once)", file=sys.stderr, flush=True)  # fmt: skip

    def disarm(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler or signal.SIG_DFL)
        self._previous.clear()


def build_task(cfg: TrainConfig, accelerator: Accelerator, source: ModelSource | None = None, given: dict | None = None):
    """The diffusion task for a diffusers pipeline (a ``model_index.json``), else the text task.

    ``given``: in-memory ``model``, ``tokenizer``, ``train_dataset``, ``eval_dataset`` (see :func:`train`).
    """
    given = {k: v for k, v in (given or {}).items() if v is not None}
    if source is None and "model" not in given:
        source = model_source(cfg)
    if cfg.modality == "diffusion" or (cfg.modality == "auto" and source and source.marker == "model_index.json"):
        from mmpref.training.diffusion_task import DiffusionTask

        if {"model", "tokenizer"} & set(given):
            raise ConfigError("model: the diffusion task loads its pipeline from `model` (a hub id or folder)")
        return DiffusionTask(cfg, accelerator, source, **given)
    from mmpref.training.text_task import TextTask

    return TextTask(cfg, accelerator, source, **given)


def build_optimizer(cfg: TrainConfig, params: list) -> torch.optim.Optimizer:
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)  # fmt: skip
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError("optimizer: adamw8bit needs bitsandbytes (pip install 'mmpref[bnb]')") from e
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def epoch_order(size: int, seed: int, epoch: int, labels: torch.Tensor | None = None, batch_size: int = 1) -> list[int]:
    """The rows of one epoch in a seeded order.

    With ``labels`` (unpaired rows, True = desirable) every batch of ``batch_size`` holds as many desirable as
    undesirable rows (one more desirable for an odd size), as the RPO authors' loader does, so no batch has
    one side only; the epoch ends when the smaller side runs out (each epoch reshuffles both sides).
    """
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(size, generator=g)
    if labels is None or batch_size < 2:
        return order.tolist()
    good, bad = order[labels[order]], order[~labels[order]]
    per_good, per_bad = (batch_size + 1) // 2, batch_size // 2
    batches = min(len(good) // per_good, len(bad) // per_bad)
    return [int(i) for b in range(batches) for i in (*good[b * per_good : (b + 1) * per_good],
                                                      *bad[b * per_bad : (b + 1) * per_bad])]  # fmt: skip


def _batches(task, collate, order: list[int], batch_size: int, skip: int, accelerator):
    """This process's batches of one epoch's ``order``, after skipping ``skip`` of them."""
    loader = DataLoader(order, batch_size=batch_size, shuffle=False, collate_fn=collate, drop_last=True)
    loader = accelerator.prepare_data_loader(loader)
    return iter(accelerator.skip_first_batches(loader, skip) if skip else loader)


def _eval_metrics(logratios: torch.Tensor, labels: torch.Tensor | None, beta: float) -> dict[str, float]:
    """Reward accuracy and margins over the whole eval set (unpaired: over all good × bad pairs)."""
    if labels is None:
        chosen, rejected = logratios[:, 0], logratios[:, 1]
        margins = beta * (chosen - rejected)
    else:
        chosen, rejected = logratios[labels.bool(), 0], logratios[~labels.bool(), 0]
        margins = beta * (chosen[:, None] - rejected[None, :]).flatten()
    acc = tie_accuracy(margins)
    return {
        "eval/rewards/accuracies": acc.mean().item(),
        "eval/rewards/margins": margins.mean().item(),
        "eval/rewards/chosen": beta * chosen.mean().item(),
        "eval/rewards/rejected": beta * rejected.mean().item(),
    }


@torch.no_grad()
def evaluate(task, model, cfg: TrainConfig, accelerator: Accelerator, step: int = 0) -> dict[str, float]:
    """Held-out loss and reward metrics; plus, for a task that generates samples (diffusion), their scores."""
    samples = task.sample_and_score(model, step) if hasattr(task, "sample_and_score") else {}
    if task.eval is None:
        return samples
    model.eval()
    loader = accelerator.prepare_data_loader(
        DataLoader(list(range(len(task.eval))), batch_size=cfg.eval_batch_size, collate_fn=task.collate_eval)
    )
    losses, logratios, labels = [], [], []
    simpo = base_loss(cfg) == "simpo"
    for batch in loader:
        with accelerator.autocast():  # the numerics of the training forward (and of the precomputed reference)
            rows = task.rows(model, batch)
            losses.append(preference_loss(cfg.loss, cfg.rpo, rows).loss.float().reshape(1))
        shown = rows.logratios
        if simpo and rows.lengths is not None:  # SimPO compares length-averaged log-probs
            shown = shown / rows.lengths
        logratios.append(accelerator.gather_for_metrics(shown.float()))
        if rows.labels is not None:
            labels.append(accelerator.gather_for_metrics(rows.labels))
    model.train()
    loss = accelerator.gather(torch.cat(losses)).mean().item()
    metrics = _eval_metrics(torch.cat(logratios), torch.cat(labels) if labels else None, cfg.loss.beta)
    return {"eval/loss": loss, **metrics, **samples}


def _checkpoint_state(state: dict, sums: dict[str, float], count: int, accelerator: Accelerator) -> dict:
    """The trainer state plus the metric sums of the log window still open, so a resume logs the same means."""
    if accelerator.num_processes > 1 and sums:
        local = {k: torch.tensor(v, dtype=torch.float64, device=accelerator.device) for k, v in sums.items()}
        sums = {k: v.item() for k, v in accelerator.reduce(local, "mean").items()}
    return {**state, "pending_metrics": {"sums": sums, "count": count}}


def _zero_nonfinite(rows: Rows) -> tuple[Rows, list[int]]:
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


class Callback:
    """Hooks into a run, for the Python API (``train(cfg, callbacks=[...])``); override what you need.

    They run on the main process only, between steps: a hook sees the state the loop has then.
    """

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """After each logged window of training metrics and after each evaluation."""

    def on_step_end(self, step: int, model: torch.nn.Module) -> None:
        """After each optimizer step (``model`` as prepared by Accelerate)."""

    def on_train_end(self, final_dir: Path) -> None:
        """Once ``final_dir`` holds the saved model."""


def train(
    cfg: TrainConfig,
    resume: str | None = None,
    *,
    train_dataset=None,
    eval_dataset=None,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    callbacks: Sequence[Callback] = (),
) -> Path:
    """Train as configured; returns the folder of the final model (``output_dir/final``).

    ``resume`` ("latest" or a checkpoint folder) continues a run exactly. SIGTERM or SIGINT during the
    steps saves a checkpoint at the next step boundary and raises :class:`TrainingInterrupted`.

    In-memory work, as with TRL's trainer: ``train_dataset`` / ``eval_dataset`` (a ``datasets.Dataset`` or
    a list of row dicts) replace ``dataset`` / ``eval_dataset``; ``model`` and ``tokenizer`` (text: an
    already loaded causal LM and its tokenizer) replace ``model``. Rows are validated as files are.
    """
    stop = _StopRequest()
    given = dict(train_dataset=train_dataset, eval_dataset=eval_dataset, model=model, tokenizer=tokenizer)
    try:
        return _train(cfg, resume, stop, given, list(callbacks))
    finally:
        stop.disarm()


def _train(cfg: TrainConfig, resume: str | None, stop: _StopRequest, given: dict, callbacks: list) -> Path:
    # a missing model or an unwritable output_dir stops here, before anything is written
    source = check_paths(cfg, model_given=given["model"] is not None, data_given=given["train_dataset"] is not None)
    out = Path(cfg.output_dir)
    # Several processes and no GPU (e.g. `accelerate launch --multi_gpu --num_processes 2` on a
    # CPU machine): ask Accelerate for its multi-CPU (gloo) mode instead of silently running alone.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    trackers = [t for t in cfg.report_to if t != "none"]
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=cfg.mixed_precision,  # None: the launcher's (ACCELERATE_MIXED_PRECISION) or config file's
        log_with=trackers or None,
        project_dir=str(out),
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    set_seed(cfg.seed)
    task = build_task(cfg, accelerator, source, given)
    accum = cfg.gradient_accumulation_steps
    size = len(task.train)
    labels = task.train.labels if cfg.rpo.balance_unpaired else None  # unpaired rows: balanced batches

    def order(epoch: int) -> list[int]:
        return epoch_order(size, cfg.seed, epoch, labels, cfg.batch_size)

    per_epoch = len(order(0)) // (cfg.batch_size * accelerator.num_processes)
    if per_epoch < accum:
        raise ConfigError(
            f"dataset: {size} rows give fewer than {accum} batches of {cfg.batch_size} per process; "
            "lower batch_size or gradient_accumulation_steps, or add rows"
        )
    max_steps = cfg.max_steps or math.ceil((cfg.num_epochs or DEFAULT_EPOCHS) * (per_epoch // accum))
    if cfg.max_steps is None:
        logger.info("%d steps: %s epochs of %d steps", max_steps, cfg.num_epochs or DEFAULT_EPOCHS, per_epoch // accum)
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    # Not prepared: Accelerate would step a prepared scheduler once per process.
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=max_steps)  # fmt: skip
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    for extra in getattr(task, "checkpoint_objects", list)():  # e.g. the diffusion EMA
        accelerator.register_for_checkpointing(extra)
    checkpointer = Checkpointer(accelerator, out / "checkpoints", cfg.keep_checkpoints)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped_steps": 0, "scaler_skipped_steps": 0}
    pending = {"sums": {}, "count": 0}
    if resume:
        ckpt = find_checkpoint(out, resume, main_process=accelerator.is_main_process)
        check_weights_only(ckpt)
        accelerator.load_state(str(ckpt))
        state.update(json.loads((ckpt / STATE_FILE).read_text()))
        pending = state.pop("pending_metrics", pending)
        if accelerator.is_main_process:  # what comes after the checkpoint is logged again
            rewind_metrics(out / "metrics.jsonl", state["step"])
        accelerator.print(f"resumed from {ckpt} at step {state['step']}")
    if accelerator.is_main_process and not resume and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    if trackers:
        accelerator.init_trackers("mmpref", config=_flat(to_dict(cfg)))

    def log(values: dict, step: int) -> None:
        if trackers:
            accelerator.log(values, step=step)
        if accelerator.is_main_process:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
            for callback in callbacks:
                callback.on_log(step, values)

    if state["step"] == 0:
        log(evaluate(task, model, cfg, accelerator), 0)

    it = _batches(task, task.collate_train, order(state["epoch"]), cfg.batch_size, state["batch_in_epoch"],
                  accelerator)  # fmt: skip
    scale = accelerator.num_processes if cfg.rpo.global_batch and cfg.loss.type == "rpo" else 1
    sums: dict[str, float] = dict(pending["sums"])  # a resumed run completes the log window it stopped in
    count, units, t0 = pending["count"], 0, time.perf_counter()
    # Gradients are checked here unless a loss scaler owns overflow: fp16's GradScaler skips those steps
    # itself; DeepSpeed keeps the gradients inside its engine and steps inside backward.
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    check_grads = accelerator.scaler is None and not deepspeed
    if deepspeed and cfg.nonfinite == "skip":
        raise ConfigError("nonfinite: skip cannot skip DeepSpeed's steps (its engine steps inside backward)")
    bar = progress(total=max_steps, initial=state["step"], desc="train", accelerator=accelerator)
    model.train()
    stop.arm()
    while state["step"] < max_steps:
        step_sums: dict[str, float] = {}
        step_rows: list[int] = []
        bad_loss = None
        for micro in range(accum):
            try:
                batch = next(it)
            except StopIteration:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                it = _batches(task, task.collate_train, order(state["epoch"]), cfg.batch_size, 0, accelerator)
                batch = next(it)
            state["batch_in_epoch"] += 1
            sync = micro == accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    rows: Rows = task.rows(model, batch)
                    if cfg.rpo.global_batch:
                        rows = gather_rows(rows, accelerator)
                    rows, bad_rows = _zero_nonfinite(rows)
                    out_loss = preference_loss(cfg.loss, cfg.rpo, rows)
                if bad_loss is None and bad_rows:
                    bad_loss = (f"non-finite log-probs of dataset rows {bad_rows} in micro-batch {micro}",
                                batch["row_index"].tolist())  # fmt: skip
                if bad_loss is None and not torch.isfinite(out_loss.loss):
                    bad_loss = (f"non-finite loss {out_loss.loss.item()} in micro-batch {micro}",
                                batch["row_index"].tolist())  # fmt: skip
                # backward even so: under DDP every process must join the gradient all-reduce
                accelerator.backward(out_loss.loss * scale / accum)
            step_rows += batch["row_index"].tolist()
            for k, v in {"loss": out_loss.loss.detach(), **out_loss.metrics}.items():
                step_sums[k] = step_sums.get(k, 0.0) + float(v)
            units += task.count_units(batch)
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        elif check_grads:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        problem = bad_loss
        if problem is None and check_grads and grad_norm is not None and not torch.isfinite(grad_norm):
            problem = (f"non-finite gradient (norm {float(grad_norm)}) from a finite loss", step_rows)
        interrupted = stop.signal_name is not None
        if accelerator.num_processes > 1:  # every process takes the same decisions
            flags = torch.tensor([problem is not None, interrupted], dtype=torch.float32)
            flags = accelerator.reduce(flags.to(accelerator.device), "sum")
            if problem is None and flags[0] > 0:
                problem = ("non-finite loss or gradient on another process", step_rows)
            interrupted = bool(flags[1] > 0)
        state["step"] += 1
        step = state["step"]
        if problem is not None:
            optimizer.zero_grad(set_to_none=True)
            _skip_or_stop(problem, step, state, cfg, accelerator)
        else:
            optimizer.step()
            if accelerator.optimizer_step_was_skipped:  # GradScaler overflow: its business, lr waits too
                state["scaler_skipped_steps"] += 1
            else:
                scheduler.step()
                if hasattr(task, "after_optimizer_step"):
                    task.after_optimizer_step(model)
                if accelerator.is_main_process:
                    for callback in callbacks:
                        callback.on_step_end(step, model)
                if grad_norm is not None:
                    step_sums["grad_norm"] = float(grad_norm) * accum
                for k, v in step_sums.items():  # skipped steps stay out of the logged means
                    sums[k] = sums.get(k, 0.0) + v
                count += accum
            optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if step % cfg.log_every == 0 or step == max_steps:
            means = {k: v / count for k, v in sums.items()} if count else {}
            if means:
                means = accelerator.reduce(_tensor(means, accelerator), "mean")
                means = {k: v.item() for k, v in means.items()}
            means["lr"] = scheduler.get_last_lr()[0]
            if cfg.nonfinite == "skip":
                means["skipped_steps"] = state["skipped_steps"]
            if accelerator.scaler is not None:
                means["scaler_skipped_steps"] = state["scaler_skipped_steps"]
            bar.set_postfix(
                loss=f"{means.get('loss', math.nan):.4f}",
                acc=f"{means.get('rewards/accuracies', math.nan):.2f}",
            )
            log(means, step)
            sums, count = {}, 0
        if cfg.eval_every and step % cfg.eval_every == 0 and step != max_steps:
            log(evaluate(task, model, cfg, accelerator, step), step)
        if (cfg.save_every and step % cfg.save_every == 0) or interrupted:
            checkpoint = checkpointer.save(_checkpoint_state(state, sums, count, accelerator))
        if interrupted:
            bar.close()
            accelerator.end_training()
            raise TrainingInterrupted(stop.signal_name or "a signal on another process", step, checkpoint)
    bar.close()
    elapsed = time.perf_counter() - t0
    if hasattr(task, "finalize"):  # e.g. EMA weights in place of the trained ones
        task.finalize(model)
    final_eval = evaluate(task, model, cfg, accelerator, state["step"])
    log(final_eval, state["step"])
    final = out / "final"
    accelerator.wait_for_everyone()
    # FSDP / ZeRO-3: the weights are sharded; every process takes part in gathering them for the save
    full_state = accelerator.get_state_dict(model) if sharding(accelerator) in ("zero3", "fsdp") else None
    if accelerator.is_main_process:  # final/ appears complete or not at all
        staging = out / ".tmp-final"
        shutil.rmtree(staging, ignore_errors=True)
        task.save(accelerator.unwrap_model(model), staging, state_dict=full_state)
        # after save: peft's save_pretrained writes a README.md of its own
        write_model_card(staging, cfg, source, final_eval, diffusion=task.unit == "images", steps=state["step"],
                         processes=accelerator.num_processes, sdxl=getattr(task, "is_sdxl", False),
                         location=cfg.hub_model_id if cfg.push_to_hub else str(final),
                         model=accelerator.unwrap_model(model))  # fmt: skip
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        plot_metrics(out / "metrics.jsonl", out / "training_curves.png")
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        summary = {"train_seconds": round(elapsed, 2), f"{task.unit}_per_second": round(units / max(elapsed, 1e-9), 1),
                   "peak_gpu_memory_gib": peak, "peak_host_rss_gib": peak_host_rss_gib(),
                   "skipped_steps": state["skipped_steps"], "steps": state["step"],
                   "mixed_precision": accelerator.mixed_precision, **final_eval}  # fmt: skip
        if accelerator.scaler is not None:
            summary["scaler_skipped_steps"] = state["scaler_skipped_steps"]
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(json.dumps(summary))
        accelerator.print(summary_line(summary, task.unit, state["step"]))
    accelerator.end_training()
    if cfg.push_to_hub and accelerator.is_main_process:  # last: a failed upload leaves the run complete on disk
        push_to_hub(final, cfg)
    if accelerator.is_main_process:
        for callback in callbacks:
            callback.on_train_end(final)
    return final


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
