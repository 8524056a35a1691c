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


def _batch(tokenizer):
    from mmpref.adapters.causal_lm import collate, tokenize_row

    rows = [("How long should bread dough rise before baking?", "About an hour.", "Forever, my friend."),
            ("Name a planet.", "Mars is a planet.", "Bread.")]  # fmt: skip
    tokenized = [tokenize_row(tokenizer, i, p, [c, r], max_length=64, max_prompt_length=32)
                 for i, (p, c, r) in enumerate(rows)]  # fmt: skip
    return collate(tokenized, tokenizer.pad_token_id)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_response_logps_chunked_equal_the_models_own_logits(tmp_path, tied, lora):
    """Through the whole adapter: the chunked head gives today's log-probs and gradients (policy and reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from mmpref.adapters.causal_lm import response_logps
    from mmpref.tiny_models import make_tiny_lm

    folder = make_tiny_lm(tmp_path / "lm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig.from_pretrained(folder)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))  # fmt: skip
    batch = _batch(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(chunk):
        logps, counts = response_logps(model, batch, chunk_size=chunk)
        grads = torch.autograd.grad(logps.sum() - 0.3 * logps[:, 1].sum(), params)
        return logps, counts, grads

    whole, counts, grads_whole = run(0)
    for chunk in (3, 1024):
        got, got_counts, grads = run(chunk)
        assert torch.equal(got_counts, counts)
        torch.testing.assert_close(got, whole)
        for g, e in zip(grads, grads_whole):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the reference pass
        torch.testing.assert_close(response_logps(model, batch, chunk_size=3)[0], whole.detach())


def test_the_default_chunk_bounds_a_chunks_logits_whatever_the_vocabulary():
    from mmpref.adapters.lm_head import CHUNK_LOGITS, DEFAULT_CHUNK_SIZE, chunk_size_for

    assert chunk_size_for(32_000) == DEFAULT_CHUNK_SIZE  # a 32k vocabulary keeps the 1024 positions it had
    assert chunk_size_for(151_936) == 220 and 220 * 151_936 <= CHUNK_LOGITS < 221 * 151_936
    assert chunk_size_for(10_000_000) == 16  # never fewer positions than that
