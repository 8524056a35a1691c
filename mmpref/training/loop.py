"""The one training loop, on Accelerate, for every modality and loss.

A *task* (``TextTask``; diffusion plugs in the same way) owns the model, the data and the
reference; it turns a batch into :class:`~mmpref.training.objective.Rows`. This loop owns
everything else: optimizer, schedule, accumulation, logging, evaluation, checkpoints, resume.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from mmpref.training.config import ConfigError, TrainConfig, check_paths, to_dict
from mmpref.training.objective import Rows, gather_rows, preference_loss
from mmpref.training.plots import plot_metrics

STATE_FILE = "trainer_state.json"


class NonFiniteLossError(FloatingPointError):
    """The loss went NaN or inf; the message names the step and the dataset rows of the batch."""


def is_diffusion(cfg: TrainConfig) -> bool:
    if cfg.modality != "auto":
        return cfg.modality == "diffusion"
    return (Path(cfg.model) / "model_index.json").is_file()


def build_task(cfg: TrainConfig, accelerator: Accelerator):
    if is_diffusion(cfg):
        from mmpref.training.diffusion_task import DiffusionTask

        return DiffusionTask(cfg, accelerator)
    from mmpref.training.text_task import TextTask

    return TextTask(cfg, accelerator)


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


def _batches(task, collate, size: int, batch_size: int, seed: int, epoch: int, skip: int, accelerator):
    """This process's batches of one epoch, in a seeded order, after skipping ``skip`` of them."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    loader = DataLoader(order, batch_size=batch_size, shuffle=False, collate_fn=collate, drop_last=True)
    loader = accelerator.prepare_data_loader(loader)
    return iter(accelerator.skip_first_batches(loader, skip) if skip else loader)


