"""The disk a run needs: estimated once the model and optimizer exist, compared with the free space before step 1,
and the one message a full disk gives.

A checkpoint (Accelerate's ``save_state`` folder) holds the model's whole state dict as safetensors (with LoRA the
base weights too, not only the adapter), the optimizer state (AdamW: two tensors the size of each trainable
parameter; RMSprop one; Adafactor a row and a column factor of each matrix; 8-bit AdamW a byte each of its two
states), the registered objects (the LR schedule, the diffusion EMA), each process's RNG states and the two JSON
files. ``final/`` holds what the task saves: the whole model or the LoRA adapter (plus ``merged/``, the whole model,
with ``lora.merge``), and the model folder's small files (tokenizer, configs). The estimate is made before the
optimizer has any state, from the parameters' sizes, so it holds for a run at any step.

:func:`run_needs` says how much a run adds at its fullest: ``keep_checkpoints + 1`` checkpoints while one is saved
(the oldest goes only once the new one is complete), or the kept ones and ``final/`` at the end, less the
checkpoints already in ``output_dir``. :func:`check_free_space` warns when that exceeds the free space, or raises
:class:`LowDiskSpaceError` with ``fail_on_low_disk: true``. A full disk while writing is a
:class:`~mmpref.errors.DiskFullError`; :func:`explain_disk_full` adds what the user needs to continue.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from mmpref.errors import DiskFullError, LowDiskSpaceError, human_bytes
from mmpref.training.checkpoint import verify_checkpoint

logger = logging.getLogger(__name__)

# what a stored tensor adds beyond its data, measured on the tiny Llama: its entry in a safetensors header (name,
# dtype, shape, offsets: ~100 bytes); a torch.save zip record (headers, 64-byte alignment) and its pickle (~280)
SAFETENSORS_PER_TENSOR = 100
PICKLE_PER_TENSOR = 288
# trainer_state.json, manifest.json, the LR schedule (~2.5 KiB); each process's RNG states (14,433 bytes on a CPU)
SMALL_STATE_BYTES = 4 * 1024
RNG_STATE_BYTES = 15 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx")
BNB_MIN_8BIT_SIZE, BNB_BLOCK = 4096, 256  # bitsandbytes: smaller tensors keep 32-bit states; absmax per block


def _nbytes(t: Tensor) -> int:
    return getattr(t, "ds_numel", t.numel()) * t.element_size()  # ZeRO-3 leaves a placeholder of size 0


def stored(tensors: Iterable[Tensor]) -> tuple[int, int]:
    """(bytes, count) of the distinct tensors: tensors sharing storage (tied weights) count once, as
    safetensors writes them."""
    seen: set[tuple[int, int]] = set()
    total = count = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key[0] and key in seen:
            continue
        seen.add(key)
        total, count = total + _nbytes(t), count + 1
    return total, count


def tensors_in(obj: object) -> list[Tensor]:
    """Every tensor inside a state dict (nested dicts, lists, tuples)."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors_in(item)]
    return []


def optimizer_state_bytes(optimizer: str, params: Iterable[Tensor]) -> int:
    """What ``optimizer.bin`` holds for ``params`` once the optimizer has stepped (``optimizer``: the config's name)."""
    total = 0
    for p in params:
        n, size = getattr(p, "ds_numel", p.numel()), p.element_size()
        if optimizer == "adamw8bit":
            big = n >= BNB_MIN_8BIT_SIZE
            data, tensors = (2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) + 2 * 4 * 256, 6) if big else (2 * 4 * n, 2)
        elif optimizer == "adafactor":  # a matrix keeps a row and a column factor; a vector its full square
            shape = p.shape if p.dim() else (1,)
            factors = (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) if len(shape) >= 2 else n
            data, tensors = factors * size + 4, 3
        elif optimizer == "rmsprop":
            data, tensors = n * size + 4, 2
        else:  # adamw: exp_avg, exp_avg_sq and the step
            data, tensors = 2 * n * size + 4, 3
        total += data + tensors * PICKLE_PER_TENSOR
    return total


def checkpoint_bytes(model_state: Iterable[Tensor], trainable: Iterable[Tensor], optimizer: str,
                     extra_state: Iterable[Tensor] = (), processes: int = 1) -> int:  # fmt: skip
    """One checkpoint: the model state as safetensors, the optimizer state, the registered objects' tensors
    (``extra_state``), the RNG states of ``processes`` processes and the small files."""
    weights, count = stored(model_state)
    extra, extra_count = stored(extra_state)
    return (weights + count * SAFETENSORS_PER_TENSOR + optimizer_state_bytes(optimizer, trainable)
            + extra + extra_count * PICKLE_PER_TENSOR + processes * RNG_STATE_BYTES + SMALL_STATE_BYTES)  # fmt: skip


def final_bytes(model_state: Iterable[Tensor], trainable: Iterable[Tensor], lora: bool, merge: bool,
                small_files: int = 0) -> int:  # fmt: skip
    """``final/``: the whole model (or with LoRA the adapter, and with ``merge`` the merged model too), each with
    the model folder's ``small_files`` (tokenizer, configs)."""
    weights, count = stored(model_state)
    adapter, adapter_count = stored(trainable) if lora else (0, 0)
    whole = weights - adapter + (count - adapter_count) * SAFETENSORS_PER_TENSOR + small_files
    if not lora:
        return whole
    return adapter + adapter_count * SAFETENSORS_PER_TENSOR + small_files + (whole if merge else 0)


