"""Sharded training (DeepSpeed ZeRO, FSDP): what mmpref supports, checked before any model loads.

Accelerate prepares (and so shards) only the trained model. A few things run outside it: the
reference log-prob pass of ``precompute_ref`` (before ``prepare``), a frozen reference copy, and the
frozen VAE / text encoders of diffusion. So:

* **ZeRO-3** shards the weights of the prepared model only. A frozen reference copy would stay whole
  on every GPU (TRL wraps it in a second DeepSpeed engine instead); mmpref refuses it and names the
  two references that need no second model: ``precompute_ref: true`` (text; the policy before its
  first update is the reference, run once before sharding) or ``lora`` (the reference is the same
  sharded model with its adapters off). ``zero3_init_flag`` must be false: it would shard the models
  while they load, before the passes above run on them.
* **DeepSpeed** steps inside ``accelerator.backward``; mmpref's own gradient accumulation is not
  wired to its boundaries, so ``gradient_accumulation_steps`` must be 1 (raise ``batch_size``).
* **ZeRO-3 and FSDP**: ``lora.merge`` needs the whole model in one process; merge after training.

The final model is saved from ``accelerator.get_state_dict``, which gathers the shards.
"""

from __future__ import annotations

from accelerate.utils import DistributedType

from mmpref.training.config import ConfigError, TrainConfig


def sharding(accelerator) -> str | None:
    """``"zero1"``, ``"zero2"``, ``"zero3"``, ``"fsdp"``, or None for DDP / one process."""
    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{state.deepspeed_plugin.zero_stage}"
    if state.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return None


def check_scale_out(cfg: TrainConfig, accelerator, *, frozen_reference: bool, text: bool) -> None:
    """Raise :class:`ConfigError` for a combination the sharded modes cannot run, naming the fix.

    ``frozen_reference``: the task would keep a second, frozen copy of the model as its reference;
    ``text``: a causal-LM task (``precompute_ref`` is available), not diffusion.
    """
    mode = sharding(accelerator)
    if mode is None:
        return
    if mode.startswith("zero") and cfg.gradient_accumulation_steps != 1:
        raise ConfigError(
            f"gradient_accumulation_steps: must be 1 under DeepSpeed (got {cfg.gradient_accumulation_steps}); "
            "DeepSpeed steps at every backward here, so raise batch_size, or use DDP or FSDP to accumulate"
        )
    if mode == "zero3" and accelerator.state.deepspeed_plugin.zero3_init_flag:
        raise ConfigError(
            "zero3_init_flag: set it to false in the Accelerate config (deepspeed_config); mmpref runs the "
            "reference pass and the frozen encoders before DeepSpeed shards the model, so models must load whole"
        )
    if mode == "zero3" and frozen_reference:
        fix = "lora (the reference is the base model with adapters off)"
        if text:
            fix = "precompute_ref: true (the default; reference log-probs computed once) or " + fix
        raise ConfigError(
            "reference: a frozen reference copy is not sharded by DeepSpeed ZeRO-3 (every GPU would hold a "
            f"whole second model); use {fix}, or ZeRO-2 / FSDP"
        )
    if mode in ("zero3", "fsdp") and cfg.lora is not None and cfg.lora.merge:
        raise ConfigError(
            f"lora.merge: merging needs the whole model in one process, not possible under {mode}; set "
            "lora.merge=false and merge the saved adapter afterwards (peft: merge_and_unload)"
        )