def find_checkpoint(output_dir: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume: {path} is not a checkpoint (no {STATE_FILE})")
        return path
    found = sorted((output_dir / "checkpoints").glob("step-*"))
    found = [p for p in found if (p / STATE_FILE).is_file()]
    if not found:
        raise FileNotFoundError(f"--resume latest: no checkpoint under {output_dir / 'checkpoints'}")
    return found[-1]


def _eval_metrics(logratios: torch.Tensor, labels: torch.Tensor | None, beta: float) -> dict[str, float]:
    """Reward accuracy and margins over the whole eval set (unpaired: over all good × bad pairs)."""
    if labels is None:
        chosen, rejected = logratios[:, 0], logratios[:, 1]
        margins = beta * (chosen - rejected)
    else:
        chosen, rejected = logratios[labels.bool(), 0], logratios[~labels.bool(), 0]
        margins = beta * (chosen[:, None] - rejected[None, :]).flatten()
    acc = (margins > 0).float() + 0.5 * (margins == 0).float()
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
    for batch in loader:
        rows = task.rows(model, batch)
        losses.append(preference_loss(cfg.loss, cfg.rpo, rows).loss.float().reshape(1))
        logratios.append(accelerator.gather_for_metrics(rows.logratios.float()))
        if rows.labels is not None:
            labels.append(accelerator.gather_for_metrics(rows.labels))
    model.train()
    loss = accelerator.gather(torch.cat(losses)).mean().item()
    metrics = _eval_metrics(torch.cat(logratios), torch.cat(labels) if labels else None, cfg.loss.beta)
    return {"eval/loss": loss, **metrics, **samples}


class _Checkpointer:
    """Atomic checkpoints: written to a hidden folder, renamed into place when complete."""

    def __init__(self, accelerator: Accelerator, root: Path, keep: int):
        self.accelerator, self.root, self.keep = accelerator, root, keep

    def save(self, state: dict) -> Path:
        acc = self.accelerator
        final = self.root / f"step-{state['step']:08d}"
        tmp = self.root / f".tmp-step-{state['step']:08d}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(self.root.glob("step-*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final


def train(cfg: TrainConfig, resume: str | None = None) -> Path:
    """Train as configured; returns the folder of the final model (``output_dir/final``)."""
    check_paths(cfg)  # a missing model or an unwritable output_dir stops here, before anything is written
    out = Path(cfg.output_dir)
    # Several processes and no GPU (e.g. `accelerate launch --multi_gpu --num_processes 2` on a
    # CPU machine): ask Accelerate for its multi-CPU (gloo) mode instead of silently running alone.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(out),
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    set_seed(cfg.seed)
    task = build_task(cfg, accelerator)
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    # Not prepared: Accelerate would step a prepared scheduler once per process.
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.max_steps)  # fmt: skip
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    checkpointer = _Checkpointer(accelerator, out / "checkpoints", cfg.keep_checkpoints)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if resume:
        ckpt = find_checkpoint(out, resume)
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / STATE_FILE).read_text())
        accelerator.print(f"resumed from {ckpt} at step {state['step']}")
    if accelerator.is_main_process and not resume and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    if cfg.report_to != "none":
        accelerator.init_trackers("mmpref", config=_flat(to_dict(cfg)))

    def log(values: dict, step: int) -> None:
        if cfg.report_to != "none":
            accelerator.log(values, step=step)
        if accelerator.is_main_process:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    if state["step"] == 0:
        log(evaluate(task, model, cfg, accelerator), 0)

    accum = cfg.gradient_accumulation_steps
    size = len(task.train)
    per_epoch = size // (cfg.batch_size * accelerator.num_processes)
    if per_epoch < accum:
        raise ConfigError(
            f"dataset: {size} rows give fewer than {accum} batches of {cfg.batch_size} per process; "
            "lower batch_size or gradient_accumulation_steps, or add rows"
        )
    it = _batches(task, task.collate_train, size, cfg.batch_size, cfg.seed, state["epoch"], state["batch_in_epoch"],
                  accelerator)  # fmt: skip
    scale = accelerator.num_processes if cfg.rpo.global_batch and cfg.loss.type == "rpo" else 1
    sums: dict[str, float] = {}
    count, units, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not accelerator.is_local_main_process,
               desc="train", dynamic_ncols=True)  # fmt: skip
    model.train()
    while state["step"] < cfg.max_steps:
        for micro in range(accum):
            try:
                batch = next(it)
            except StopIteration:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                it = _batches(
                    task, task.collate_train, size, cfg.batch_size, cfg.seed, state["epoch"], 0, accelerator
                )
                batch = next(it)
            state["batch_in_epoch"] += 1
            sync = micro == accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    rows: Rows = task.rows(model, batch)
                    if cfg.rpo.global_batch:
                        rows = gather_rows(rows, accelerator)
                    out_loss = preference_loss(cfg.loss, cfg.rpo, rows)
                if not torch.isfinite(out_loss.loss):
                    raise NonFiniteLossError(
                        f"non-finite loss {out_loss.loss.item()} at step {state['step'] + 1}, micro-batch {micro}; "
                        f"dataset rows {batch['row_index'].tolist()}"
                    )
                accelerator.backward(out_loss.loss * scale / accum)
            for k, v in {"loss": out_loss.loss.detach(), **out_loss.metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
            units += task.count_units(batch)
        if cfg.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm) * accum
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        step = state["step"]
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            means = {k: v / count for k, v in sums.items()}
            means = {k: v.item() for k, v in accelerator.reduce(_tensor(means, accelerator), "mean").items()}
            means["lr"] = scheduler.get_last_lr()[0]
            bar.set_postfix(
                loss=f"{means['loss']:.4f}", acc=f"{means.get('rewards/accuracies', math.nan):.2f}"
            )
            log(means, step)
            sums, count = {}, 0
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_steps:
            log(evaluate(task, model, cfg, accelerator, step), step)
        if cfg.save_every and step % cfg.save_every == 0:
            checkpointer.save(dict(state))
    bar.close()
    elapsed = time.perf_counter() - t0
    final_eval = evaluate(task, model, cfg, accelerator, state["step"])
    log(final_eval, state["step"])
    final = out / "final"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # final/ appears complete or not at all
        staging = out / ".tmp-final"
        shutil.rmtree(staging, ignore_errors=True)
        task.save(accelerator.unwrap_model(model), staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        plot_metrics(out / "metrics.jsonl", out / "training_curves.png")
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        summary = {"train_seconds": round(elapsed, 2), f"{task.unit}_per_second": round(units / max(elapsed, 1e-9), 1),
                   "peak_gpu_memory_gib": peak, **final_eval}  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(json.dumps(summary))
    accelerator.end_training()
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
