"""Causal-LM adapter: a batch of (prompt, responses) rows → summed response log-probs.

docs/design.md §1: ℓ = log πθ(y∣x) − log πref(y∣x), summed over response tokens only.

Shared-prompt layout (docs/design.md §2, measured as §15 says). TRL runs [prompt+chosen;
prompt+rejected] as two padded rows, so every prompt goes through the model twice and the LM head
projects every position onto the vocabulary. Here one row holds ``prompt | response_1 | ... |
response_K`` once:

- each response sees the prompt and itself, never another response;
- position ids restart each response right after the prompt, so every response is computed
  exactly as if it followed the prompt alone;
- ``logits_to_keep`` (a boolean mask) sends only the positions that predict response tokens
  through the LM head. The last prompt position predicts the first token of every response.

K is 2 for paired rows (chosen, rejected) and 1 for unpaired rows (completion).

Masks. "Sees the prompt and itself" is a mask function over (query, key) pairs. It is combined
with each layer type's own pattern, taken from ``transformers.masking_utils`` (causal, or causal
within ``config.sliding_window``), and rendered by the mask builder of the model's attention
implementation (boolean for sdpa, additive for eager, a BlockMask for flex attention). The model's
pattern is evaluated on the *position ids*, not on indices into the packed row: a token of
response 2 sits ``len(response 1)`` places further from the prompt in the row than in its own
sequence, and a sliding window must count the distance of the real sequence. Models whose layers
mix full and sliding attention (Gemma 2/3, Qwen2 with ``max_window_layers``, Cohere 2, ...) get
one mask per layer type, ``{"full_attention": ..., "sliding_attention": ...}``, the same mapping
``generate`` hands them.

Padded layout (fallback). A model the shared-prompt mask cannot serve runs the TRL layout, one
right-padded row per (prompt, response) with a 2-D attention mask, so the model builds its own
masks. :func:`layout_for` picks the layout and says why; it falls back when the attention
implementation takes no custom mask (flash attention), when the model does not build its masks
with ``transformers.masking_utils`` (a 4-D mask might not be used as given), when positions come
from the 2-D mask rather than position ids (ALiBi, models without ``position_ids``), or when some
layers are not full or sliding attention (chunked attention, recurrent or convolutional layers
carry state from one response into the next).

Tokenization at the prompt/response boundary (:func:`tokenize_row`). Prompt and response are
tokenized separately, so no token straddles the boundary and the prompt ids are the same for
every response of a row.

- BOS: chat rows take the special tokens the chat template writes (a Llama-3 template writes
  ``<|begin_of_text|>`` itself) and none from the tokenizer, as ``apply_chat_template`` tokenizes.
  Plain-text prompts get the special tokens the tokenizer itself puts before a text (its
  post-processor's BOS; nothing for GPT-2 or Qwen), never a second one when the text already
  starts with them. Responses get none.
- EOS closes every response (as in TRL), once: a chat template that already closes the assistant
  turn with EOS keeps it, and the whitespace the template writes after it (``"</s>\\n"``) is
  dropped, since generation stops at EOS. A turn closed by another token (Gemma's
  ``<end_of_turn>``) gets EOS appended.
- Length: the prompt is cut to ``max_prompt_length`` (keeping its end by default: the question
  usually sits there; a leading BOS stays), then each response to what is left of ``max_length``.
  The prompt is cut even when the row would fit: a fixed prompt budget, as TRL's, means a response
  is scored against the same prompt whatever the length of the responses it is paired with, and
  every response keeps at least ``max_length - max_prompt_length`` tokens.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import masking_utils as mu

from mmpref.adapters.lm_head import DEFAULT_CHUNK_SIZE, install_chunked_head

logger = logging.getLogger(__name__)

SHARED_PROMPT, PADDED = "shared_prompt", "padded"
MASKABLE_LAYERS = ("full_attention", "sliding_attention")


@dataclass
class TokenizedRow:
    """Token ids of one row; ``index`` is the row's position in its dataset."""

    index: int
    prompt: list[int]
    responses: list[list[int]]


# ---------------------------------------------------------------------------------------- tokenization


def _text(tokenizer, turns) -> str:
    return turns if isinstance(turns, str) else tokenizer.apply_chat_template(turns, tokenize=False)


