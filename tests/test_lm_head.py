"""Chunked LM-head log-probs equal the whole-logits computation, and never keep a [tokens, vocab] tensor."""

import pytest
import torch
from torch import nn

from mmpref.adapters.lm_head import token_logps

VOCAB, HIDDEN, N = 997, 16, 45


def plain(head, hidden, targets, softcap=None):
    logits = head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)


def heads():
    torch.manual_seed(0)
    untied = nn.Linear(HIDDEN, VOCAB, bias=False)
    biased = nn.Linear(HIDDEN, VOCAB, bias=True)
    embedding = nn.Embedding(VOCAB, HIDDEN)
    tied = nn.Linear(HIDDEN, VOCAB, bias=False)
    tied.weight = embedding.weight  # tie_word_embeddings: the head is the input embedding
    from peft import LoraConfig, get_peft_model

    wrapper = nn.Sequential()
    wrapper.add_module("lm_head", nn.Linear(HIDDEN, VOCAB, bias=False))
    lora = get_peft_model(wrapper, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False))
    return {"untied": untied, "bias": biased, "tied": tied, "lora": lora.base_model.model.lm_head}


@pytest.mark.parametrize("name", ["untied", "bias", "tied", "lora"])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_chunked_log_probs_and_grads_equal_the_whole_computation(name, softcap):
    head = heads()[name]
    config = type("Config", (), {"final_logit_softcapping": softcap})()
    hidden = torch.randn(N, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (N,))
    weights = torch.randn(N)  # any downstream use of the log-probs
    params = [p for p in head.parameters() if p.requires_grad]

    expected = plain(head, hidden, targets, softcap)
    grads_expected = torch.autograd.grad((expected * weights).sum(), [hidden, *params])
    for chunk in (1, 7, 16, 0):
        got = token_logps(head, hidden, targets, chunk_size=chunk, config=config)
        torch.testing.assert_close(got, expected)  # float32 rounding: logsumexp vs log_softmax
        grads = torch.autograd.grad((got * weights).sum(), [hidden, *params])
        for g, e in zip(grads, grads_expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)  # sums over the vocabulary, in another order
    with torch.no_grad():  # the reference pass
        torch.testing.assert_close(token_logps(head, hidden, targets, chunk_size=7, config=config), expected)


def test_no_tokens_by_vocabulary_tensor_is_kept_for_backward():
    head = heads()["untied"]
    hidden = torch.randn(N, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (N,))

    def largest_saved(chunk):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            token_logps(head, hidden, targets, chunk_size=chunk).sum()
        return max(sizes)

    assert largest_saved(0) >= N * VOCAB  # the whole logits (or their softmax) are kept
    assert largest_saved(8) < 8 * VOCAB  # checkpointed chunks keep only their inputs, no logits
