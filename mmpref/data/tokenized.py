"""Tokenized text rows: a validated split's token ids in one packed buffer, cached in content-keyed chunks, and
a streamed split tokenized as it is read; with the labels, scores and RPO prompt embeddings a batch reads.

Nothing here holds a Python object per row: token ids are packed (2 bytes a token), labels and scores are
tensors, prompt embeddings one per distinct prompt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from mmpref.adapters.causal_lm import TokenizedRow, collate, tokenize_row
from mmpref.data.embeddings import indexed_prompt_embeddings, prompt_text
from mmpref.data.errors import DataError
from mmpref.data.splits import ROWS_PER_BATCH, iter_rows
from mmpref.data.validation import TextDataset, label_tensor
from mmpref.files import KeyedCache
from mmpref.progress import progress

logger = logging.getLogger(__name__)

TOKENS_VERSION = "mmpref-tokens-1"  # in every token-cache key: a change to tokenize_row makes new entries
TOKEN_CHUNK_ROWS = 1000  # rows of one token-cache file: at most this much is tokenized again after a kill


@dataclass(frozen=True)
class TokenLimits:
    """How rows are cut to length (``max_length``, ``max_prompt_length``, ``truncation_mode`` of the config)."""

    max_length: int
    max_prompt_length: int
    truncation_mode: str

    def tokenize(self, tokenizer, number: int, prompt, answers: list) -> TokenizedRow:
        return tokenize_row(tokenizer, number, prompt, answers, max_length=self.max_length,
                            max_prompt_length=self.max_prompt_length, truncation_mode=self.truncation_mode)  # fmt: skip


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



def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of ``size`` rows covering ``n`` rows."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def short_hash(*parts: object) -> str:
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

    return short_hash(type(tokenizer).__name__, backend.to_str(), tokenizer.chat_template,
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



def _token_store(tokenizer, limits: TokenLimits, cache_dir: Path, columns: list[str]) -> KeyedCache:
    """Where the token chunks of ``columns`` go: a folder named by the tokenizer and the length settings
    (no cache when the tokenizer cannot be fingerprinted)."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return KeyedCache(None)
    settings = short_hash(TOKENS_VERSION, fingerprint, limits.max_length, limits.max_prompt_length,
                          limits.truncation_mode, columns)  # fmt: skip
    return KeyedCache(cache_dir / f"tokens-{settings[:16]}")


def _tokenize_chunk(tokenizer, limits: TokenLimits, rows: datasets.Dataset, row_numbers: Sequence[int], start: int,
                    stop: int) -> dict[str, Tensor]:  # fmt: skip
    """Rows ``start:stop`` tokenized, as :meth:`PackedRows.tensors` (a token-cache chunk)."""
    part = PackedRows()
    for i, r in enumerate(iter_rows(rows.select(range(start, stop))), start=start):
        answers = [r["chosen"], r["rejected"]] if "chosen" in r else [r["completion"]]
        part.append(limits.tokenize(tokenizer, row_numbers[i], r["prompt"], answers))
    return part.tensors()


class TokenizedSplit:
    """One dataset split, tokenized, with everything a batch needs besides the model.

    The rows stay in their memory-mapped Arrow file and are read a chunk at a time; only the token ids (packed),
    labels, scores, prompt embeddings and, once computed, the reference log-probs (``ref_logps``) are kept, none
    as a Python object per row. ``self.rows[i].index`` is the source's number of row ``i``, the ``row_index`` of
    messages.
    """

    streamed = False  # rows read and tokenized ahead (a streamed split reads them as training goes)

    def __init__(self, name: str, format: str, cache_dir: Path, rows: PackedRows, labels: Tensor | None,
                 scores: Tensor | None, embeddings: Tensor | None = None, prompt_index: Tensor | None = None):  # fmt: skip
        self.name, self.format, self.cache_dir, self.rows = name, format, cache_dir, rows
        self.key = rows.digest()[:16]
        self.labels, self.scores = labels, scores
        self.embeddings, self.prompt_index = embeddings, prompt_index  # RPO: one per distinct prompt
        self.ref_logps: Tensor | None = None  # a Precomputed reference's, per row

    @classmethod
    def build(cls, data: TextDataset, name: str, tokenizer, limits: TokenLimits, accelerator,
              embedding_model: str | None | bool = False) -> TokenizedSplit:  # fmt: skip
        """Tokenize ``data`` (a chunk of :data:`TOKEN_CHUNK_ROWS` rows at a time, each chunk cached) and read its
        labels and scores; with ``embedding_model`` (not False: None is the packaged default) embed its prompts.

        A chunk's file is named by a hash of its rows' Arrow data, in a folder named by the tokenizer and the
        length settings, so a rerun after a kill tokenizes only the chunks that were not finished, and edited
        rows or other settings never read stale ids. Under several processes each tokenizes every P-th chunk,
        then reads the others' (or tokenizes them itself, when it cannot see them).
        """
        rows, paired = data.dataset, data.format == "paired"
        packed = _tokenize(rows, data.row_numbers, paired, name, tokenizer, limits, data.cache_dir, accelerator)
        labels = None if paired else label_tensor(rows)
        embeddings = prompt_index = None
        if embedding_model is not False:
            embeddings, prompt_index = indexed_prompt_embeddings(_prompts(rows), model=embedding_model,
                                                                 cache_dir=data.cache_dir)  # fmt: skip
        return cls(name, data.format, data.cache_dir, packed, labels, _scores(rows) if paired else None, embeddings,
                   prompt_index)  # fmt: skip

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