def render(tokenizer, prompt, response) -> tuple[str, str]:
    """Prompt and response as text; chat-message rows go through the tokenizer's chat template.

    For messages the response text is what the template adds after the prompt's generation
    prompt, so special tokens of the assistant turn belong to the response, as in TRL.
    """
    if isinstance(prompt, str):
        return prompt, response if isinstance(response, str) else _text(tokenizer, response)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    full = tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError("chat template renders the prompt differently with and without the response")
    return prompt_text, full[len(prompt_text) :]


def _prompt_ids(tokenizer, text: str, templated: bool) -> tuple[list[int], list[int]]:
    """(head, body) of a prompt: head is the leading special tokens that truncation keeps.

    A templated prompt carries its own special tokens; only a leading BOS counts as head. A plain
    prompt gets the tokens the tokenizer adds before a text (``tokenizer(text)`` minus
    ``tokenizer(text, add_special_tokens=False)``, found by position), unless the text starts
    with them already.
    """
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    if templated:
        head = body[:1] if body[:1] == [tokenizer.bos_token_id] else []
        return head, body[len(head) :]
    full = tokenizer(text)["input_ids"]
    head = next((full[:i] for i in range(len(full) - len(body) + 1) if full[i : i + len(body)] == body), [])
    return ([], body) if body[: len(head)] == head else (head, body)


def _response_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a response, closed by exactly one EOS."""
    eos = tokenizer.eos_token
    if eos and text.rstrip().endswith(eos):  # the template closed the turn; what follows is never generated
        text = text.rstrip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def tokenize_row(
    tokenizer,
    index: int,
    prompt,
    responses: list,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
) -> TokenizedRow:
    """Tokenize a row: BOS as the tokenizer or template puts it, one EOS closing every response.

    The prompt is cut to ``max_prompt_length`` (keeping its end by default, and its leading BOS),
    then each response to what is left of ``max_length``. See the module docstring for the
    boundary rules and why the prompt budget is fixed.
    """
    texts = [render(tokenizer, prompt, response) for response in responses]
    head, body = _prompt_ids(tokenizer, texts[0][0], templated=not isinstance(prompt, str))
    if len(head) + len(body) > max_prompt_length:
        n = max(0, max_prompt_length - len(head))
        body = body[len(body) - n :] if truncation_mode == "keep_end" else body[:n]
    prompt_ids = head + body
    response_ids = [
        _response_ids(tokenizer, r_text)[: max(1, max_length - len(prompt_ids))] for _, r_text in texts
    ]
    return TokenizedRow(index=index, prompt=prompt_ids, responses=response_ids)


# ------------------------------------------------------------------------------------------------ batch


def collate(rows: list[TokenizedRow], pad_token_id: int) -> dict[str, Tensor]:
    """Build the shared-prompt layout for a list of rows with the same number of responses.

    ``segment`` marks each position: 0 prompt, k the k-th response, -1 padding. The attention masks
    are built from it by :func:`response_logps`, which knows the model; the padded layout is
    derived from the same tensors.
    """
    k = len(rows[0].responses)
    seq_len = max(len(r.prompt) + sum(map(len, r.responses)) for r in rows)
    max_resp = max(len(resp) for r in rows for resp in r.responses)
    b = len(rows)
    input_ids = torch.full((b, seq_len), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((b, seq_len), dtype=torch.long)
    segment = torch.full((b, seq_len), -1, dtype=torch.long)
    keep = torch.zeros((b, seq_len), dtype=torch.bool)
    predictor = torch.zeros((b, k, max_resp), dtype=torch.long)  # position predicting each token
    targets = torch.zeros((b, k, max_resp), dtype=torch.long)
    target_mask = torch.zeros((b, k, max_resp), dtype=torch.bool)
    for i, row in enumerate(rows):
        p = len(row.prompt)
        input_ids[i, :p] = torch.tensor(row.prompt)
        position_ids[i, :p] = torch.arange(p)
        segment[i, :p] = 0
        keep[i, p - 1] = True
        start = p
        for j, resp in enumerate(row.responses):
            n = len(resp)
            span = slice(start, start + n)
            input_ids[i, span] = torch.tensor(resp)
            position_ids[i, span] = torch.arange(p, p + n)
            segment[i, span] = j + 1
            keep[i, start : start + n - 1] = True
            predictor[i, j, 0] = p - 1
            predictor[i, j, 1:n] = torch.arange(start, start + n - 1)
            targets[i, j, :n] = torch.tensor(resp)
            target_mask[i, j, :n] = True
            start += n
    # Index of each kept position in the flattened (row-major) output of logits_to_keep.
    flat_index = keep.flatten().cumsum(0).view(b, seq_len) - 1
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment": segment,
        "keep": keep,
        "target_rows": flat_index.gather(1, predictor.flatten(1)).clamp_min(0).view(b, k, max_resp),
        "targets": targets,
        "target_mask": target_mask,
        "row_index": torch.tensor([r.index for r in rows]),
    }


def padded_layout(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same responses as one right-padded ``[prompt + response]`` row each, (B·K) rows.

    Returns the model inputs (``input_ids``, 2-D ``attention_mask``, ``position_ids``, ``keep``
    for ``logits_to_keep``) and ``target_rows``, the kept position predicting each target token.
    """
    segment, input_ids = batch["segment"], batch["input_ids"]
    lengths = batch["target_mask"].sum(-1)  # (B, K)
    b, k = lengths.shape
    prompt = (segment == 0).sum(1)[:, None, None]  # (B, 1, 1)
    starts = (prompt[..., 0] + lengths.cumsum(1) - lengths)[..., None]  # packed start of each response
    n = lengths[..., None]
    t = torch.arange(int((prompt + n).max()), device=segment.device)
    source = torch.where(t < prompt, t, starts + t - prompt).clamp(0, segment.shape[1] - 1)  # (B, K, W)
    valid = t < prompt + n
    ids = input_ids.gather(1, source.flatten(1)).view_as(source).masked_fill(~valid, 0)
    keep = (t >= prompt - 1) & (t < prompt + n - 1)  # the n positions predicting the response
    offsets = lengths.flatten().cumsum(0) - lengths.flatten()  # each response's first kept row
    rows = offsets.view(b, k, 1) + torch.arange(batch["targets"].shape[-1], device=segment.device)
    return {
        "input_ids": ids.flatten(0, 1),
        "attention_mask": valid.flatten(0, 1).long(),
        "position_ids": t.expand(b * k, -1),
        "keep": keep.flatten(0, 1),
        "target_rows": torch.where(batch["target_mask"], rows, 0),
    }


