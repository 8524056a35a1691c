"""Text preference training: model, data and reference for the one training loop."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file
from torch import Tensor, nn

from mmpref.adapters.causal_lm import TokenizedRow, collate, response_logps, tokenize_row
from mmpref.data import TextDataset, prepare_text_dataset, prompt_text
from mmpref.data.row_cache import atomic_save
from mmpref.data.text import (
    ROWS_PER_BATCH,
    DataError,
    config_sources,
    held_out_split,
    indexed_prompt_embeddings,
    iter_rows,
)
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

TOKENS_VERSION = "mmpref-tokens-1"  # in every token-cache key: a change to tokenize_row makes new entries
REF_VERSION = "mmpref-ref-1"  # in every reference-chunk key
TOKEN_CHUNK_ROWS = 1000  # rows of one token-cache file: at most this much is tokenized again after a kill
REF_CHUNK_ROWS = 512  # rows of one reference-cache file


class PackedRows(Sequence[TokenizedRow]):
    """Tokenized rows in one flat buffer plus span offsets; ``rows[i]`` gives a TokenizedRow.

    2 bytes a token (4 once an id exceeds 65535) instead of ~36 for a Python int in a list, so 50k
    rows of a few hundred tokens take tens of MiB, not a GiB (``benchmarks/data_memory.py``).
    Rows arrive one at a time (:meth:`append`) or a cache chunk at a time (:meth:`extend`); both give
    the same buffers.
    """

    def __init__(self) -> None:
        self._ids = array("H")  # uint16: every id of a vocabulary up to 65536 tokens
        self._starts = array("q", [0])  # start of every span (prompt, then each response), plus the end
        self._numbers = array("q")  # each row's number in its source file, to name it in messages
        self._spans_per_row = 0

    def append(self, row: TokenizedRow) -> None:
        spans = [row.prompt, *row.responses]
        self._check_spans(len(spans), row.index)
        for ids in spans:
            self._extend(ids)
            self._starts.append(len(self._ids))
        self._numbers.append(row.index)

    def extend(self, ids: Tensor, lengths: Tensor, numbers: Sequence[int]) -> None:
        """Append ``len(numbers)`` rows given as :meth:`tensors` holds them (their source row numbers apart)."""
        self._check_spans(len(lengths) // max(1, len(numbers)), numbers[0] if len(numbers) else 0)
        if ids.dtype == torch.int32 and self._ids.typecode == "H":
            self._ids = array("i", self._ids)  # the chunk holds an id past uint16: widen, as append does
        self._ids.frombytes(ids.to(_TORCH_DTYPES[self._ids.typecode]).numpy().tobytes())
        ends = self._starts[-1] + torch.cumsum(lengths.to(torch.int64), 0)
        self._starts.frombytes(ends.numpy().tobytes())
        self._numbers.extend(numbers)

    def tensors(self) -> dict[str, Tensor]:
        """The token ids (uint16, or int32 once widened) and every span's length: a cache chunk's content."""
        starts = _tensor(self._starts, torch.int64)
        return {"ids": _tensor(self._ids, _TORCH_DTYPES[self._ids.typecode]),
                "lengths": (starts[1:] - starts[:-1]).to(torch.int32)}  # fmt: skip

    def digest(self, start: int = 0, stop: int | None = None) -> str:
        """sha256 of the token ids and span boundaries of rows ``start:stop`` (not their row numbers)."""
        stop = len(self) if stop is None else stop
        first, last = start * self._spans_per_row, stop * self._spans_per_row
        lo, hi = self._starts[first], self._starts[last]
        h = hashlib.sha256(f"{self._ids.typecode}{self._spans_per_row}".encode())
        h.update(memoryview(self._ids)[lo:hi])
        h.update(array("q", (s - lo for s in self._starts[first : last + 1])))
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        """Bytes of the token ids (the floor of what a run keeps)."""
        return len(self._ids) * self._ids.itemsize

    def _check_spans(self, spans: int, index: int) -> None:
        self._spans_per_row = self._spans_per_row or spans
        if spans != self._spans_per_row:
            raise ValueError(f"row {index}: {spans - 1} responses, the others have {self._spans_per_row - 1}")

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


_TORCH_DTYPES = {"H": torch.uint16, "i": torch.int32}  # PackedRows' buffer typecodes as tensor dtypes


def _tensor(values: array, dtype: torch.dtype) -> Tensor:
    """A copy of an ``array`` as a tensor, through its buffer (no Python int per element)."""
    return torch.frombuffer(values, dtype=dtype).clone() if len(values) else torch.empty(0, dtype=dtype)


class _ChunkStore:
    """The chunks of one long computation as files in ``folder``, one per chunk, named by the chunk's content key.

    Each file is written to a temporary name and renamed (``atomic_save``), so a killed run leaves only
    whole chunks and a rerun computes only the missing ones. ``folder=None`` caches nothing.
    """

    def __init__(self, folder: Path | None):
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def has(self, key: str) -> bool:
        return self.folder is not None and (self.folder / f"{key}.safetensors").is_file()

    def get(self, key: str, compute: Callable[..., dict[str, Tensor]], *args: object) -> dict[str, Tensor]:
        """The chunk ``key``, read back, or computed (``compute(*args)``) and stored."""
        if self.has(key):
            try:
                return load_file(self.folder / f"{key}.safetensors")
            except Exception as exc:  # a foreign or damaged file: recompute rather than fail
                logger.warning("ignoring unreadable cache chunk %s (%s); recomputing", key, exc)
        tensors = compute(*args)
        if self.folder is not None:
            atomic_save(tensors, self.folder / f"{key}.safetensors")
        return tensors


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of ``size`` rows covering ``n`` rows."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _short_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of what :func:`tokenize_row` reads from ``tokenizer``, or None when it cannot be read (then
    nothing is cached): the fast tokenizer's whole definition (vocabulary, merges, normalizer, pre- and
    post-processor, added tokens), its chat template and special tokens, and the library versions."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers
    import transformers

    return _short_hash(type(tokenizer).__name__, backend.to_str(), tokenizer.chat_template,
                       tokenizer.special_tokens_map, tokenizer.bos_token_id, tokenizer.eos_token_id,
                       transformers.__version__, tokenizers.__version__)  # fmt: skip


def _row_chunk_keys(rows: datasets.Dataset, columns: list[str], size: int) -> Iterator[str]:
    """A content key per chunk of ``size`` rows: sha256 of its Arrow data (schema included), one chunk at a time."""
    for table in rows.select_columns(columns).with_format("arrow").iter(batch_size=size):
        sink = pa.BufferOutputStream()
        table = table.combine_chunks()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        yield hashlib.sha256(sink.getvalue()).hexdigest()[:32]


def _token_store(task: TextTask, cache_dir: Path, columns: list[str]) -> _ChunkStore:
    """Where the token chunks of ``columns`` go: a folder named by the tokenizer and the length settings
    (no cache when the tokenizer cannot be fingerprinted)."""
    fingerprint, cfg = tokenizer_fingerprint(task.tokenizer), task.cfg
    if fingerprint is None:
        return _ChunkStore(None)
    settings = _short_hash(TOKENS_VERSION, fingerprint, cfg.max_length, cfg.max_prompt_length,
                           cfg.truncation_mode, columns)  # fmt: skip
    return _ChunkStore(cache_dir / f"tokens-{settings[:16]}")


def _tokenize_chunk(
    task: TextTask, rows: datasets.Dataset, row_numbers: Sequence[int], start: int, stop: int
) -> dict[str, Tensor]:
    """Rows ``start:stop`` tokenized, as :meth:`PackedRows.tensors` (a token-cache chunk)."""
    cfg, part = task.cfg, PackedRows()
    for i, r in enumerate(iter_rows(rows.select(range(start, stop))), start=start):
        responses = [r["chosen"], r["rejected"]] if "chosen" in r else [r["completion"]]
        part.append(tokenize_row(task.tokenizer, row_numbers[i], r["prompt"], responses, max_length=cfg.max_length,
                                 max_prompt_length=cfg.max_prompt_length, truncation_mode=cfg.truncation_mode))  # fmt: skip
    return part.tensors()


class _Split:
    """One dataset split, tokenized, with everything a batch needs besides the model.

    ``rows`` is read a chunk of rows at a time (the ``datasets.Dataset`` stays in its memory-mapped Arrow
    file); only the token ids (packed), labels, scores and prompt embeddings are kept, none as a Python
    object per row. The token ids go through a chunked cache in the data's cache folder (:meth:`_tokenize`).
    ``row_numbers[i]`` is the source file's number of ``rows[i]``, the ``row_index`` of messages.
    """

    streamed = False  # rows read and tokenized ahead (a streamed split reads them as training goes)

    def __init__(
        self, task: TextTask, data: TextDataset, rows: datasets.Dataset, row_numbers: Sequence[int], name: str
    ):
        cfg = task.cfg
        self.name, self.format, self.cache_dir = name, data.format, data.cache_dir
        paired = data.format == "paired"
        self.rows = self._tokenize(task, rows, row_numbers, paired)
        self.key = self.rows.digest()[:16]
        self.labels = None if paired else torch.from_numpy(_column(rows, "label").astype(bool))
        self.scores = _scores(rows) if paired else None
        self.embeddings: Tensor | None = None  # RPO: one per distinct prompt; prompt_index[i] is row i's
        self.prompt_index: Tensor | None = None
        if cfg.loss.type == "rpo" and cfg.rpo.mode != "diagonal":
            self.embeddings, self.prompt_index = indexed_prompt_embeddings(
                _prompts(rows), model=cfg.rpo.embedding_model, cache_dir=data.cache_dir
            )
        self.ref_logps: Tensor | None = None

    def _tokenize(self, task: TextTask, rows: datasets.Dataset, row_numbers: Sequence[int], paired: bool
                  ) -> PackedRows:  # fmt: skip
        """Every row tokenized, a chunk of :data:`TOKEN_CHUNK_ROWS` rows at a time, each chunk cached.

        A chunk's file is named by a hash of its rows' Arrow data, in a folder named by the tokenizer and
        the length settings, so a rerun after a kill tokenizes only the chunks that were not finished, and
        edited rows or other settings never read stale ids. Under several processes each tokenizes every
        P-th chunk, then reads the others' (or tokenizes them itself, when it cannot see them).
        """
        acc = task.accelerator
        columns = ["prompt", "chosen", "rejected"] if paired else ["prompt", "completion"]
        store = _token_store(task, self.cache_dir, columns)
        bounds = _chunks(len(rows), TOKEN_CHUNK_ROWS)
        keys = list(_row_chunk_keys(rows, columns, TOKEN_CHUNK_ROWS))
        args = (task, rows.select_columns(columns), row_numbers)
        done = {c for c, key in enumerate(keys) if store.has(key)}  # shown as done from the start
        packed = PackedRows()
        with progress(total=len(rows), initial=sum(b - a for c, (a, b) in enumerate(bounds) if c in done),
                      desc=f"tokenize {self.name}", unit="row", accelerator=acc) as bar:  # fmt: skip
            if acc.num_processes > 1 and store.folder is not None:
                for c in range(acc.process_index, len(bounds), acc.num_processes):
                    if c not in done:
                        store.get(keys[c], _tokenize_chunk, *args, *bounds[c])
                        bar.update(bounds[c][1] - bounds[c][0])
                        done.add(c)
                acc.wait_for_everyone()
            for c, (a, b) in enumerate(bounds):
                part = store.get(keys[c], _tokenize_chunk, *args, a, b)
                packed.extend(part["ids"], part["lengths"], row_numbers[a:b])
                if c not in done:
                    bar.update(b - a)
        return packed

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, indices: list[int], pad_token_id: int) -> dict[str, Tensor]:
        batch = collate([self.rows[i] for i in indices], pad_token_id)
        for name in ("labels", "scores", "ref_logps"):
            value = getattr(self, name)
            if value is not None:
                batch[name] = value[indices]
        if self.embeddings is not None:  # one per distinct prompt, or one per row without prompt_index
            rows = indices if self.prompt_index is None else self.prompt_index[indices]
            batch["embeddings"] = self.embeddings[rows]
        return batch


class _StreamedSplit(torch.utils.data.IterableDataset):
    """The training split of ``streaming: true``: rows checked and tokenized as the stream gives them.

    Each epoch reshuffles the stream (``datasets``' shard shuffle and a ``shuffle_buffer``-row buffer, seeded
    by ``seed`` and the epoch); each process reads its own shards. A stream has no row numbers of its own:
    ``row_index`` counts the rows this process read in this epoch. A bad row stops the run naming that count
    and the reason (``on_bad_rows: error``) or is left out with a warning (``skip``). No reference pass runs
    ahead (refused at plan time): the frozen reference, or the LoRA base, runs every step.
    """

    streamed = True
    labels = None
    name = "train"

    def __init__(self, task: TextTask, source, options: dict):
        from mmpref.data.text import SCORE_COLUMNS, detect_format, needs_prompt_extraction, open_stream

        ds, self.source, _ = open_stream(source, **options)
        columns = ds.column_names or list(next(iter(ds)))
        try:
            self.format = detect_format(columns)
        except DataError as exc:
            raise DataError(f"{self.source}: {exc}") from exc
        self.implicit = self.format == "paired" and (
            "prompt" not in columns or (ds.features is not None and needs_prompt_extraction(ds.features))
        )
        self.score_columns = [c for c in SCORE_COLUMNS if self.format == "paired" and c in columns]
        self.task, self.ds, self.epoch = task, ds, 0

    def stream(self, epoch: int) -> _StreamedSplit:
        out = copy.copy(self)
        out.epoch = epoch
        return out

    def __iter__(self) -> Iterator[tuple[TokenizedRow, dict]]:
        from datasets.distributed import split_dataset_by_node

        from mmpref.data.text import extract_prompt, row_problems

        cfg, acc, tok = self.task.cfg, self.task.accelerator, self.task.tokenizer
        ds = self.ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
        ds.set_epoch(self.epoch)
        if acc.num_processes > 1:
            ds = split_dataset_by_node(ds, rank=acc.process_index, world_size=acc.num_processes)
        scores = score_checks(cfg)
        for n, row in enumerate(ds):
            if self.implicit and isinstance(row.get("chosen"), (str, list)) and isinstance(row.get("rejected"), (str, list)):
                if row["chosen"] and row["rejected"] and type(row["chosen"]) is type(row["rejected"]):
                    row = {**row, **dict(zip(("prompt", "chosen", "rejected"), extract_prompt(row["chosen"], row["rejected"])))}
            problems = row_problems(row, self.format, self.score_columns, implicit_prompt=self.implicit,
                                    chosen_scores_higher=scores["chosen_scores_higher"])  # fmt: skip
            if problems:
                where = f"{self.source}: row {n} of process {acc.process_index}'s stream in epoch {self.epoch}"
                if cfg.on_bad_rows == "error":
                    raise DataError(f"{where}: {'; '.join(problems)}. Fix it, or set `on_bad_rows: skip`")
                logger.warning("%s skipped (on_bad_rows=skip): %s", where, "; ".join(problems))
                continue
            paired = self.format == "paired"
            answers = [row["chosen"], row["rejected"]] if paired else [row["completion"]]
            tokens = tokenize_row(tok, n, row["prompt"], answers, max_length=cfg.max_length,
                                  max_prompt_length=cfg.max_prompt_length, truncation_mode=cfg.truncation_mode)  # fmt: skip
            extra = {"labels": bool(row["label"])} if not paired else {}
            if len(self.score_columns) == 2:
                extra["scores"] = (float(row["score_chosen"]), float(row["score_rejected"]))
            yield tokens, extra

    def collate(self, items: list[tuple[TokenizedRow, dict]], pad_token_id: int) -> dict[str, Tensor]:
        batch = collate([tokens for tokens, _ in items], pad_token_id)
        for name, dtype in (("labels", torch.bool), ("scores", torch.float32)):
            if name in items[0][1]:
                batch[name] = torch.tensor([extra[name] for _, extra in items], dtype=dtype)
        return batch


def _column(rows: datasets.Dataset, name: str):
    """One column of every row as a numpy array, read through Arrow (no Python object per row)."""
    return rows.select_columns([name]).with_format("arrow")[:][name].to_numpy()


def _scores(rows: datasets.Dataset) -> Tensor | None:
    """(rows, 2) float32 ``score_chosen``, ``score_rejected``; None unless every row has both (validated:
    every row has them, or none)."""
    names = ("score_chosen", "score_rejected")
    if not all(n in rows.column_names for n in names):
        return None
    table = rows.select_columns(list(names)).with_format("arrow")[:]
    if any(table[n].null_count for n in names):
        return None
    return torch.from_numpy(np.stack([table[n].to_numpy().astype(np.float64) for n in names], axis=1)).float()


def _prompts(rows: datasets.Dataset) -> Iterator[str]:
    """Each row's prompt as the sentence embedder reads it, a batch of rows at a time."""
    for batch in rows.select_columns(["prompt"]).iter(batch_size=ROWS_PER_BATCH):
        yield from map(prompt_text, batch["prompt"])


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
        eval_rows: datasets.Dataset | None = None
        if cfg.streaming:  # the training rows are read as training goes (the plan refused a held-out share)
            self.train, train = _StreamedSplit(self, train_data, options), None
        else:
            train = prepare_text_dataset(train_data, on_bad_rows=cfg.on_bad_rows, **scores, **options)
            # rows are read a batch at a time while tokenizing, not copied to Python
            train_rows, train_numbers = train.dataset, train.row_numbers
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
        if cfg.loss.type != "rpo" and (train or self.train).format == "unpaired":
            raise ConfigError(
                "loss.type: unpaired data (prompt, completion, label) trains with loss.type=rpo"
            )
        if train is not None:
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
        the precision is part of the cache key. The rows go in chunks of :data:`REF_CHUNK_ROWS`, each
        cached in the data's cache folder as soon as it is done (:meth:`_reference_caches`), so a rerun
        after a kill computes only the missing chunks. Each process computes every P-th chunk; the chunks
        are then gathered.
        """
        acc = self.accelerator
        cache, chunks = self._reference_caches(split)
        if cache is not None and cache.is_file():
            return load_file(cache)["ref_logps"]
        logger.info("reference log-probs of %d %s rows: computing once%s", len(split), split.name,
                    f", cached in {cache} (chunks in {chunks.folder})" if cache is not None else "")  # fmt: skip
        model = self.model.to(acc.device).eval()
        bounds = _chunks(len(split), REF_CHUNK_ROWS)
        mine = range(acc.process_index, len(bounds), acc.num_processes)
        # batch size and head chunks change the float rounding: in the key, so a resumed pass is bit-identical
        numerics = (self.cfg.eval_batch_size, self.cfg.lm_head_chunk_size)
        keys = {c: _short_hash(split.rows.digest(*bounds[c]), numerics) for c in mine}
        done = {c for c in mine if chunks.has(keys[c])}  # shown as done from the start
        results = []
        with progress(total=sum(bounds[c][1] - bounds[c][0] for c in mine), desc=f"reference {split.name}",
                      initial=sum(bounds[c][1] - bounds[c][0] for c in done), unit="row", accelerator=acc) as bar:  # fmt: skip
            for c in mine:
                part = chunks.get(keys[c], self._reference_chunk, model, split, *bounds[c])
                results.append((c, part["ref_logps"]))
                if c not in done:
                    bar.update(bounds[c][1] - bounds[c][0])
        by_chunk = dict(gather_object(results))
        ref = torch.cat([by_chunk[c] for c in range(len(bounds))])
        if acc.is_main_process and cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_save({"ref_logps": ref}, cache)
        model.train()
        return ref

    def _reference_caches(self, split: _Split) -> tuple[Path | None, _ChunkStore]:
        """The run's file of ``split``'s reference log-probs (``output_dir/cache``) and the chunk store they
        are computed through (the data's cache folder, a folder per model and precision, a file per chunk
        named by its token ids); neither for an in-memory model, which has no identity to key them by."""
        if self.source is None:
            return None, _ChunkStore(None)
        identity = self.source.identity()
        dtype, precision = self.cfg.torch_dtype, self.accelerator.mixed_precision
        model_id = hashlib.sha256(identity.encode()).hexdigest()[:16]
        name = f"ref_logps-{split.name}-{model_id}-{split.key}-{dtype}-{precision}.safetensors"
        cache = Path(self.cfg.output_dir) / "cache" / name
        folder = split.cache_dir / f"ref_logps-{_short_hash(REF_VERSION, identity, dtype, precision)[:16]}"
        return cache, _ChunkStore(folder)

    def _reference_chunk(self, model: nn.Module, split: _Split, start: int, stop: int) -> dict[str, Tensor]:
        """``ref_logps``: (stop - start, K) float32 summed response log-probs of rows ``start:stop``, a batch
        at a time."""
        acc, bs, out = self.accelerator, self.cfg.eval_batch_size, []
        for first in range(start, stop, bs):
            batch = split.collate(list(range(first, min(first + bs, stop))), self.tokenizer.pad_token_id)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.autocast():  # as the policy's forward in the loop
                out.append(
                    response_logps(model, batch, chunk_size=self.cfg.lm_head_chunk_size)[0].float().cpu()
                )
        return {"ref_logps": torch.cat(out)}

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
    def collate_train(self, indices: list[int], epoch: int = 0) -> dict[str, Tensor]:
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
