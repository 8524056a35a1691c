"""Both layouts of the causal-LM adapter against plain forwards, across model families.

The reference is one unpadded ``[prompt + response]`` forward at a time, with no mask and no position
ids: whatever the model does (sliding windows, layers mixing windowed and full attention, convolutions)
it does there as it would at inference. Prompts and responses are longer than the windows and of
different lengths within a batch. Run with ``-s`` to see the differences per family and layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
import transformers as tf

from mmpref.adapters import causal_lm
from mmpref.adapters.causal_lm import TokenizedRow, collate

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, WINDOW = 97, 4
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
SLIDING, FULL = "sliding_attention", "full_attention"

FAMILIES: dict[str, Callable[[], tf.PretrainedConfig]] = {
    "llama": lambda: tf.LlamaConfig(**LLAMA_LIKE),
    "mistral": lambda: tf.MistralConfig(**LLAMA_LIKE, sliding_window=WINDOW),
    "qwen2": lambda: tf.Qwen2Config(**LLAMA_LIKE),
    # layers from max_window_layers on slide: layer 0 full, layers 1 and 2 sliding
    "qwen2-sliding": lambda: tf.Qwen2Config(
        **{**LLAMA_LIKE, "num_hidden_layers": 3},
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
    ),
    "gemma2": lambda: tf.Gemma2Config(
        **LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW
    ),
    "gemma3": lambda: tf.Gemma3TextConfig(
        **{**LLAMA_LIKE, "num_hidden_layers": 3},
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=WINDOW,
        layer_types=[SLIDING, FULL, SLIDING],
    ),
    "phi3": lambda: tf.Phi3Config(**LLAMA_LIKE, sliding_window=WINDOW),
    "cohere2": lambda: tf.Cohere2Config(**LLAMA_LIKE, sliding_window=WINDOW, layer_types=[SLIDING, FULL]),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        rotary_pct=0.5,
    ),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    # ALiBi biases built from the 2-D mask, and no position ids: only the padded layout is right
    "bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    # a short convolution carries response 1 into response 2 in a shared row: only the padded layout is right
    "lfm2": lambda: tf.Lfm2Config(**LLAMA_LIKE, layer_types=["conv", FULL]),
}
PADDED_ONLY = {"bloom", "lfm2"}
EAGER_ONLY = {"gemma2", "bloom"}  # transformers has no sdpa path for them
CASES = [
    pytest.param(family, impl, layout, id=f"{family}-{impl}-{layout}")
    for family in FAMILIES
    for impl in (("eager",) if family in EAGER_ONLY else ("eager", "sdpa"))
    for layout in ("auto", "padded")
]


def _ids(generator: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=generator).tolist()


def make_rows(k: int = 2, seed: int = 0) -> list[TokenizedRow]:
    """Three rows of random tokens: prompts of 9, 4 and 13 tokens, responses of 2 to 9."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(9, (7, 3)), (4, (2, 9)), (13, (6, 6))]
    return [
        TokenizedRow(i, _ids(g, p), [_ids(g, n) for n in resp[:k]]) for i, (p, resp) in enumerate(lengths)
    ]


def make_model(family: str, impl: str) -> tf.PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(
            FAMILIES[family](), attn_implementation=impl, dtype=torch.float32
        )
    return model.eval()


def plain_logps(model: torch.nn.Module, rows: list[TokenizedRow]) -> torch.Tensor:
    """(B, K) summed log-probs, one unpadded ``[prompt + response]`` forward each, no mask, no position ids."""
    out = []
    for row in rows:
        for resp in row.responses:
            logits = model(input_ids=torch.tensor([row.prompt + resp])).logits[0, len(row.prompt) - 1 : -1]
            out.append(logits.float().log_softmax(-1).gather(-1, torch.tensor(resp)[:, None]).sum())
    return torch.stack(out).view(len(rows), -1)


