"""Per-token log-probs from final hidden states without a ``[tokens, vocabulary]`` logits tensor.

The LM head is the largest allocation of a preference step at today's shapes: 1,500 answer tokens at a
151,936-token vocabulary are ≈ 0.9 GB of float32 logits per side, kept again for backward. Here the head,
logsumexp and gather run over ``chunk_size`` positions at a time; under autograd each chunk is a
``torch.utils.checkpoint`` segment, so backward recomputes that chunk's logits instead of storing them.
Peak memory for the head is one chunk's logits, whatever the answer length. The results are the same
numbers as the whole-tensor computation: the same ops run on the same rows, only fewer at a time.

Any head module works (tied or untied weights, a bias, LoRA on the head). Models whose forward changes the
logits after the head are handled as their forward does: Gemma 2/3's ``final_logit_softcapping``
(cap·tanh(logits/cap)) and Cohere's ``logit_scale``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

DEFAULT_CHUNK_SIZE = 1024  # positions per chunk at most (a 32k vocabulary's: 1024 × 32,000 logits ≈ 131 MB fp32)
CHUNK_LOGITS = 2**25  # logits per chunk the default allows: ≈ 134 MB in float32, whatever the vocabulary


def chunk_size_for(vocab_size: int) -> int:
    """The default chunk: as many answer positions as keep one chunk's [positions, vocabulary] logits within
    :data:`CHUNK_LOGITS` (220 at a 151,936 vocabulary), at most :data:`DEFAULT_CHUNK_SIZE`, at least 16."""
    return max(16, min(DEFAULT_CHUNK_SIZE, CHUNK_LOGITS // max(1, vocab_size)))


def logits_transform(config) -> tuple[float | None, float | None]:
    """``(softcap, scale)`` that the model's forward applies to the head's output (None: not used).

    The scale is the first set of the names transformers' models use for it: ``logit_scale`` (Cohere),
    ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1), ``1 / logits_scaling`` (Granite, MiniCPM3;
    HyperCLOVA X multiplies by it); the softcap Gemma 2/3's ``final_logit_softcapping``.
    """
    softcap = getattr(config, "final_logit_softcapping", None)
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if (scale := getattr(config, name, None)) is not None:
            return softcap, scale
    if (scaling := getattr(config, "logits_scaling", None)) is not None:
        return softcap, scaling if getattr(config, "model_type", "") == "hyperclovax" else 1 / scaling
    return softcap, None


def _chunk_logps(head: nn.Module, hidden: Tensor, targets: Tensor, softcap, scale) -> Tensor:
    logits = head(hidden)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(head: nn.Module, hidden: Tensor, targets: Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                config=None) -> Tensor:  # fmt: skip
    """float32 log p(targets[i] | hidden[i]) for (N, H) ``hidden`` and (N,) ``targets``, ``chunk_size`` rows
    at a time (0: all at once). ``config``: the model's config, for a softcap or scale after the head."""
    softcap, scale = logits_transform(config) if config is not None else (None, None)
    if chunk_size <= 0 or hidden.shape[0] <= chunk_size:
        return _chunk_logps(head, hidden, targets, softcap, scale)
    parts = []
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters())):
            # recomputed in backward: only this chunk's logits ever exist at once
            parts.append(checkpoint(_chunk_logps, head, h, t, softcap, scale, use_reentrant=False))
        else:  # the reference pass: no graph, each chunk's logits are freed before the next
            parts.append(_chunk_logps(head, h, t, softcap, scale))
    return torch.cat(parts)


def install_chunked_head(model: PreTrainedModel) -> None:
    """Give ``model`` (once) a forward that returns per-token log-probs instead of logits when called with
    ``token_logps_of=(positions, (rows, targets, mask), chunk_size)``: the backbone runs, then
    :func:`token_logps` on the final hidden states of ``positions`` (a (B, T) boolean mask, flattened
    row-major): entry i of ``targets`` is the token id predicted by kept position ``rows[i]``. Only entries
    where ``mask`` is set (real tokens, not padding) go through the head; the others are 0.

    The forward of the instance itself is replaced, so calls through DDP, PEFT or compile wrappers reach it
    (the wrappers' own forwards run as usual); without the argument it is the original forward, so
    ``generate`` and everything else are unchanged.
    """
    if getattr(model, "_mmpref_chunked_head", False):
        return
    original = model.forward

    def forward(*args, token_logps_of=None, **kwargs):
        if token_logps_of is None:
            return original(*args, **kwargs)
        positions, (rows, targets, mask), chunk_size = token_logps_of
        kwargs.pop("logits_to_keep", None)
        hidden = model.base_model(*args, **kwargs).last_hidden_state[positions]  # (kept positions, H)
        real = mask.reshape(-1).bool()  # padded answer slots never reach the head
        logps = token_logps(model.get_output_embeddings(), hidden[rows.reshape(-1)[real]], targets.reshape(-1)[real],
                            chunk_size=chunk_size, config=model.config.get_text_config())  # fmt: skip
        out = logps.new_zeros(real.shape[0])
        out[real] = logps
        return out.view(targets.shape)

    model.forward = forward
    model._mmpref_chunked_head = True


def copy_without_chunked_head(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose modules carry no :func:`install_chunked_head` forward: that forward is a
    closure over the module it was installed on, so a copy would otherwise run the original's weights. The copy
    gets a forward of its own on first use."""
    import copy

    clone = copy.deepcopy(model)
    for module in clone.modules():
        if module.__dict__.pop("_mmpref_chunked_head", False):
            module.__dict__.pop("forward", None)
    return clone
