"""Seeded tiny models for tests, examples and smoke runs.

Every builder writes a folder that loads through the same public API a user takes with a real checkpoint
(``from_pretrained``, ``open_clip``'s ``local-dir:`` schema). Nothing is downloaded: tokenizers are trained or
written locally from :func:`tiny_corpus`. The same ``seed`` gives bit-identical weights, and the caller's
global RNG state is left untouched.

    >>> from mmpref.tiny_models import MAKERS
    >>> path = MAKERS["lm"]("/tmp/tiny-lm", seed=0)
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTokenizer, PreTrainedTokenizerFast

__all__ = [
    "MAKERS",
    "load_clip",
    "make_tiny_clip",
    "make_tiny_lm",
    "make_tiny_sd15",
    "make_tiny_sdxl",
    "pretrain_tiny_sd15",
    "tiny_corpus",
]

T = TypeVar("T")

LM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# fmt: off
_SUBJECTS = ["the chef", "my sister", "our coach", "a young student", "the old teacher", "my neighbor", "the team"]
_ACTIVITIES = {
    "cooking": ["bakes fresh bread", "chops onions and garlic", "boils pasta in salted water",
                "roasts a chicken with lemon", "stirs the tomato soup", "fries two eggs for breakfast",
                "grills vegetables on the barbecue", "peels potatoes for a creamy stew"],
    "sports": ["plays football in the park", "runs five miles", "scores a goal in the final minute",
               "swims laps at the pool", "trains hard before the big match", "watches the tennis game",
               "rides a bicycle up the steep hill", "throws the basketball through the hoop"],
    "music": ["plays the piano", "sings a quiet song", "listens to jazz on the radio",
              "practices the guitar", "writes a new melody", "goes to a rock concert",
              "tunes the violin carefully", "joins the choir rehearsal"],
    "science": ["measures the temperature of water", "looks at cells under a microscope",
                "reads about black holes", "mixes two chemicals in the lab", "counts the stars at night",
                "studies how plants grow in sunlight", "explains gravity with a falling apple",
                "records the experiment results in a notebook"],
    "travel": ["takes the train to the city", "books a cheap flight to Paris", "packs a small suitcase",
               "walks along the beach", "visits a museum in Rome", "asks for directions at the station",
               "rents a car at the airport", "hikes through the mountains of Norway"],
}
_WHEN = ["today", "on weekends", "every evening", "before dinner", "after school", "last summer", "tomorrow"]
_QA = [
    ("How do I make pancakes?", "Mix flour, eggs and milk, then cook the batter in a hot pan."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Why is the sky blue?", "Sunlight scatters off the air, and blue light scatters the most."),
    ("How many players are on a soccer team?", "Each team has eleven players on the field."),
    ("Can you recommend a good song?", "Sure! Try a slow jazz song with a soft piano."),
    ("What should I pack for a beach trip?", "Bring sunscreen, a towel, water and a hat."),
    ("How long should I boil an egg?", "About nine minutes gives a firm, hard-boiled egg."),
    ("Is it safe to swim after eating?", "Yes, it is usually fine to swim after a light meal."),
    ("What is 12 plus 30?", "12 plus 30 is 42."),
    ("Who wrote this song?", "I'm not sure, but I think it was a famous band from the 1970s."),
    ("What's the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Which planet is the largest?", "Jupiter is the largest planet in our solar system."),
    ("How do vaccines work?", "They teach the immune system to recognize a virus without getting sick."),
    ("Where can I buy a cheap ticket?", "Check the railway website early; prices usually rise later."),
    ("Could you suggest a healthy lunch?", "A salad with beans, cucumber, cheese and olive oil is quick."),
    ("Why do cats purr?", "Cats often purr when they feel relaxed, happy or comfortable."),
    ("How fast can a cheetah run?", "A cheetah can sprint at roughly 110 kilometers per hour."),
    ("What does a drummer do?", "A drummer keeps the rhythm and tempo steady for the whole band."),
    ("Should I learn chess or checkers?", "Both are fun; chess has deeper strategy, checkers is simpler."),
    ("Thanks for your help!", "You're welcome. Have a wonderful day!"),
]
_CAPTIONS = [
    "A photo of a cat sitting on a red sofa.", "An oil painting of a lighthouse at sunset.",
    "A close-up photograph of a dog running on green grass.", "A bowl of ramen with an egg, studio lighting.",
    "A watercolor illustration of a mountain lake, highly detailed.", "An astronaut riding a horse on the moon.",
    "A portrait of a smiling woman wearing a blue hat.", "A city street at night in the rain, 4k.",
]
# fmt: on


def tiny_corpus() -> list[str]:
    """A deterministic English corpus (~500 lines): everyday sentences and question/answer pairs."""
    lines = []
    acts = [a for group in _ACTIVITIES.values() for a in group]
    for i, (subj, act) in enumerate(itertools.product(_SUBJECTS, acts)):
        when = _WHEN[i % len(_WHEN)]
        lines.append(f"{subj.capitalize()} {act} {when}.")
        if i % 3 == 0:
            lines.append(f"Question: What does {subj} do {when}? Answer: {subj.capitalize()} {act}.")
        if i % 5 == 0:
            lines.append(f"Does {subj} like it when it rains? No, {subj} doesn't!")
    for q, a in _QA:
        lines += [q, a, f"User: {q}\nAssistant: {a}"]
    return lines + _CAPTIONS


def _seeded(seed: int, build: Callable[[], T]) -> T:
    """Run ``build()`` under ``torch.manual_seed(seed)`` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ---------------------------------------------------------------------------------------------- causal LM