def model_folder(source) -> Path | None:
    """The folder of a resolved model (:class:`~mmpref.hub.ModelSource`): a local one, or a hub model's snapshot
    in the cache; None for a model given in memory."""
    if source is None or source.folder is not None:
        return None if source is None else source.folder
    try:  # the plan fetched the marker file already: this reads the cache
        marker = source.file(source.marker)
    except Exception:  # an estimate never stops a run
        return None
    return None if marker is None else marker.parent


def small_files_bytes(folder: Path | None) -> int:
    """The files beside a model's weights that a save writes again (tokenizer, configs): the top level of the model
    folder without its weight files; 0 when there is no folder."""
    if folder is None or not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES))


@dataclass(frozen=True)
class DiskNeeds:
    """What a run adds to ``output_dir``'s disk: ``checkpoint`` and ``final`` bytes each; ``saving`` checkpoints at
    the fullest while saving (the new one beside ``keep_checkpoints`` old ones), ``at_end`` beside ``final/``."""

    checkpoint: int
    final: int
    saving: int
    at_end: int

    @property
    def total(self) -> int:
        return max(self.saving * self.checkpoint, self.at_end * self.checkpoint + self.final)


def checkpoints_added(keep: int, save_every: int, max_steps: int, start_step: int = 0, existing: int = 0):
    """(while saving, at the end): how many more checkpoint folders than the ``existing`` ones the run holds at
    once, for ``save_every`` from ``start_step`` to ``max_steps`` keeping ``keep``."""
    new = max_steps // save_every - start_step // save_every if save_every else 0
    if not new:
        return 0, 0
    return max(min(keep + 1, existing + new) - existing, 1), max(min(keep, existing + new) - existing, 0)


def run_needs(cfg, model, trainable: list[Tensor], extra_objects: Iterable[object], processes: int,
              folder: Path | None, max_steps: int, start_step: int = 0) -> DiskNeeds:  # fmt: skip
    """:class:`DiskNeeds` of a built run: ``model`` unwrapped, its ``trainable`` parameters, the objects registered
    for checkpointing (``state_dict()``), the model's ``folder`` for its small files (:func:`model_folder`)."""
    state = list(model.state_dict(keep_vars=True).values())  # Parameters as they are: ZeRO-3 keeps ds_numel there
    extra = [t for obj in extra_objects for t in tensors_in(obj.state_dict())]
    lora = cfg.lora is not None
    existing = len(list((Path(cfg.output_dir) / "checkpoints").glob("step-*")))
    saving, at_end = checkpoints_added(cfg.keep_checkpoints, cfg.save_every, max_steps, start_step, existing)
    return DiskNeeds(
        checkpoint=checkpoint_bytes(state, trainable, cfg.optimizer, extra, processes),
        final=final_bytes(state, trainable, lora, lora and cfg.lora.merge, small_files_bytes(folder)),
        saving=saving,
        at_end=at_end,
    )


def free_bytes(path: Path | str) -> int:
    """Free bytes on the disk of ``path`` (of its nearest existing folder when it does not exist)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(cfg, needs: DiskNeeds, main_process: bool = True) -> str | None:
    """The warning (logged on the main process) when the run's checkpoints and ``final/`` would not fit in the
    free space of ``output_dir``, else None; with ``fail_on_low_disk`` a :class:`LowDiskSpaceError` instead."""
    out = Path(cfg.output_dir)
    free = free_bytes(out)
    if main_process:
        logger.info("disk: a checkpoint takes about %s, final/ about %s; %s free in %s", human_bytes(needs.checkpoint),
                    human_bytes(needs.final), human_bytes(free), out)  # fmt: skip
    if needs.total <= free:
        return None
    sizes = f"final/ takes about {human_bytes(needs.final)}"
    if needs.saving:
        sizes = (f"a checkpoint takes about {human_bytes(needs.checkpoint)} and {needs.saving} are added at once while "
                 f"saving, with keep_checkpoints: {cfg.keep_checkpoints} and save_every: {cfg.save_every}; {sizes}")  # fmt: skip
    message = (f"output_dir {out}: the run needs up to {human_bytes(needs.total)} more at once, {human_bytes(free)} "
               f"free there ({sizes}); lower keep_checkpoints or raise save_every (0: no checkpoints), or choose an "
               "output_dir on a larger disk")  # fmt: skip
    if cfg.fail_on_low_disk:
        raise LowDiskSpaceError(f"{message} (fail_on_low_disk: true stopped the run before step 1)")
    if main_process:
        logger.warning("%s; training anyway (fail_on_low_disk: true would stop here)", message)
    return message


def newest_complete_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` whose manifest verifies, or None."""
    return next((p for p in sorted(root.glob("step-*"), reverse=True) if not verify_checkpoint(p)), None)


def explain_disk_full(exc: BaseException, output_dir: Path) -> DiskFullError:
    """``exc`` (a full disk, :func:`mmpref.files.is_disk_full`) as the run's :class:`DiskFullError`: the path being
    written (an unconverted error's file, else ``output_dir``), the free space now, the newest complete
    checkpoint to ``--resume`` from."""
    if isinstance(exc, DiskFullError):
        error = exc
    else:
        error = DiskFullError(getattr(exc, "filename", None) or output_dir, "output")
    error.free = free_bytes(error.path)
    error.checkpoint = newest_complete_checkpoint(output_dir / "checkpoints")
    error.resumable = True
    return error
