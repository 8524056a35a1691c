"""Causal-LM adapter: a batch of (prompt, responses) rows → summed response log-probs.

DESIGN §1: ℓ = log πθ(y∣x) − log πref(y∣x), summed over response tokens only.

Layout (why it is fast, DESIGN §10). TRL runs [prompt+chosen; prompt+rejected] as two padded
rows, so every prompt goes through the model twice and the LM head projects every position
onto the vocabulary. Here one row holds ``prompt | response_1 | ... | response_K`` once:

- a 4-D attention mask lets each response see the prompt and itself, never another response;
- position ids restart each response right after the prompt, so every response is computed
  exactly as if it followed the prompt alone;
- ``logits_to_keep`` (a boolean mask) sends only the positions that predict response tokens
  through the LM head. The last prompt position predicts the first token of every response.

K is 2 for paired rows (chosen, rejected) and 1 for unpaired rows (completion).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class TokenizedRow:
    """Token ids of one row; ``index`` is the row's position in its dataset."""

    index: int
    prompt: list[int]
    responses: list[list[int]]


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
    """Tokenize a row; EOS closes every response (as in TRL).

    The prompt is cut to ``max_prompt_length`` (keeping its end by default: the question
    usually sits there), then each response to what is left of ``max_length``.
    """
    prompt_ids, response_ids = None, []
    for response in responses:
        p_text, r_text = render(tokenizer, prompt, response)
        if prompt_ids is None:
            prompt_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
            if len(prompt_ids) > max_prompt_length:
                keep_end = truncation_mode == "keep_end"
                prompt_ids = prompt_ids[-max_prompt_length:] if keep_end else prompt_ids[:max_prompt_length]
        ids = tokenizer(r_text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        response_ids.append(ids[: max(1, max_length - len(prompt_ids))])
    return TokenizedRow(index=index, prompt=prompt_ids, responses=response_ids)


def collate(rows: list[TokenizedRow], pad_token_id: int) -> dict[str, Tensor]:
    """Build the shared-prompt layout for a list of rows with the same number of responses."""
    k = len(rows[0].responses)
    seq_len = max(len(r.prompt) + sum(map(len, r.responses)) for r in rows)
    max_resp = max(len(resp) for r in rows for resp in r.responses)
    b = len(rows)
    input_ids = torch.full((b, seq_len), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((b, seq_len), dtype=torch.long)
    segment = torch.full((b, seq_len), -1, dtype=torch.long)  # 0 prompt, k response k, -1 pad
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
    # Each query sees earlier keys of its own segment and the prompt; pads see only themselves.
    q, kv = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    allowed = causal & (kv >= 0) & ((kv == q) | (kv == 0))
    allowed |= torch.eye(seq_len, dtype=torch.bool)
    # Index of each kept position in the flattened (row-major) output of logits_to_keep.
    flat_index = keep.flatten().cumsum(0).view(b, seq_len) - 1
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "allowed": allowed[:, None],
        "keep": keep,
        "target_rows": flat_index.gather(1, predictor.flatten(1)).clamp_min(0).view(b, k, max_resp),
        "targets": targets,
        "target_mask": target_mask,
        "row_index": torch.tensor([r.index for r in rows]),
    }


def response_logps(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed log-probs (B, K) of each response and its token counts (B, K)."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    allowed = batch["allowed"]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)  # additive: works for sdpa and eager
    logits = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=mask,
        logits_to_keep=batch["keep"],
        use_cache=False,
    ).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()  # (kept positions, vocab)
    rows = batch["target_rows"]
    token_logits = logits[rows, batch["targets"]]
    token_logps = token_logits - torch.logsumexp(logits, dim=-1)[rows]
    target_mask = batch["target_mask"]
    return (token_logps * target_mask).sum(-1), target_mask.sum(-1)
