"""Shared pieces of synth and eval-reward: prompts and batched ``generate`` (devices: :mod:`mmpref.devices`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from mmpref.data import DataError, load_rows
from mmpref.devices import resolve_device
from mmpref.hub import split_revision
from mmpref.rdpo.config import GenerationConfig
from mmpref.training.config import DTYPES, custom_code_guard

T = TypeVar("T")
Messages = list[dict[str, str]]
TORCH_DTYPES = DTYPES  # the one name -> dtype map of the configs


@dataclass(frozen=True)
class Prompt:
    """One prompt with a stable id (given in the prompts file, or a hash of the text)."""

    id: str
    text: str | Messages


def chunks(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def text_id(value: Any) -> str:
    """A short content hash: the id of a prompt (or row) that comes without one."""
    return hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()[:16]


def read_prompts(inline: Sequence[str], path: str | None) -> list[tuple[str | None, str | Messages]]:
    """(given id or None, prompt) pairs: the inline prompts, then those of ``path``.

    A .txt file holds one prompt a line; a dataset file (.jsonl/.json/.parquet/saved folder) a
    ``prompt`` column (string or chat messages) and optionally an ``id`` column.
    """
    found: list[tuple[Any, Any]] = [(None, p) for p in inline]
    if path:
        p = Path(path)
        if p.suffix.lower() == ".txt":
            try:
                lines = p.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise DataError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc
            found += [(None, line.strip()) for line in lines if line.strip()]
        else:
            ds = load_rows(p)
            if "prompt" not in ds.column_names:
                raise DataError(f"{p}: no 'prompt' column (found: {', '.join(ds.column_names)})")
            ids = ds["id"] if "id" in ds.column_names else [None] * ds.num_rows
            found += [(None if i is None else str(i), t) for i, t in zip(ids, ds["prompt"])]
    for n, (_, text) in enumerate(found):
        if not text or (isinstance(text, str) and not text.strip()):
            raise DataError(f"prompt {n} (inline prompts first, then the file) is empty")
    if not found:
        raise DataError("no prompts given")
    return found


def assign_ids(entries: Sequence[tuple[str | None, str | Messages]]) -> list[Prompt]:
    """Keep given ids; others get a hash of the prompt, and a repeated prompt ``-2``, ``-3``...,
    so every occurrence has its own stable id across reruns."""
    prompts, seen = [], {}
    for given, text in entries:
        pid = given if given is not None else text_id(text)
        seen[pid] = seen.get(pid, 0) + 1
        if seen[pid] > 1:
            if given is not None:
                raise DataError(f"prompt id {pid!r} appears more than once")
            pid = f"{pid}-{seen[pid]}"
        prompts.append(Prompt(pid, text))
    return prompts


def load_prompts(inline: Sequence[str], path: str | None) -> list[Prompt]:
    """The prompts of a config (see :func:`read_prompts`) with their ids."""
    return assign_ids(read_prompts(inline, path))


def derive_seed(base: int, *parts: int) -> int:
    """A deterministic seed for one generate call, from the configured seed and its position."""
    seed = base
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63 - 1)
    return seed


def load_pretrained(model_class, path: str, torch_dtype: str, trust_remote_code: bool):
    """``(tokenizer, model)`` of a hub id (``ORG/NAME``, optionally ``@revision``) or a folder; a folder's own
    code runs only with ``trust_remote_code``."""
    from transformers import AutoTokenizer

    name, revision = split_revision(str(path))
    with custom_code_guard(path):
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        model = model_class.from_pretrained(name, revision=revision, dtype=TORCH_DTYPES[torch_dtype],
                                            trust_remote_code=trust_remote_code)  # fmt: skip
    return tokenizer, model


class Generator:
    """A local causal LM that answers batches of prompts (left padding, as ``generate`` needs)."""

    def __init__(
        self,
        path: str,
        *,
        device: str = "auto",
        torch_dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.tokenizer, self.model = load_pretrained(AutoModelForCausalLM, path, torch_dtype, trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(self.device).eval()

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render_chat(self, messages: Messages) -> str:
        """Messages → the text the model continues: its chat template, else a plain transcript.

        Templates that refuse a system turn get the system text prepended to the first user turn.
        """
        if not self.has_chat_template:
            return transcript(messages)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:
            if not messages or messages[0]["role"] != "system":
                raise
            system, first, *rest = messages
            merged = {"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}
            return self.tokenizer.apply_chat_template(
                [merged, *rest], tokenize=False, add_generation_prompt=True
            )

    @torch.no_grad()
    def generate(
        self, texts: list[str], gen: GenerationConfig, *, seed: int, add_special_tokens: bool
    ) -> list[str]:
        """Continue every text; returns the new text only, special tokens removed, stripped.

        ``add_special_tokens``: False for chat-template output (it holds its own special tokens).
        """
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        sampling = (
            {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p}
            if gen.do_sample
            else {"do_sample": False}
        )
        torch.manual_seed(seed)
        out = self.model.generate(
            **enc, max_new_tokens=gen.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **sampling
        )
        new = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def close(self) -> None:
        """Free the model (eval-reward loads two policies one after the other)."""
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def transcript(messages: Messages) -> str:
    """Plain-text conversation for a model without a chat template, ending where the assistant speaks."""
    names = {"user": "User", "assistant": "Assistant"}
    parts = [
        m["content"] if m["role"] == "system" else f"{names.get(m['role'], m['role'])}: {m['content']}"
        for m in messages
    ]
    return "\n\n".join(parts) + "\n\nAssistant:"