def _train_lm_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=LM_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def make_tiny_lm(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny Llama causal LM plus a locally trained byte-level BPE tokenizer (vocab 1000).

    The tokenizer adds no special tokens when encoding (``add_special_tokens=True`` is a no-op), so
    ``encode(prompt) + encode(response)`` concatenates cleanly; use the chat template (which ends each turn
    with ``</s>``) or add ``bos``/``eos`` ids yourself. Load with ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = _train_lm_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _seeded(seed, lambda: LlamaForCausalLM(config))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------- Stable Diffusion


_CLIP_WORD = r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"  # CLIP's split, ASCII-only


def _learn_clip_merges(num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE (Sennrich et al.) on CLIP-style words of :func:`tiny_corpus`; ties break lexicographically."""
    words = Counter(w for line in tiny_corpus() for w in re.findall(_CLIP_WORD, line.lower()))
    vocab = {" ".join([*w[:-1], w[-1] + "</w>"]): n for w, n in words.items()}  # symbols joined by spaces
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for word, n in vocab.items():
            symbols = word.split()
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        pattern = re.compile(r"(?<!\S)" + re.escape(" ".join(best)) + r"(?!\S)")
        vocab = {pattern.sub("".join(best), word): n for word, n in vocab.items()}
    return merges


def _write_clip_tokenizer(*folders: Path, vocab_size: int = 1000) -> CLIPTokenizer:
    """Write CLIP's ``vocab.json`` + ``merges.txt`` into each folder and load them as a ``CLIPTokenizer``.

    The vocab holds all 256 byte symbols (plain and word-final, so any text encodes without ``unk``), the
    learnt merges and the two special tokens, in CLIP's order.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    merges = _learn_clip_merges(vocab_size - 2 * len(alphabet) - 2)
    symbols = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
        )
    return CLIPTokenizer.from_pretrained(folders[0], model_max_length=77, local_files_only=True)


def _clip_text_config(tokenizer: CLIPTokenizer, hidden: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=projection_dim,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae() -> AutoencoderKL:
    """A random 8x-downsampling VAE whose ``scaling_factor`` is calibrated (see :func:`_calibrated_scale`).

    SD's own factors (0.18215, 0.13025) make the *real* VAEs' latents unit-variance; on a random VAE they
    would leave latents at std ≈ 0.06, drowning the image in noise at nearly every timestep.
    """
    from diffusers import AutoencoderKL

    # Four blocks -> 8x spatial downsampling, like the real SD VAEs (pipelines use 2 ** (len(blocks) - 1)).
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
    )
    vae.register_to_config(scaling_factor=_calibrated_scale(vae))
    return vae


def _calibrated_scale(vae: AutoencoderKL, n: int = 8, size: int = 64) -> float:
    """1 / std of the posterior-mean latents of ``n`` fixed scenes of :mod:`mmpref.data.image_task`
    (plain and styled), rounded to 3 significant digits: what SD's factor does for its trained VAEs.
    A pure function of the VAE's weights, so the same seed still writes the same folder."""
    import random

    import numpy as np

    from mmpref.data.image_task import draw_scene, random_scene

    rng = random.Random(0)
    images = []
    for k in range(n):
        _, scene = random_scene(rng, size)
        images.append(np.asarray(draw_scene(scene, size, styled=k % 2 == 1, rng=rng), dtype=np.float32))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        std = vae.encode(pixels).latent_dist.mean.std().item()
    return float(f"{1 / std:.3g}")


_SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# The UNet layout both tiny SD sets share: 4x8x8 latents, two resolution levels, one cross-attention level.
_TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


def make_tiny_sd15(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny Stable Diffusion 1.5 pipeline folder: 64x64 px images, 4x8x8 latents.

    Loads with ``StableDiffusionPipeline.from_pretrained(out_dir)`` (no safety checker); the scheduler is a
    ``DDPMScheduler`` with SD's scaled-linear betas and the given ``prediction_type`` ("epsilon" or
    "v_prediction").
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    out_dir = Path(out_dir)
    tokenizer = _write_clip_tokenizer(out_dir / "tokenizer")

    def build():
        return dict(
            unet=UNet2DConditionModel(
                **_TINY_UNET,
                cross_attention_dim=32,
                attention_head_dim=8,
            ),
            vae=_tiny_vae(),
            text_encoder=CLIPTextModel(_clip_text_config(tokenizer)),
        )

    modules = _seeded(seed, build)
    scheduler = DDPMScheduler(**_SD_BETAS, prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        **modules,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


def make_tiny_sdxl(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny SDXL pipeline folder: 64x64 px images, 4x8x8 latents, two text encoders.

    The UNet takes ``text_time`` added conditioning (pooled ``text_encoder_2`` embeds plus six 8-dim time
    ids); cross-attention sees both encoders' hidden states concatenated (32 + 32). The scheduler is SDXL's
    ``EulerDiscreteScheduler``. Loads with ``StableDiffusionXLPipeline.from_pretrained(out_dir)``.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    tokenizer = _write_clip_tokenizer(out_dir / "tokenizer", out_dir / "tokenizer_2")
    time_dim, proj_dim = 8, 32

    def build():
        return dict(
            unet=UNet2DConditionModel(
                **_TINY_UNET,
                cross_attention_dim=32 + 32,
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=6 * time_dim + proj_dim,
            ),
            vae=_tiny_vae(),
            text_encoder=CLIPTextModel(_clip_text_config(tokenizer)),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tokenizer, projection_dim=proj_dim)),
        )

    modules = _seeded(seed, build)
    scheduler = EulerDiscreteScheduler(
        **_SD_BETAS, prediction_type=prediction_type, steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        **modules, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler
    )
    pipe.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------------- CLIP

CLIP_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 8, "layers": 2},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def make_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny open_clip ViT (32 px images, patch 8, width 32, embed dim 32) as an open_clip local dir.

    The folder holds ``open_clip_config.json`` and ``open_clip_model.safetensors``, the layout open_clip reads
    with its ``local-dir:`` schema (see :func:`load_clip`). The text tower uses open_clip's default
    ``SimpleTokenizer`` (bundled vocabulary of 49408, context 77), so no tokenizer file is needed.
    """
    import open_clip
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _seeded(seed, lambda: open_clip.CLIP(**CLIP_MODEL_CFG))
    preprocess_cfg = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    config = {"model_cfg": CLIP_MODEL_CFG, "preprocess_cfg": preprocess_cfg}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / "open_clip_model.safetensors"
    )
    return out_dir


def load_clip(
    out_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Callable, Callable]:
    """Load a :func:`make_tiny_clip` folder (or any open_clip local dir) as ``(model, preprocess, tokenizer)``.

    Goes through :func:`mmpref.hub.load_open_clip`, as a user's CLIP model does.
    """
    from mmpref.hub import load_open_clip

    return load_open_clip(f"local-dir:{Path(out_dir)}", device=device)


def pretrain_tiny_sd15(
    model_dir: str | Path,
    dataset: str | Path,
    out_dir: str | Path,
    unet_steps: int = 400,
    vae_steps: int = 0,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> Path:
    """Copy a tiny SD 1.5 folder to ``out_dir`` with its UNet (and optionally its VAE) trained on ``dataset``.

    Preference training starts from a model that already denoises (SD 1.5 does); a random UNet's errors
    are so large that the preference signal drowns in them. Every image of every pair is a training
    sample here, chosen and rejected alike, so the result prefers neither: it is a neutral reference.

    * ``vae_steps`` > 0 first trains the VAE as an autoencoder of the images (reconstruction MSE plus a
      small KL term, batches of 16), so that decoded samples show pictures rather than noise, and
      re-calibrates its ``scaling_factor`` (:func:`_calibrated_scale`).
    * ``unet_steps`` of plain denoising: ε-prediction loss, uniform timesteps, 10% empty captions, AdamW.
    """
    import shutil

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from mmpref.adapters.diffusion import (
        diffusion_target,
        encode_images,
        encode_prompt_sd15,
        tokenize_captions,
    )
    from mmpref.data.image_inputs import pair_pixels
    from mmpref.data.images import prepare_image_dataset
    from mmpref.progress import progress

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").train()
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")

    pairs = prepare_image_dataset(dataset).pairs
    resolution = 8 * unet.config.sample_size
    pixels = torch.cat([pair_pixels(p, resolution).pixels for p in pairs])  # (2n, 3, R, R)
    g = torch.Generator().manual_seed(seed)
    if vae_steps:
        vae.train()
        optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
        for _ in progress(range(vae_steps), desc="pretrain VAE", unit="step"):
            x = pixels[torch.randint(0, pixels.shape[0], (16,), generator=g)]
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=g)).sample
            loss = F.mse_loss(recon, x) + 1e-3 * posterior.kl().mean() / x[0].numel()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        vae.eval().register_to_config(scaling_factor=_calibrated_scale(vae))
        shutil.rmtree(out_dir / "vae")
        vae.save_pretrained(out_dir / "vae", safe_serialization=True)
    vae.eval()
    with torch.no_grad():
        latents = encode_images(vae, pixels)
        captions = [p.caption for p in pairs for _ in range(2)] + [""]
        embeds = encode_prompt_sd15(encoder, tokenize_captions(tokenizer, captions))
    embeds, empty = embeds[:-1], embeds[-1:]

    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate)
    for _ in progress(range(unet_steps), desc="pretrain UNet", unit="step"):
        idx = torch.randint(0, latents.shape[0], (batch_size,), generator=g)
        x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
        drop = (torch.rand(batch_size, generator=g) < 0.1).view(-1, 1, 1)
        ehs = torch.where(drop, empty, embeds[idx])
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=ehs).sample
        loss = F.mse_loss(pred, diffusion_target(scheduler, x0, noise, t))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    return out_dir


MAKERS: dict[str, Callable[..., Path]] = {
    "lm": make_tiny_lm,
    "sd15": make_tiny_sd15,
    "sdxl": make_tiny_sdxl,
    "clip": make_tiny_clip,
}
