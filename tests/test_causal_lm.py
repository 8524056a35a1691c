"""The shared-prompt adapter against independent slow computations."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmpref.adapters.causal_lm import collate, render, response_logps, tokenize_row
from mmpref.tiny_models import make_tiny_lm

ROWS = [
    (
        "How long should bread dough rise before baking it in the oven?",
        "About an hour.",
        "Forever and ever, my friend.",
    ),
    ("Name a planet.", "Mars is a planet.", "Bread."),
    (
        "Tell me something about the orbit of the moon around the earth and why tides happen.",
        "Gravity.",
        "No.",
    ),
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = make_tiny_lm(tmp_path_factory.mktemp("lm"), seed=1)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def slow_logp(model, prompt_ids, response_ids) -> float:
    """One sequence, no padding, no masks: sum of log p(token | prefix) token by token."""
    logp = model(input_ids=torch.tensor([prompt_ids + response_ids])).logits[0].log_softmax(-1)
    return sum(logp[len(prompt_ids) + j - 1, t].item() for j, t in enumerate(response_ids))


def padded_logps(model, tokenizer, pairs, side: str) -> torch.Tensor:
    """The usual padded batch (prompt+response per row, 2-D attention mask), left or right padded."""
    seqs = [p + r for p, r in pairs]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.zeros_like(ids, dtype=torch.bool)
    for i, ((p, _), s) in enumerate(zip(pairs, seqs)):
        off = width - len(s) if side == "left" else 0
        ids[i, off : off + len(s)] = torch.tensor(s)
        mask[i, off : off + len(s)] = 1
        labels[i, off + len(p) : off + len(s)] = True
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    logp = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.log_softmax(-1)
    token = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return (token * labels[:, 1:]).sum(1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_logps_match_slow_and_padded(lm, side):
    model, tok = lm
    rows = [
        tokenize_row(tok, i, p, [c, r], max_length=40, max_prompt_length=12)
        for i, (p, c, r) in enumerate(ROWS)
    ]
    assert any(len(tok(p)["input_ids"]) > 12 for p, _, _ in ROWS), "a prompt must be truncated"
    with torch.no_grad():
        logps, counts = response_logps(model, collate(rows, tok.pad_token_id))
        pairs = [(r.prompt, resp) for r in rows for resp in r.responses]
        padded = padded_logps(model, tok, pairs, side).view(len(rows), 2)
    for i, row in enumerate(rows):
        for k, resp in enumerate(row.responses):
            assert logps[i, k].item() == pytest.approx(slow_logp(model, row.prompt, resp), abs=1e-5)
            assert counts[i, k].item() == len(resp)
    torch.testing.assert_close(logps, padded, atol=1e-5, rtol=0)


def test_single_response_rows_and_gradients_flow(lm):
    model, tok = lm
    rows = [
        tokenize_row(tok, i, p, [c], max_length=64, max_prompt_length=32) for i, (p, c, _) in enumerate(ROWS)
    ]
    logps, _ = response_logps(model, collate(rows, tok.pad_token_id))
    assert logps.shape == (3, 1)
    logps.sum().backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad()
    for i, row in enumerate(rows):
        assert logps[i, 0].item() == pytest.approx(slow_logp(model, row.prompt, row.responses[0]), abs=1e-5)


def test_truncation_keeps_prompt_end_or_start(lm):
    _, tok = lm
    prompt, chosen, rejected = ROWS[0]
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    end = tokenize_row(tok, 0, prompt, [chosen, rejected], max_length=14, max_prompt_length=10)
    start = tokenize_row(tok, 0, prompt, [chosen, rejected], max_length=14, max_prompt_length=10,
                         truncation_mode="keep_start")  # fmt: skip
    assert end.prompt == ids[-10:] and start.prompt == ids[:10]
    assert all(len(r) <= 4 for r in end.responses)  # max_length − prompt
    full = tokenize_row(tok, 0, prompt, [chosen, rejected], max_length=200, max_prompt_length=100)
    assert full.responses[0][-1] == tok.eos_token_id


def test_chat_rows_use_the_chat_template(lm):
    model, tok = lm
    prompt = [{"role": "user", "content": "Name a planet."}]
    chosen = [{"role": "assistant", "content": "Mars."}]
    p_text, r_text = render(tok, prompt, chosen)
    assert p_text == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert p_text + r_text == tok.apply_chat_template(prompt + chosen, tokenize=False)
    row = tokenize_row(tok, 0, prompt, [chosen, "Venus."], max_length=64, max_prompt_length=32)
    with torch.no_grad():
        logps, _ = response_logps(model, collate([row], tok.pad_token_id))
    assert logps[0, 1].item() == pytest.approx(slow_logp(model, row.prompt, row.responses[1]), abs=1e-5)
