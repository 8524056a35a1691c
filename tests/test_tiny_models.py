"""The tiny seeded builders in `mmpref.tiny_models` load through the public APIs a user takes and run."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmpref.tiny_models import MAKERS, load_clip, make_tiny_sd15

PROMPT = "A photo of a Café — naïve 🐱 at 3pm, highly detailed!"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build each kind once per module (seed 0), lazily."""
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = MAKERS[kind](tmp_path_factory.mktemp(kind), seed=0)
        return cache[kind]

    return get


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {
        f"{f.relative_to(path)}:{k}": v
        for f in sorted(path.rglob("*.safetensors"))
        for k, v in load_file(f).items()
    }


def test_lm_loads_and_runs(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = built("lm")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (
        "llama",
        2,
        2,
        len(tok),
    )
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]) == [
        "<s>",
        "</s>",
        "<pad>",
    ]
    assert not cfg.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()

    batch = tok(["The chef bakes fresh bread.", "Why is the sky blue?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! How's the weather in Paris? It's 23°C — nice.",
        "  Two  spaces, tabs\tand\nnew lines: 42%!",
    ],
)
def test_lm_tokenizer_round_trips_and_adds_no_special_tokens(built, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built("lm"), local_files_only=True)
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    # Common words are single tokens, so the BPE really was trained.
    assert len(tok("The chef bakes fresh bread before dinner.")["input_ids"]) <= 10


def test_lm_chat_template(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built("lm"), local_files_only=True)
    chat = [
        {"role": "user", "content": "How do I make pancakes?"},
        {"role": "assistant", "content": "Mix flour."},
    ]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == "<|user|>\nHow do I make pancakes?</s>\n<|assistant|>\nMix flour.</s>\n"
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("</s>\n<|assistant|>\n") and text.startswith(prompt)
    ids = tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(tok.eos_token_id) == 2


def _check_clip_tokenizer(tokenizer):
    ids = tokenizer(PROMPT).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert (
        ids.count(tokenizer.unk_token_id) == 1
    )  # unk is <|endoftext|>: only the final eos, never an unknown
    assert tokenizer.model_max_length == 77


def test_sd15_pipeline(built):
    from diffusers import StableDiffusionPipeline

    path = built("sd15")
    assert (path / "tokenizer" / "vocab.json").is_file() and (path / "tokenizer" / "merges.txt").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    _check_clip_tokenizer(pipe.tokenizer)

    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)

    ids = pipe.tokenizer([PROMPT], padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        noise = pipe.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 999]), hidden.expand(2, -1, -1)).sample
        latents = pipe.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
    assert hidden.shape == (1, 77, 32)
    assert noise.shape == (2, 4, 8, 8)
    assert latents.shape == (1, 4, 8, 8)


def test_sd15_v_prediction(tmp_path):
    from diffusers import DDPMScheduler

    path = make_tiny_sd15(tmp_path, prediction_type="v_prediction")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    assert scheduler.config.prediction_type == "v_prediction"


def test_sdxl_pipeline(built):
    from diffusers import StableDiffusionXLPipeline

    path = built("sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)
    assert pipe.vae_scale_factor == 8
    _check_clip_tokenizer(pipe.tokenizer)
    _check_clip_tokenizer(pipe.tokenizer_2)
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    assert (
        cfg.cross_attention_dim
        == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert (
        cfg.projection_class_embeddings_input_dim
        == 6 * cfg.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )

    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(image, Image.Image) and image.size == (64, 64)

    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        cond = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        noise = pipe.unet(torch.randn(1, 4, 8, 8), 500, embeds, added_cond_kwargs=cond).sample
    assert embeds.shape == (1, 77, 64) and pooled.shape == (1, 32)
    assert noise.shape == (1, 4, 8, 8)


def test_clip_loads_through_open_clip(built):
    path = built("clip")
    model, preprocess, tokenizer = load_clip(path)
    saved = load_file(path / "open_clip_model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items() if k in saved)
    assert set(saved) <= set(model.state_dict())

    image = preprocess(Image.new("RGB", (64, 48), "red")).unsqueeze(0)
    with torch.no_grad():
        image_features = model.encode_image(image)
        text_features = model.encode_text(tokenizer(["a photo of a cat", "a red square"]))
    assert image.shape == (1, 3, 32, 32)
    assert image_features.shape == (1, 32) and text_features.shape == (2, 32)


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_seeded_and_deterministic(built, tmp_path, kind):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    same, other = (
        weights(MAKERS[kind](tmp_path / "same", seed=0)),
        weights(MAKERS[kind](tmp_path / "other", seed=1)),
    )
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched

    first = weights(built(kind))
    assert first.keys() == same.keys() == other.keys()
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    if kind != "clip":  # tokenizer files are deterministic too (they do not depend on the seed)
        tok = next(p for p in ("tokenizer.json", "tokenizer/vocab.json") if (built(kind) / p).exists())
        assert (built(kind) / tok).read_bytes() == (tmp_path / "other" / tok).read_bytes()
