"""Sharded training (DeepSpeed ZeRO, FSDP): what mmpref supports, checked by the plan before any model loads
(:func:`mmpref.training.plan.check_scale_out`).

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


def sharding(accelerator) -> str | None:
    """``"zero1"``, ``"zero2"``, ``"zero3"``, ``"fsdp"``, or None for DDP / one process."""
    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{state.deepspeed_plugin.zero_stage}"
    if state.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return None