def _tokenize(rows: datasets.Dataset, row_numbers: Sequence[int], paired: bool, name: str, tokenizer,
              limits: TokenLimits, cache_dir: Path, acc) -> PackedRows:  # fmt: skip
    """Every row tokenized through the chunk cache (:meth:`TokenizedSplit.build`)."""
    columns = ["prompt", "chosen", "rejected"] if paired else ["prompt", "completion"]
    store = _token_store(tokenizer, limits, cache_dir, columns)
    bounds = chunks(len(rows), TOKEN_CHUNK_ROWS)
    keys = list(_row_chunk_keys(rows, columns, TOKEN_CHUNK_ROWS))
    args = (tokenizer, limits, rows.select_columns(columns), row_numbers)
    done = {c for c, key in enumerate(keys) if store.has(key)}  # shown as done from the start
    packed = PackedRows()
    with progress(total=len(rows), initial=sum(b - a for c, (a, b) in enumerate(bounds) if c in done),
                  desc=f"tokenize {name}", unit="row", accelerator=acc) as bar:  # fmt: skip
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


class TextStream(torch.utils.data.IterableDataset):
    """The training split of ``streaming: true``: rows checked and tokenized as the stream gives them.

    Each epoch reshuffles the stream (``datasets``' shard shuffle and a ``shuffle_buffer``-row buffer, seeded
    by ``seed`` and the epoch); each process reads its own shards. A stream has no row numbers of its own:
    ``row_index`` counts the rows this process read in this epoch. A bad row stops the run naming that count
    and the reason (``on_bad_rows: error``) or is left out with a warning (``skip``). No reference pass runs
    ahead (refused by the plan): the frozen reference, or the LoRA base, runs every step.
    """

    streamed = True
    labels = None
    name = "train"

    def __init__(self, ds: datasets.IterableDataset, source: str, tokenizer, limits: TokenLimits, *, seed: int,
                 buffer: int, rank: int, world: int, on_bad_rows: str, chosen_scores_higher: bool,
                 columns: Sequence[str] | None = None):  # fmt: skip
        """``columns``: the stream's column names when known already (else read from its features or first row)."""
        from mmpref.data.text_formats import SCORE_COLUMNS, detect_format, needs_prompt_extraction

        columns = columns or ds.column_names or list(next(iter(ds)))
        try:
            self.format = detect_format(columns)
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from exc
        self.implicit = self.format == "paired" and (
            "prompt" not in columns or (ds.features is not None and needs_prompt_extraction(ds.features))
        )
        self.score_columns = [c for c in SCORE_COLUMNS if self.format == "paired" and c in columns]
        self.ds, self.source, self.tokenizer, self.limits = ds, source, tokenizer, limits
        self.seed, self.buffer, self.rank, self.world = seed, buffer, rank, world
        self.on_bad_rows, self.chosen_scores_higher, self.epoch = on_bad_rows, chosen_scores_higher, 0

    def stream(self, epoch: int) -> TextStream:
        out = copy.copy(self)
        out.epoch = epoch
        return out

    def __iter__(self) -> Iterator[tuple[TokenizedRow, dict]]:
        from datasets.distributed import split_dataset_by_node

        from mmpref.data.text_formats import extract_prompt
        from mmpref.data.validation import row_problems

        ds = self.ds.shuffle(seed=self.seed, buffer_size=self.buffer)
        ds.set_epoch(self.epoch)
        if self.world > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
        for n, row in enumerate(ds):
            if self.implicit and isinstance(row.get("chosen"), (str, list)) and isinstance(row.get("rejected"), (str, list)):
                if row["chosen"] and row["rejected"] and type(row["chosen"]) is type(row["rejected"]):
                    row = {**row, **dict(zip(("prompt", "chosen", "rejected"), extract_prompt(row["chosen"], row["rejected"])))}
            problems = row_problems(row, self.format, self.score_columns, implicit_prompt=self.implicit,
                                    chosen_scores_higher=self.chosen_scores_higher)  # fmt: skip
            if problems:
                where = f"{self.source}: row {n} of process {self.rank}'s stream in epoch {self.epoch}"
                if self.on_bad_rows == "error":
                    raise DataError(f"{where}: {'; '.join(problems)}. Fix it, or set `on_bad_rows: skip`")
                logger.warning("%s skipped (on_bad_rows=skip): %s", where, "; ".join(problems))
                continue
            paired = self.format == "paired"
            answers = [row["chosen"], row["rejected"]] if paired else [row["completion"]]
            tokens = self.limits.tokenize(self.tokenizer, n, row["prompt"], answers)
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

