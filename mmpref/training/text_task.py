"""Text preference training: model, data and reference of a causal LM for the one training loop.

The stages (:class:`~mmpref.training.task.Task`): validated rows (:mod:`mmpref.data.validation`) → tokenizer and
model (transformers' ``from_pretrained``) → tokenized rows and RPO prompt embeddings (:mod:`mmpref.data.tokenized`)
→ the reference (:mod:`mmpref.training.reference`; a precomputed one is computed here, :func:`reference_logps`)
→ gradient checkpointing and LoRA (peft).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file
from torch import Tensor, nn

from mmpref.adapters.causal_lm import response_logps
from mmpref.adapters.lm_head import chunk_size_for
from mmpref.data.splits import Splits, prepare_splits
from mmpref.data.tokenized import TextStream, TokenizedSplit, TokenLimits, chunks, short_hash
from mmpref.data.validation import prepare_text_dataset
from mmpref.files import KeyedCache, atomic_save
from mmpref.hub import weights_named_on_failure
from mmpref.losses import LogRatios
from mmpref.progress import progress
from mmpref.training.config import DTYPES
from mmpref.training.plan import DataPlan
from mmpref.training.reference import AdaptersOff, FrozenCopy, Precomputed, Reference
from mmpref.training.task import Task

logger = logging.getLogger(__name__)

REF_VERSION = "mmpref-ref-1"  # in every reference-chunk key
REF_CHUNK_ROWS = 512  # rows of one reference-cache file


@dataclass
class TextModels:
    """What :meth:`TextTask.load_models` returns: the tokenizer (a pad token set) and the causal LM."""

    tokenizer: object
    model: nn.Module


class TextTask(Task):
    """Causal-LM preference training (docs/design.md §1, §3): ℓ from summed response log-probs."""

    modality = "text"
    unit = "tokens"  # what count_units counts, for the throughput report

    # -- the stages ---------------------------------------------------------------------------------
    def prepare_splits(self) -> Splits:
        """Validated rows of the training and eval sources the plan opened (a streamed training split is read
        later, as training goes)."""
        cfg = self.cfg
        return prepare_splits(self.plan.train, self.plan.eval, 0.0 if cfg.streaming else cfg.eval_split, cfg.seed,
                              self._validated)  # fmt: skip

    def _validated(self, data: DataPlan):
        if data.stream is not None:
            return data  # tokenized as it is read (build_artifacts)
        objective = self.plan.objective
        return prepare_text_dataset(data.rows, on_bad_rows=self.cfg.on_bad_rows, needs_scores=objective.needs_scores,
                                    chosen_scores_higher=objective.chosen_scores_higher)  # fmt: skip

    def load_models(self) -> TextModels:
        """Tokenizer and causal LM of the ``model`` key (hub id or folder), or the ones given in memory."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg, source, given = self.cfg, self.source, self.plan.given or {}
        tokenizer, model = given.get("tokenizer"), given.get("model")
        with weights_named_on_failure(source):  # a damaged weights file is named, not a library traceback
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(source.name, trust_remote_code=cfg.trust_remote_code,
                                                          **source.kwargs)  # fmt: skip
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(source.name, dtype=DTYPES[cfg.torch_dtype],
                                                             trust_remote_code=cfg.trust_remote_code, **source.kwargs)  # fmt: skip
        # the LM head's chunk: the config's, or one that bounds a chunk's logits whatever the vocabulary
        vocab = model.get_output_embeddings().weight.shape[0]
        self.chunk_size = cfg.lm_head_chunk_size if cfg.lm_head_chunk_size is not None else chunk_size_for(vocab)
        if self.plan.chat_template is not None:  # the config's, in place of the tokenizer's own
            tokenizer.chat_template = self.plan.chat_template
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        return TextModels(tokenizer, model)

    def build_artifacts(self, models: TextModels, splits: Splits) -> Splits:
        """Token ids (and RPO's prompt embeddings) of every split; a stream is tokenized as it is read."""
        cfg, acc = self.cfg, self.accelerator
        limits = TokenLimits(cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode)
        embedding_model = cfg.rpo.embedding_model if self.plan.objective.needs_embeddings else False
        built = []
        for data, name in ((splits.train, "train"), (splits.eval, "eval")):
            if data is None or (not isinstance(data, DataPlan) and not len(data)):
                built.append(None)
            elif isinstance(data, DataPlan):
                ds, source, _ = data.stream
                built.append(TextStream(ds, source, models.tokenizer, limits, seed=cfg.seed, buffer=cfg.shuffle_buffer,
                                        rank=acc.process_index, world=acc.num_processes, on_bad_rows=cfg.on_bad_rows,
                                        chosen_scores_higher=self.plan.objective.chosen_scores_higher,
                                        columns=data.columns))  # fmt: skip
            else:
                built.append(TokenizedSplit.build(data, name, models.tokenizer, limits, acc, embedding_model))
        self.train, self.eval = built
        return Splits(*built)

    def make_reference(self, models: TextModels, splits: Splits) -> Reference | None:
        """``plan.reference``: log-probs precomputed by the untrained policy, a frozen copy, the LoRA base, or none."""
        kind, acc = self.plan.reference, self.accelerator
        self.reference: Reference | None = None
        if kind == "precomputed":
            compute = partial(reference_logps, accelerator=acc, batch_size=self.cfg.eval_batch_size,
                              chunk_size=self.chunk_size, pad_token_id=models.tokenizer.pad_token_id,
                              caches=self._reference_caches)  # fmt: skip
            models.model.to(acc.device)
            self.reference = Precomputed.build(models.model, [s for s in (splits.train, splits.eval) if s is not None],
                                               compute)  # fmt: skip
        elif kind == "frozen_copy":  # the weights as they are before training
            self.reference = FrozenCopy(models.model, acc.device)
        elif kind == "adapters_off":
            self.reference = AdaptersOff()
        return self.reference

    def wrap_for_training(self, models: TextModels) -> nn.Module:
        """Gradient checkpointing and LoRA (peft's ``get_peft_model``) as configured."""
        cfg, model = self.cfg, models.model
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora is not None:
            from peft import LoraConfig, get_peft_model

            lc = cfg.lora
            model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                     target_modules=lc.targets(self.modality), task_type="CAUSAL_LM"))  # fmt: skip
        self.model = model
        return model

    def _reference_caches(self, split: TokenizedSplit) -> tuple[Path | None, KeyedCache]:
        """The run's file of ``split``'s reference log-probs (``output_dir/cache``) and the chunk cache they
        are computed through (the data's cache folder, a folder per model and precision, a file per chunk
        named by its token ids); neither for an in-memory model, which has no identity to key them by."""
        if self.source is None:
            return None, KeyedCache(None)
        identity = self.source.identity()
        dtype, precision = self.cfg.torch_dtype, self.accelerator.mixed_precision
        model_id = hashlib.sha256(identity.encode()).hexdigest()[:16]
        name = f"ref_logps-{split.name}-{model_id}-{split.key}-{dtype}-{precision}.safetensors"
        cache = Path(self.cfg.output_dir) / "cache" / name
        folder = split.cache_dir / f"ref_logps-{short_hash(REF_VERSION, identity, dtype, precision)[:16]}"
        return cache, KeyedCache(folder)

    # -- what the loop calls --------------------------------------------------------------
    def collate_train(self, indices: list[int], epoch: int = 0) -> dict[str, Tensor]:
        return self.train.collate(indices, self.tokenizer.pad_token_id)

    def collate_eval(self, indices: list[int]) -> dict[str, Tensor]:
        return self.eval.collate(indices, self.tokenizer.pad_token_id)

    def rows(self, model: nn.Module, batch: dict[str, Tensor]) -> LogRatios:
        chunk = self.chunk_size
        logps, counts = response_logps(model, batch, chunk_size=chunk)
        ref = None if self.reference is None else self.reference.logps(model, batch, chunk)
        return LogRatios(
            logratios=logps if ref is None else logps - ref,
            row_index=batch["row_index"],
            lengths=counts.to(logps.dtype),
            policy_logps=logps,
            embeddings=batch.get("embeddings"),
            labels=batch.get("labels"),
            scores=batch.get("scores"),
        )

    def count_units(self, batch: dict[str, Tensor]) -> int:
        """Real (non-pad) tokens: every row has one position 0 (its first token); pads sit at 0 too."""
        return int((batch["position_ids"] > 0).sum()) + batch["position_ids"].shape[0]

    def save(self, model: nn.Module, out_dir: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """``final/`` loads with AutoModelForCausalLM; with LoRA it holds the adapter (and merged/).

        ``state_dict``: the gathered weights when the model is sharded (FSDP, ZeRO-3), else None.
        """
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        if self.cfg.lora is not None and self.cfg.lora.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(out_dir / "merged", safe_serialization=True)
            self.tokenizer.save_pretrained(out_dir / "merged")


@torch.no_grad()
def reference_logps(model: nn.Module, split: TokenizedSplit, *, accelerator, batch_size: int, chunk_size: int,
                    pad_token_id: int, caches=lambda split: (None, KeyedCache(None))) -> Tensor:  # fmt: skip
    """(rows, K) float32 summed response log-probs of every row of ``split`` under ``model`` (the policy before
    training, which *is* the reference, so no second model is loaded).

    It runs under the policy's numerics (dtype and the launcher's autocast), so ℓ is exactly 0 before the first
    step. ``caches(split)`` gives the run's file of the result and a :class:`~mmpref.files.KeyedCache` of chunks
    of :data:`REF_CHUNK_ROWS` rows, each stored as soon as it is done, so a rerun after a kill computes only the
    missing chunks; batch size and head chunks change the float rounding, so they are in each chunk's key and a
    resumed pass is bit-identical. Each process computes every P-th chunk; the chunks are then gathered.
    """
    acc = accelerator
    cache, store = caches(split)
    if cache is not None and cache.is_file():
        return load_file(cache)["ref_logps"]
    logger.info("reference log-probs of %d %s rows: computing once%s", len(split), split.name,
                f", cached in {cache} (chunks in {store.folder})" if cache is not None else "")  # fmt: skip
    bounds = chunks(len(split), REF_CHUNK_ROWS)
    mine = range(acc.process_index, len(bounds), acc.num_processes)
    keys = {c: short_hash(split.rows.digest(*bounds[c]), (batch_size, chunk_size)) for c in mine}
    done = {c for c in mine if store.has(keys[c])}  # shown as done from the start

    def chunk(start: int, stop: int) -> dict[str, Tensor]:
        out = []
        for first in range(start, stop, batch_size):
            batch = split.collate(list(range(first, min(first + batch_size, stop))), pad_token_id)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.autocast():  # as the policy's forward in the loop
                out.append(response_logps(model, batch, chunk_size=chunk_size)[0].float().cpu())
        return {"ref_logps": torch.cat(out)}

    results = []
    with progress(total=sum(bounds[c][1] - bounds[c][0] for c in mine), desc=f"reference {split.name}",
                  initial=sum(bounds[c][1] - bounds[c][0] for c in done), unit="row", accelerator=acc) as bar:  # fmt: skip
        for c in mine:
            results.append((c, store.get(keys[c], chunk, *bounds[c])["ref_logps"]))
            if c not in done:
                bar.update(bounds[c][1] - bounds[c][0])
    by_chunk = dict(gather_object(results))
    ref = torch.cat([by_chunk[c] for c in range(len(bounds))])
    if acc.is_main_process and cache is not None:
        atomic_save({"ref_logps": ref}, cache, what="cache file")
    return ref
