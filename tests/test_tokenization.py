"""Tokenization at the prompt/response boundary: BOS as the tokenizer puts it, one EOS, the prompt cut."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmpref.adapters.causal_lm import tokenize_row
from mmpref.tiny_models import make_tiny_lm, tiny_corpus

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA_TEMPLATE = (  # closes a turn with <end_of_turn>, which is not the EOS token
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PROMPT = [{"role": "user", "content": "How do I make pancakes?"}]
ANSWER = [{"role": "assistant", "content": "Mix flour and eggs."}]


def bpe_tokenizer(bos: str, eos: str, extra: list[str], post: str | None, template: str | None = None):
    """A byte-level BPE trained on the tiny corpus; ``post`` is its post-processor template (e.g. ``"<s> $A"``)."""
    specials = ["<unk>", "<pad>", bos, eos, *extra]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))  # fmt: skip
    if post is not None:
        names = [t for t in post.split() if t not in ("$A", "$B")]
        tok.post_processor = processors.TemplateProcessing(
            single=post, special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys(names)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token=bos,
                                   eos_token=eos, chat_template=template, clean_up_tokenization_spaces=False)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The project's tiny LM tokenizer: no BOS, a template that ends each turn with ``</s>\\n``."""
    return AutoTokenizer.from_pretrained(make_tiny_lm(tmp_path_factory.mktemp("lm")))


@pytest.fixture(scope="module")
def llama2():
    """Template-less, its post-processor adds BOS (as Llama 2's and Mistral's do)."""
    return bpe_tokenizer("<s>", "</s>", [], post="<s> $A")


@pytest.fixture(scope="module")
def llama3():
    """Adds <|begin_of_text|> itself and its chat template writes it too."""
    return bpe_tokenizer("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"],
                         post="<|begin_of_text|> $A", template=LLAMA3_TEMPLATE)  # fmt: skip


def row(tokenizer, prompt, responses, max_length=128, max_prompt_length=64, **kwargs):
    return tokenize_row(tokenizer, 0, prompt, responses, max_length=max_length,
                        max_prompt_length=max_prompt_length, **kwargs)  # fmt: skip


# ------------------------------------------------------------------------------------------------ EOS


def test_a_template_that_closes_the_turn_with_eos_gets_no_second_one(tiny):
    r = row(tiny, PROMPT, [ANSWER, "Burn it."])
    assert [tiny.decode(ids) for ids in r.responses] == ["Mix flour and eggs.</s>", "Burn it.</s>"]
    assert tiny.decode(r.prompt) == "<|user|>\nHow do I make pancakes?</s>\n<|assistant|>\n"


def test_llama3_turns_end_with_one_eot(llama3):
    r = row(llama3, PROMPT, [ANSWER])
    assert r.responses[0][-1] == llama3.eos_token_id and r.responses[0].count(llama3.eos_token_id) == 1
    assert llama3.decode(r.responses[0]) == "Mix flour and eggs.<|eot_id|>"


def test_a_turn_closed_by_another_token_gets_eos_appended():
    gemma = bpe_tokenizer("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], post="<bos> $A",
                          template=GEMMA_TEMPLATE)  # fmt: skip
    r = row(gemma, PROMPT, [ANSWER])
    assert gemma.decode(r.responses[0]) == "Mix flour and eggs.<end_of_turn>\n<eos>"
    assert gemma.decode(r.prompt).count("<bos>") == 1


def test_plain_responses_get_exactly_one_eos(tiny):
    r = row(tiny, "What is the capital of France?", [" Paris.", " Paris.</s>"])
    assert r.responses[0] == r.responses[1] and r.responses[0].count(tiny.eos_token_id) == 1
    assert r.responses[0][-1] == tiny.eos_token_id


# ------------------------------------------------------------------------------------------------ BOS


def test_plain_prompts_get_the_bos_the_tokenizer_adds(llama2, tiny):
    text = "How do I make pancakes?"
    r = row(llama2, text, [" Mix flour."])
    assert r.prompt == llama2(text)["input_ids"] and r.prompt[0] == llama2.bos_token_id
    assert r.prompt.count(llama2.bos_token_id) == 1 and llama2.bos_token_id not in r.responses[0]
    assert row(llama2, "<s>" + text, [" Mix flour."]).prompt == r.prompt  # already there: not twice
    assert row(tiny, text, [" Mix flour."]).prompt == tiny(text, add_special_tokens=False)["input_ids"]


def test_only_the_tokenizers_leading_tokens_are_added():
    """A post-processor that also appends EOS to a text: the prompt takes its BOS, not its EOS."""
    both = bpe_tokenizer("<s>", "</s>", [], post="<s> $A </s>")
    r = row(both, "How do I make pancakes?", [" Mix flour."])
    assert r.prompt == both("How do I make pancakes?")["input_ids"][:-1] and r.prompt[0] == both.bos_token_id
    assert both.eos_token_id not in r.prompt


def test_a_template_that_writes_bos_gets_no_second_one(llama3):
    r = row(llama3, PROMPT, [ANSWER, "Burn it."])
    assert (
        llama3(llama3.apply_chat_template(PROMPT, tokenize=False))["input_ids"][:2]
        == [llama3.bos_token_id] * 2
    )
    assert r.prompt[0] == llama3.bos_token_id and r.prompt.count(llama3.bos_token_id) == 1
    assert r.prompt == llama3.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]  # fmt: skip
    assert all(llama3.bos_token_id not in ids for ids in r.responses)


# ----------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_the_prompt_cut_keeps_bos(llama2, mode):
    text = "Tell me something about the orbit of the moon around the earth and why tides happen."
    ids = llama2(text)["input_ids"]
    assert len(ids) > 10
    r = row(llama2, text, [" Gravity."], max_length=20, max_prompt_length=10, truncation_mode=mode)
    assert r.prompt == ids[:1] + (ids[-9:] if mode == "keep_end" else ids[1:10])
    assert all(len(resp) <= 20 - 10 for resp in r.responses)


def test_the_prompt_budget_is_fixed(tiny):
    """The prompt is cut to max_prompt_length even when the row would fit (see the module docstring)."""
    text = "Tell me something about the orbit of the moon around the earth and why tides happen."
    ids = tiny(text, add_special_tokens=False)["input_ids"]
    short, long = (row(tiny, text, [" No.", answer], max_length=200, max_prompt_length=10)
                   for answer in (" Yes.", " Gravity pulls the water. " * 5))  # fmt: skip
    assert short.prompt == long.prompt == ids[-10:]
    cut = row(tiny, text, [" Gravity pulls the water. " * 5], max_length=16, max_prompt_length=10)
    assert len(cut.prompt) == 10 and len(cut.responses[0]) == 6  # the response gets what is left; EOS may go