def with_grads(
    model: torch.nn.Module, logps: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The log-probs and the gradient of their sum w.r.t. every parameter."""
    model.zero_grad()
    values = logps()
    values.sum().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return values.detach(), grads


@pytest.mark.parametrize("family,impl,layout", CASES)
def test_logps_and_grads_equal_plain_forwards(family, impl, layout):
    model, rows = make_model(family, impl), make_rows()
    expected, expected_grads = with_grads(model, lambda: plain_logps(model, rows))
    if layout == "auto":  # shared-prompt where the family supports it
        got, grads = with_grads(model, lambda: causal_lm.response_logps(model, collate(rows, 0))[0])
    else:
        got, grads = with_grads(
            model, lambda: causal_lm.response_logps(model, collate(rows, 0), layout=layout)[0]
        )
    logp_diff = (got - expected).abs().max().item()
    grad_diff = max((g - e).abs().max().item() for g, e in zip(grads, expected_grads))
    grad_scale = max(e.abs().max().item() for e in expected_grads)
    ran = layout if layout != "auto" else ("padded" if family in PADDED_ONLY else "shared_prompt")
    print(f"\n{family:14s} {impl:6s} {ran:13s} max|Δ log p| {logp_diff:.1e}  max|Δ grad| {grad_diff:.1e}"
          f"  (max|grad| {grad_scale:.1f})")  # fmt: skip
    assert logp_diff <= 2e-5
    assert grad_diff <= 1e-5 * max(1.0, grad_scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_runs_the_expected_layout(family):
    model = make_model(family, "eager")
    layout = causal_lm.layout_for(model)
    assert layout.name == ("padded" if family in PADDED_ONLY else "shared_prompt"), layout.reason
    if family in PADDED_ONLY:
        with pytest.raises(ValueError, match="shared-prompt layout cannot run this model"):
            causal_lm.response_logps(model, collate(make_rows(), 0), layout="shared_prompt")


def test_flash_attention_falls_back_to_padded():
    model = make_model("llama", "eager")
    model.config._attn_implementation = "flash_attention_2"  # no kernel on CPU: only the decision is checked
    layout = causal_lm.layout_for(model)
    assert layout.name == "padded" and "flash_attention_2" in layout.reason


def test_the_layout_and_its_reason_are_logged(caplog):
    causal_lm._log_layout.cache_clear()
    with caplog.at_level(logging.INFO, logger=causal_lm.__name__), torch.no_grad():
        for family in ("gemma3", "lfm2"):
            causal_lm.response_logps(make_model(family, "sdpa"), collate(make_rows(), 0))
    assert (
        "Gemma3ForCausalLM: shared-prompt layout (sdpa masks for full_attention, sliding_attention)"
        in caplog.text
    )
    assert "Lfm2ForCausalLM: padded layout (layers of type conv cannot be masked per response)" in caplog.text


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_single_response_rows(family):
    model, rows = make_model(family, "sdpa"), make_rows(k=1)
    with torch.no_grad():
        expected = plain_logps(model, rows)
        for layout in ("shared_prompt", "padded"):
            logps, counts = causal_lm.response_logps(model, collate(rows, 0), layout=layout)
            torch.testing.assert_close(logps, expected, atol=2e-5, rtol=0)
            assert counts.tolist() == [[len(r.responses[0])] for r in rows]


@pytest.mark.slow  # flex attention compiles its kernels on CPU
def test_flex_attention_block_masks():
    """Flex attention gets one BlockMask per layer type (CPU: forward only, flex has no backward there)."""
    model, rows = make_model("gemma3", "flex_attention"), make_rows()
    with torch.no_grad():
        logps, _ = causal_lm.response_logps(model, collate(rows, 0), layout="shared_prompt")
        model.set_attn_implementation("eager")  # same weights; spares a flex compile per sequence length
        torch.testing.assert_close(logps, plain_logps(model, rows), atol=2e-5, rtol=0)


def test_wrapped_models_keep_the_shared_prompt_layout():
    """A LoRA (PEFT) wrapper hides the transformers model; the layout still finds it."""
    peft = pytest.importorskip("peft")
    model, rows = make_model("gemma3", "sdpa"), make_rows()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert causal_lm.layout_for(lora).name == "shared_prompt"
    with torch.no_grad():
        torch.testing.assert_close(causal_lm.response_logps(lora, collate(rows, 0))[0], plain_logps(lora, rows),
                                   atol=2e-5, rtol=0)  # fmt: skip
