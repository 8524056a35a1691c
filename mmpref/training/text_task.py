"""Text preference training: model, data and reference for the one training loop."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

import datasets
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmpref.adapters.causal_lm import TokenizedRow, collate, response_logps, tokenize_row
from mmpref.data import TextDataset, prepare_text_dataset, prompt_embeddings, prompt_text
from mmpref.data.text import config_sources, held_out_split, iter_rows
from mmpref.hub import ModelSource
from mmpref.progress import progress
from mmpref.training.config import (
    DTYPES,
    ConfigError,
    TrainConfig,
    base_loss,
    custom_code_guard,
    model_source,
    score_checks,
)
from mmpref.training.distributed import check_scale_out
from mmpref.training.objective import Rows
from mmpref.training.task import Task

logger = logging.getLogger(__name__)


class PackedRows(Sequence[TokenizedRow]):
    """Tokenized rows in one flat buffer plus span offsets; ``rows[i]`` gives a TokenizedRow.

    2 bytes a token (4 once an id exceeds 65535) instead of ~36 for a Python int in a list, so 50k
    rows of a few hundred tokens take tens of MiB, not a GiB (``benchmarks/data_memory.py``).
    """

    def __init__(self) -> None:
        self._ids = array("H")  # uint16: every id of a vocabulary up to 65536 tokens
        self._starts = array("q", [0])  # start of every span (prompt, then each response), plus the end
        self._numbers = array("q")  # each row's number in its source file, to name it in messages
        self._spans_per_row = 0

    def append(self, row: TokenizedRow) -> None:
        spans = [row.prompt, *row.responses]
        self._spans_per_row = self._spans_per_row or len(spans)
        if len(spans) != self._spans_per_row:
            raise ValueError(
                f"row {row.index}: {len(spans) - 1} responses, the others have {self._spans_per_row - 1}"
            )
        for ids in spans:
            self._extend(ids)
            self._starts.append(len(self._ids))
        self._numbers.append(row.index)

    def _extend(self, ids: list[int]) -> None:
        size = len(self._ids)
        try:
            self._ids.extend(ids)
        except OverflowError:  # an id past uint16: widen the whole buffer to int32, once
            del self._ids[size:]
            self._ids = array("i", self._ids)
            self._ids.extend(ids)

    def __len__(self) -> int:
        return (len(self._starts) - 1) // max(1, self._spans_per_row)

    def __getitem__(self, i: int) -> TokenizedRow:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} outside {len(self)} rows")
        i %= len(self)
        first = i * self._spans_per_row
        spans = [self._ids[self._starts[k] : self._starts[k + 1]].tolist()
                 for k in range(first, first + self._spans_per_row)]  # fmt: skip
        return TokenizedRow(index=self._numbers[i], prompt=spans[0], responses=spans[1:])


class _Split:
    """One dataset split, tokenized, with everything a batch needs besides the model.

    ``rows`` is read once, a batch of rows at a time (the ``datasets.Dataset`` stays in its memory-mapped
    Arrow file); only the token ids (packed), labels, scores and prompt embeddings are kept.
    ``row_numbers[i]`` is the source file's number of ``rows[i]``, the ``row_index`` of messages.
    """

    def __init__(
        self, task: TextTask, data: TextDataset, rows: datasets.Dataset, row_numbers: Sequence[int], name: str
    ):
        cfg, tok = task.cfg, task.tokenizer
        self.name, self.format = name, data.format
        paired = data.format == "paired"
        want_embeddings = cfg.loss.type == "rpo" and cfg.rpo.mode != "diagonal"
        self.rows = PackedRows()
        labels, scores, prompts = array("b"), array("d"), []
        digest = hashlib.sha256(b"[")  # = sha256(json.dumps([[prompt, responses], ...])), row by row
        has_scores = paired and all(c in rows.column_names for c in ("score_chosen", "score_rejected"))
        bar = progress(iter_rows(rows), desc=f"tokenize {name}", total=len(rows), unit="row",
                       accelerator=task.accelerator)  # fmt: skip
        for i, r in enumerate(bar):
            row = tokenize_row(
                tok, row_numbers[i], r["prompt"], [r["chosen"], r["rejected"]] if paired else [r["completion"]],
                max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                truncation_mode=cfg.truncation_mode,
            )  # fmt: skip
            self.rows.append(row)
            digest.update(((", " if i else "") + json.dumps([row.prompt, row.responses])).encode())
            if has_scores and r["score_chosen"] is not None:  # validated: every row has them, or none
                scores.extend((r["score_chosen"], r["score_rejected"]))
            if not paired:
                labels.append(bool(r["label"]))
            if want_embeddings:
                prompts.append(prompt_text(r["prompt"]))
        digest.update(b"]")
        self.key = digest.hexdigest()[:16]
        self.labels = None if paired else torch.tensor(labels, dtype=torch.bool)
        self.scores = None
        if scores and len(scores) == 2 * len(self.rows):
            self.scores = torch.tensor(scores, dtype=torch.float32).view(-1, 2)
        self.embeddings = None
        if want_embeddings:
            self.embeddings = prompt_embeddings(
                prompts, model=cfg.rpo.embedding_model, cache_dir=data.cache_dir
            )
        self.ref_logps: Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, indices: list[int], pad_token_id: int) -> dict[str, Tensor]:
        batch = collate([self.rows[i] for i in indices], pad_token_id)
        for name in ("labels", "scores", "embeddings", "ref_logps"):
            value = getattr(self, name)
            if value is not None:
                batch[name] = value[indices]
        return batch


class TextTask(Task):
    """Causal-LM preference training (docs/design.md §1, §3): ℓ from summed response log-probs."""

    modality = "text"
    unit = "tokens"  # what count_units counts, for the throughput report

    def __init__(self, cfg: TrainConfig, accelerator, source: ModelSource | None = None,
                 model: nn.Module | None = None, tokenizer=None, train_dataset=None, eval_dataset=None):  # fmt: skip
        """``source``: the resolved ``model`` key (default: resolved here), unless ``model`` and ``tokenizer``
        are given already loaded; ``train_dataset`` / ``eval_dataset`` (in memory) replace the config's."""
        self.reference_free = base_loss(cfg.loss, cfg.rpo) == "simpo"
        frozen_copy = not self.reference_free and not cfg.precompute_ref and cfg.lora is None
        check_scale_out(cfg, accelerator, frozen_reference=frozen_copy, text=True)
        if source is None and model is None:
            source = model_source(cfg)
        self.cfg, self.accelerator, self.source = cfg, accelerator, source
        if model is None:
            self.tokenizer, self.model = self._load(source, tokenizer)
        else:
            if tokenizer is None:
                raise ConfigError(
                    "tokenizer: an already loaded model needs its tokenizer (train(..., tokenizer=))"
                )
            self.tokenizer, self.model = tokenizer, model
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

        (train_data, options), evaluation = config_sources(cfg, train_dataset, eval_dataset)
        scores = score_checks(cfg)  # odpo / rdpo: the score columns the loss reads
        train = prepare_text_dataset(train_data, on_bad_rows=cfg.on_bad_rows, **scores, **options)
        # rows are read a batch at a time while tokenizing, not copied to Python
        train_rows, train_numbers = train.dataset, train.row_numbers
        eval_rows: datasets.Dataset | None = None
        if evaluation is not None:  # eval data of its own, or a named split
            eval_data, options = evaluation
            evald = prepare_text_dataset(eval_data, on_bad_rows=cfg.on_bad_rows, **scores, **options)
            eval_rows, eval_numbers = evald.dataset, evald.row_numbers
        else:
            evald = train
            if cfg.eval_split:
                train_order, eval_order = held_out_split(len(train_rows), cfg.eval_split, cfg.seed)
                eval_rows = train_rows.select(eval_order, keep_in_memory=True)
                eval_numbers = array("q", (train_numbers[i] for i in eval_order))
                train_rows = train_rows.select(train_order, keep_in_memory=True)
                train_numbers = array("q", (train_numbers[i] for i in train_order))
        if cfg.loss.type != "rpo" and train.format == "unpaired":
            raise ConfigError(
                "loss.type: unpaired data (prompt, completion, label) trains with loss.type=rpo"
            )
        self.train = _Split(self, train, train_rows, train_numbers, "train")
        self.eval = None
        if eval_rows is not None and len(eval_rows):
            self.eval = _Split(self, evald, eval_rows, eval_numbers, "eval")

        self.reference: nn.Module | None = None
        if not self.reference_free:
            if cfg.precompute_ref:
                for split in (self.train, self.eval):
                    if split is not None:
                        split.ref_logps = self._precompute(split)
            elif cfg.lora is None:  # a frozen copy of the weights as they are before training
                self.reference = copy.deepcopy(self.model)
                self.reference.requires_grad_(False).eval().to(accelerator.device)

        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora is not None:
            from peft import LoraConfig, get_peft_model

            lc = cfg.lora
            self.model = get_peft_model(
                self.model,
                LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                           target_modules=lc.targets(self.modality), task_type="CAUSAL_LM"),
            )  # fmt: skip

    def _load(self, source: ModelSource, tokenizer=None):
        """Tokenizer and causal LM of a hub id or folder, through transformers' ``from_pretrained``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.cfg
        with custom_code_guard(source.name):  # trust_remote_code is false unless the config says so
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(
                    source.name, trust_remote_code=cfg.trust_remote_code, **source.kwargs
                )
            model = AutoModelForCausalLM.from_pretrained(
                source.name,
                dtype=DTYPES[cfg.torch_dtype],
                trust_remote_code=cfg.trust_remote_code,
                **source.kwargs,
            )
        return tokenizer, model

    # -- reference ------------------------------------------------------------------------
    @torch.no_grad()
    def _precompute(self, split: _Split) -> Tensor:
        """Reference log-probs of every row, once, cached in the output folder.

        The policy before training *is* the reference, so no second model is loaded. It runs under the
        policy's numerics (dtype and the launcher's autocast), so ℓ is exactly 0 before the first step;
        the precision is part of the cache key. Each process computes a strided share of the rows; the
        shares are then gathered.
        """
        acc = self.accelerator
        cache = None
        if self.source is not None:  # an in-memory model has no identity to key a cache by
            model_id = hashlib.sha256(self.source.identity().encode()).hexdigest()[:16]
            key = f"{model_id}-{split.key}-{self.cfg.torch_dtype}-{acc.mixed_precision}"
            cache = Path(self.cfg.output_dir) / "cache" / f"ref_logps-{split.name}-{key}.safetensors"
            if cache.is_file():
                return load_file(cache)["ref_logps"]
        logger.info("reference log-probs of %d %s rows: computing once%s", len(split), split.name,
                    f", cached in {cache}" if cache is not None else "")  # fmt: skip
        model = self.model.to(acc.device).eval()
        mine = list(range(acc.process_index, len(split), acc.num_processes))
        results = []
        bs = self.cfg.eval_batch_size
        with progress(total=len(mine), desc=f"reference {split.name}", unit="row", accelerator=acc) as bar:
            for start in range(0, len(mine), bs):
                idx = mine[start : start + bs]
                batch = split.collate(idx, self.tokenizer.pad_token_id)
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                with acc.autocast():  # as the policy's forward in the loop
                    logps = response_logps(model, batch, chunk_size=self.cfg.lm_head_chunk_size)[0]
                results.extend(zip(idx, logps.float().cpu().tolist()))
                bar.update(len(idx))
        ref = torch.zeros(len(split), len(split.rows[0].responses))
        for i, values in gather_object(results):
            ref[i] = torch.tensor(values)
        if acc.is_main_process and cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            save_file({"ref_logps": ref}, tmp)
            os.replace(tmp, cache)
        model.train()
        return ref

    def _reference_logps(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor | None:
        if self.reference_free:
            return None
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad():
            if self.reference is not None:
                return response_logps(self.reference, batch, chunk_size=self.cfg.lm_head_chunk_size)[0]
            with self.accelerator.unwrap_model(
                model
            ).disable_adapter():  # LoRA: the base model is the reference
                return response_logps(model, batch, chunk_size=self.cfg.lm_head_chunk_size)[0]

    # -- what the loop calls --------------------------------------------------------------
    def collate_train(self, indices: list[int]) -> dict[str, Tensor]:
        return self.train.collate(indices, self.tokenizer.pad_token_id)

    def collate_eval(self, indices: list[int]) -> dict[str, Tensor]:
        return self.eval.collate(indices, self.tokenizer.pad_token_id)

    def rows(self, model: nn.Module, batch: dict[str, Tensor]) -> Rows:
        logps, counts = response_logps(model, batch, chunk_size=self.cfg.lm_head_chunk_size)
        ref = self._reference_logps(model, batch)
        return Rows(
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