# ----------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Which layout :func:`response_logps` runs for a model, and why."""

    name: str  # SHARED_PROMPT or PADDED
    reason: str


def _layer_types(config) -> tuple[str, ...]:
    """The attention pattern of every layer, decided as ``masking_utils.create_masks_for_generate`` does."""
    if getattr(config, "layer_types", None):
        return tuple(config.layer_types)
    if getattr(config, "sliding_window", None) is not None:
        return ("sliding_attention",)
    if getattr(config, "attention_chunk_size", None) is not None:
        return ("chunked_attention",)
    return ("full_attention",)


def _transformers_model(model: nn.Module) -> PreTrainedModel | None:
    """The outermost transformers model inside DDP, ``torch.compile`` or PEFT wrappers."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def layout_for(model: nn.Module) -> Layout:
    """The shared-prompt layout where the model can take its masks, else the padded one."""
    pretrained = _transformers_model(model)
    if pretrained is None:
        return Layout(PADDED, "not a transformers model")
    config = pretrained.config.get_text_config()
    return _layout(
        type(pretrained.base_model),
        config._attn_implementation,
        _layer_types(config),
        bool(getattr(config, "alibi", False)),
    )


@functools.cache
def _layout(base: type, attn_implementation: str, layer_types: tuple[str, ...], alibi: bool) -> Layout:
    module = sys.modules.get(base.__module__)
    if attn_implementation not in ("sdpa", "eager", "flex_attention"):
        return Layout(PADDED, f"{attn_implementation} attention takes no custom attention mask")
    if getattr(module, "create_causal_mask", None) is not mu.create_causal_mask:
        return Layout(PADDED, f"{base.__name__} does not build its masks with transformers.masking_utils")
    if alibi or "position_ids" not in inspect.signature(base.forward).parameters:
        return Layout(PADDED, "positions come from the 2-D attention mask, not from position ids")
    if other := sorted(set(layer_types) - set(MASKABLE_LAYERS)):
        return Layout(PADDED, f"layers of type {', '.join(other)} cannot be masked per response")
    return Layout(SHARED_PROMPT, f"{attn_implementation} masks for {', '.join(sorted(set(layer_types)))}")


@functools.cache
def _log_layout(name: str, layout: Layout) -> None:
    logger.info("%s: %s layout (%s)", name, layout.name.replace("_", "-"), layout.reason)


# ------------------------------------------------------------------------------------------------ masks


def shared_prompt_mask_function(segment: Tensor) -> Callable:
    """Mask function: a query sees keys of its own segment and of the prompt; a pad only itself.

    Causality and windows are left to the layer's own pattern (see :func:`shared_prompt_masks`).
    """

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        q, kv = segment[batch_idx, q_idx], segment[batch_idx, kv_idx]
        return (((kv == q) | (kv == 0)) & (kv >= 0)) | (q_idx == kv_idx)

    return inner


def shared_prompt_masks(config, batch: dict[str, Tensor], dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
    """One 4-D mask per layer type, in the format of ``config._attn_implementation``.

    The layer's pattern (``causal_mask_function``, ``sliding_window_causal_mask_function``) runs on
    position ids, so a window is measured as in the response's own ``[prompt + response]``
    sequence. Within the keys the shared-prompt function allows, position order is packed order,
    so causality is unchanged. A single layer type gives a single tensor (a model given a 4-D mask
    uses it in every layer), several give the per-type mapping, as ``generate`` passes it.
    """
    segment, position_ids = batch["segment"], batch["position_ids"]
    b, length = segment.shape
    build = mu.ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    masks = {}
    for layer_type in sorted(set(_layer_types(config))):
        if layer_type == "sliding_attention":
            pattern = mu.sliding_window_causal_mask_function(config.sliding_window)
        else:
            pattern = mu.causal_mask_function
        mask_function = mu.and_masks(
            mu.remap_positions_for_packed_sequence(pattern, position_ids),
            shared_prompt_mask_function(segment),
        )
        masks[layer_type] = build(
            batch_size=b, q_length=length, kv_length=length, mask_function=mask_function,
            allow_is_causal_skip=False, dtype=dtype, config=config, device=segment.device,
        )  # fmt: skip
    return next(iter(masks.values())) if len(masks) == 1 else masks


# --------------------------------------------------------------------------------------------- log-probs


def response_logps(
    model: nn.Module, batch: dict[str, Tensor], layout: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[Tensor, Tensor]:
    """Summed log-probs (B, K) of each response and its token counts (B, K).

    ``layout`` is ``"shared_prompt"``, ``"padded"`` or None for :func:`layout_for`'s choice (logged
    once per model class and setting, at info level). ``chunk_size`` > 0: the LM head runs on the final
    hidden states ``chunk_size`` answer positions at a time and never holds the whole logits tensor
    (:mod:`mmpref.adapters.lm_head`); 0: the model's own forward with ``logits_to_keep``, all at once.
    """
    pretrained, chosen = _transformers_model(model), layout_for(model)
    if layout is None:
        layout = chosen.name
        _log_layout(type(pretrained or model).__name__, chosen)
    if layout not in (SHARED_PROMPT, PADDED):
        raise ValueError(f"layout: must be {SHARED_PROMPT!r}, {PADDED!r} or None, got {layout!r}")
    if layout == SHARED_PROMPT and chosen.name != SHARED_PROMPT:
        raise ValueError(f"the shared-prompt layout cannot run this model: {chosen.reason}")
    if layout == SHARED_PROMPT:
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        masks = shared_prompt_masks(pretrained.config.get_text_config(), batch, dtype)
        inputs = {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": masks,
        }
        keep, rows = batch["keep"], batch["target_rows"]
    else:
        padded = padded_layout(batch)
        inputs = {name: padded[name] for name in ("input_ids", "position_ids", "attention_mask")}
        keep, rows = padded["keep"], padded["target_rows"]
    target_mask = batch["target_mask"]
    if chunk_size > 0 and pretrained is not None:
        install_chunked_head(pretrained)
        targets = (rows, batch["targets"], target_mask)
        token_logps = model(**inputs, use_cache=False, token_logps_of=(keep, targets, chunk_size))
    else:
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1]).float()  # (kept positions, vocab)
        token_logps = logits[rows, batch["targets"]] - torch.logsumexp(logits, dim=-1)[rows]
    return (token_logps * target_mask).sum(-1), target_mask.sum(-1)
