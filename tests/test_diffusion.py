"""Diffusion-DPO / Diffusion-RPO: the adapter's ℓ, the data, the latent cache, training and saving."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image

from mmpref.adapters.diffusion import (
    diffusion_logratios,
    sample_pair_noise,
    sdxl_time_ids,
)
from mmpref.data import DataError
from mmpref.data.image_inputs import PairEmbedder, pair_pixels
from mmpref.data.image_task import make_image_style_task
from mmpref.data.images import prepare_image_dataset, validate_image_data
from mmpref.losses import LogRatios, Objective
from mmpref.tiny_models import make_tiny_clip, make_tiny_sd15, make_tiny_sdxl
from mmpref.training import ConfigError, load_config, train
from mmpref.training.build import build_task
from mmpref.training.config import LossConfig, RPOConfig
from mmpref.training.reference import FrozenCopy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion")
    train_file, eval_file = make_image_style_task(root / "task", n_train=24, n_eval=8, seed=1)
    return {
        "sd15": make_tiny_sd15(root / "sd15", seed=0),
        "sdxl": make_tiny_sdxl(root / "sdxl", seed=0),
        "clip": make_tiny_clip(root / "clip", seed=0),
        "train": train_file,
        "eval": eval_file,
    }


def config(tiny, out: Path, *overrides: str, kind: str = "sd15"):
    base = [f"model={tiny[kind]}", f"dataset={tiny['train']}", f"eval_dataset={tiny['eval']}", f"output_dir={out}",
            "report_to=none", "diffusion.resolution=64", "loss.beta=5000", "max_steps=2", "batch_size=2",
            "eval_batch_size=8", "learning_rate=1e-5", "log_every=1", "max_length=64", "max_prompt_length=32"]  # fmt: skip
    return load_config(None, [*base, *overrides])


def unet_and_scheduler(folder, prediction_type="epsilon"):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", prediction_type=prediction_type)
    return unet, scheduler


def perturbed(unet, seed=1, scale=0.02):
    """A policy that differs from the reference, so ℓ ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return unet


# ------------------------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_batched_logratios_equal_per_image_computation(tiny, prediction_type):
    unet, scheduler = unet_and_scheduler(tiny["sd15"], prediction_type)
    reference = FrozenCopy(unet).module
    perturbed(unet)
    g = torch.Generator().manual_seed(0)
    b = 3
    lw, ll = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    ehs = torch.randn(b, 77, 32, generator=g)
    noise, t = sample_pair_noise(lw, 1000, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = diffusion_logratios(unet, reference, lw, ll, ehs, scheduler, noise=noise, timesteps=t)

        def err(model, x0, i):
            noisy = scheduler.add_noise(x0[i : i + 1], noise[i : i + 1], t[i : i + 1])
            pred = model(noisy, t[i : i + 1], encoder_hidden_states=ehs[i : i + 1]).sample
            target = noise[i : i + 1] if prediction_type == "epsilon" else scheduler.get_velocity(
                x0[i : i + 1], noise[i : i + 1], t[i : i + 1])  # fmt: skip
            return F.mse_loss(pred, target).item()

        slow = torch.tensor(
            [[-0.5 * (err(unet, x, i) - err(reference, x, i)) for x in (lw, ll)] for i in range(b)]
        )
        model_err = torch.tensor([[err(unet, x, i) for x in (lw, ll)] for i in range(b)])
    torch.testing.assert_close(out.model_err, model_err, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logratios, slow, atol=1e-6, rtol=1e-3)
    assert out.logratios.abs().min() > 0


def test_noise_and_timestep_are_shared_within_each_pair(tiny):
    unet, scheduler = unet_and_scheduler(tiny["sd15"])
    seen = []

    def spy(sample, t, encoder_hidden_states):
        seen.append((sample, t))
        return unet(sample, t, encoder_hidden_states=encoder_hidden_states)

    g = torch.Generator().manual_seed(0)
    b = 4
    lw, ll = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    with torch.no_grad():
        diffusion_logratios(spy, spy, lw, ll, torch.randn(b, 77, 32, generator=g), scheduler, generator=g)
    (noisy, t), (noisy_ref, t_ref) = seen
    assert torch.equal(t[:b], t[b:]) and torch.equal(t, t_ref) and torch.equal(noisy, noisy_ref)
    assert len(set(t[:b].tolist())) > 1  # drawn per pair, not once per batch
    a = scheduler.alphas_cumprod[t[:b]].view(-1, 1, 1, 1)
    eps_w, eps_l = (noisy[:b] - a.sqrt() * lw) / (1 - a).sqrt(), (noisy[b:] - a.sqrt() * ll) / (1 - a).sqrt()
    torch.testing.assert_close(eps_w, eps_l, atol=1e-4, rtol=1e-4)


def test_sdxl_time_ids_for_a_non_square_image(tmp_path):
    assert sdxl_time_ids([(480, 640)], [(0, 80)], (512, 512)).tolist() == [[480, 640, 0, 80, 512, 512]]
    for k, color in enumerate(("red", "blue")):
        Image.new("RGB", (80, 48), color).save(tmp_path / f"{k}.png")  # 80 wide, 48 high
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"caption": "x", "jpg_0": "0.png", "jpg_1": "1.png", "label_0": 0})
    )
    pair = prepare_image_dataset(tmp_path / "d.jsonl").pairs[0]
    pp = pair_pixels(pair, 32)
    assert pp.pixels.shape == (2, 3, 32, 32) and pp.pixels.min() >= -1 and pp.pixels.max() <= 1
    # shorter side 48 -> 32, width 80 -> 53, centre crop starts at column round(10.5) = 10
    assert pp.original_size == (48, 80) and pp.crop_top_left == (0, 10)
    ids = sdxl_time_ids([pp.original_size], [pp.crop_top_left], (32, 32))
    assert ids.tolist() == [[48, 80, 0, 10, 32, 32]]
    assert pp.pixels[0, 2].mean() > 0.9  # label_0 = 0: jpg_1 (blue) is the chosen image


def test_reference_equal_to_policy_gives_log2_and_a_gradient(tiny):
    unet, scheduler = unet_and_scheduler(tiny["sd15"])
    g = torch.Generator().manual_seed(0)
    lw, ll = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    out = diffusion_logratios(unet, FrozenCopy(unet).module, lw, ll, torch.randn(2, 77, 32, generator=g), scheduler,
                              generator=g)  # fmt: skip
    assert torch.equal(out.logratios, torch.zeros(2, 2))
    loss = Objective.from_config(LossConfig(beta=5000), RPOConfig())(LogRatios(out.logratios, torch.arange(2))).loss
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    grad = sum(p.grad.abs().sum() for p in unet.parameters() if p.grad is not None)
    assert grad > 0


def test_diffusion_dpo_value_matches_the_published_formula():
    g = torch.Generator().manual_seed(0)
    m_w, m_l, r_w, r_l = (torch.rand(5, generator=g) * 0.01 + 0.1 for _ in range(4))
    beta = 5000.0
    lw, ll = -0.5 * (m_w - r_w), -0.5 * (m_l - r_l)
    out = Objective.from_config(LossConfig(beta=beta), RPOConfig())(LogRatios(torch.stack([lw, ll], 1), torch.arange(5)))
    published = -F.logsigmoid(-0.5 * beta * ((m_w - m_l) - (r_w - r_l))).mean()
    torch.testing.assert_close(out.loss, published)


# ---------------------------------------------------------------------------------------------- data


def test_bad_rows_are_reported_by_row_number_and_ties_counted(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [
        {"caption": "ok", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1},
        {"caption": " ", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1},
        {"caption": "tie", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 0.5},
        {"caption": "broken", "jpg_0": "broken.png", "jpg_1": "b.png", "label_0": 0},
        {"caption": "missing", "jpg_0": "nope.png", "jpg_1": "b.png", "label_0": 0},
        {"caption": "label", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 2},
        {"caption": "same", "jpg_0": "a.png", "jpg_1": "a.png", "label_0": 0},
        {"caption": "ok too", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 0},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:  # opening checks what needs no image bytes
        prepare_image_dataset(path)
    msg = str(e.value)
    for expected in ("row 1: empty 'caption'", "row 5: 'label_0' must be 1, 0 or 0.5"):
        assert expected in msg
    assert "2 of 8 rows are bad" in msg
    ds = prepare_image_dataset(path, on_bad_rows="skip")
    assert (ds.skipped, ds.ties, [p.row for p in ds.pairs]) == (2, 1, [0, 3, 4, 6, 7])
    assert ds.pairs[4].chosen == tmp_path / "b.png"  # label_0 = 0: jpg_1 is chosen
    bad = validate_image_data(ds)  # the images, read as a batch or `mmpref validate-data` reads them
    assert [str(b)[: len(want)] for b, want in zip(bad, ("row 3: 'jpg_0' does not decode", "row 4: 'jpg_0' no such file",
            "row 6: 'jpg_0' and 'jpg_1' are the same image"))] == ["row 3: 'jpg_0' does not decode",
            "row 4: 'jpg_0' no such file", "row 6: 'jpg_0' and 'jpg_1' are the same image"]  # fmt: skip
    (tmp_path / "cols.jsonl").write_text(json.dumps({"caption": "x", "jpg_0": "a.png"}) + "\n")
    with pytest.raises(DataError, match="missing columns jpg_1, label_0"):
        prepare_image_dataset(tmp_path / "cols.jsonl")


def test_images_as_bytes_in_parquet(tmp_path):
    import io

    import datasets

    blobs = []
    for color in ("red", "blue"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    ds = datasets.Dataset.from_dict(
        {"caption": ["c"], "jpg_0": [blobs[0]], "jpg_1": [blobs[1]], "label_0": [1.0]}
    )
    ds.to_parquet(tmp_path / "d.parquet")
    pairs = prepare_image_dataset(tmp_path / "d.parquet").pairs
    assert pairs[0].chosen == blobs[0] and pairs[0].rejected == blobs[1]


# ----------------------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_cached_and_uncached_logratios_agree(tiny, tmp_path, kind):
    acc = Accelerator(cpu=True)
    import shutil

    fresh = tmp_path / "data"  # a copy of the data: its own, empty cache folder for the lazy task
    shutil.copytree(Path(tiny["train"]).parent, fresh, ignore=shutil.ignore_patterns(".mmpref_cache"))
    lazy = (f"dataset={fresh / 'train.jsonl'}", f"eval_dataset={fresh / 'eval.jsonl'}")
    tasks = [build_task(config(tiny, tmp_path / c, f"diffusion.cache_latents={c}", *more, kind=kind), acc)
             for c, more in (("ahead", ()), ("off", ()), ("lazy", lazy))]  # fmt: skip
    assert tasks[0].is_sdxl == (kind == "sdxl")
    assert tasks[0].vae is None and tasks[0].text_encoders == []  # freed: the cache holds everything
    assert tasks[2].vae is not None  # lazy: kept until every row is cached
    logratios = []
    for task in tasks:
        perturbed(task.model)
        torch.manual_seed(3)  # the same prompt-dropout draws and noise
        batch = task.collate_train([0, 1, 2, 3])
        with torch.no_grad():
            logratios.append(task.rows(task.model, batch).logratios)
    assert logratios[0].abs().min() > 0
    torch.testing.assert_close(logratios[0], logratios[1], atol=2e-4, rtol=2e-2)
    assert torch.equal(logratios[0], logratios[2])  # encoded as the batch reads it: the stored values, exactly


def test_training_with_the_cache_never_encodes(tiny, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    train(config(tiny, tmp_path / "first", "diffusion.cache_latents=ahead"))  # the whole cache, beside the data
    cache_dir = Path(tiny["train"]).parent / ".mmpref_cache"
    assert any(cache_dir.glob("latents-*/chunk-*.safetensors"))

    def forbidden(*args, **kwargs):
        raise AssertionError("an encoder ran during training with cache_latents")

    monkeypatch.setattr(AutoencoderKL, "encode", forbidden)
    monkeypatch.setattr(CLIPTextModel, "forward", forbidden)
    final = train(config(tiny, tmp_path / "second", "diffusion.prompt_dropout=0.5"))
    assert (final / "unet" / "config.json").is_file()


def test_xformers_missing_is_a_config_error(tiny, tmp_path):
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="diffusion.attention: xformers is not installed"):
        build_task(config(tiny, tmp_path, "diffusion.attention=xformers"), Accelerator(cpu=True))


# -------------------------------------------------------------------------------------- RPO, saving


def test_rpo_uses_cached_clip_embeddings_per_image(tiny, tmp_path, monkeypatch):
    ds = prepare_image_dataset(tiny["eval"])
    pairs = [ds.load(i) for i in range(len(ds))]
    emb = PairEmbedder(f"local-dir:{tiny['clip']}", mode="image+text")(pairs)
    assert emb.shape == (len(ds), 2, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(ds), 2))
    assert not torch.allclose(emb[:, 0], emb[:, 1])  # one embedding per image
    text = PairEmbedder(f"local-dir:{tiny['clip']}", mode="text")(pairs)
    assert torch.equal(text[:, 0], text[:, 1])
    rpo = ("loss.type=rpo", f"rpo.clip_model=local-dir:{tiny['clip']}", "diffusion.cache_latents=ahead")
    build_task(config(tiny, tmp_path / "fill", *rpo), Accelerator(cpu=True))  # fills the CLIP cache too
    import mmpref.data.image_inputs as image_inputs

    monkeypatch.setattr(image_inputs, "load_open_clip", lambda *a, **k: pytest.fail("cache miss"))
    task = build_task(config(tiny, tmp_path / "hit", *rpo), Accelerator(cpu=True))
    batch = task.collate_eval(list(range(len(ds))))
    torch.testing.assert_close(batch["embeddings"], emb, atol=1e-3, rtol=0)  # stored as float16
    monkeypatch.undo()
    cfg = config(tiny, tmp_path / "run", "loss.type=rpo", f"rpo.clip_model=local-dir:{tiny['clip']}")
    task = build_task(cfg, Accelerator(cpu=True))
    batch = task.collate_train([0, 1, 2])
    rows = task.rows(task.model, batch)
    assert rows.embeddings.shape == (3, 2, 32)
    assert torch.isfinite(Objective.from_config(cfg.loss, cfg.rpo)(rows).loss)
    with pytest.raises(ConfigError, match="rpo.clip_model"):  # the plan refuses it, before any weights load
        build_task(config(tiny, tmp_path / "r2", "loss.type=rpo"), Accelerator(cpu=True))


def _generate(pipe):
    return pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def test_saved_unet_and_lora_load_into_a_pipeline(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    final = train(config(tiny, tmp_path / "full", "learning_rate=1e-3"))
    unet = UNet2DConditionModel.from_pretrained(final, subfolder="unet")
    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd15"], unet=unet, safety_checker=None)
    image = _generate(pipe)
    assert image.shape == (1, 64, 64, 3) and image.std() > 0

    final = train(config(tiny, tmp_path / "lora", "lora.r=4", "lora.alpha=4", "learning_rate=1e-2"))
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd15"], safety_checker=None)
    base = _generate(pipe)
    pipe.load_lora_weights(final)
    assert "default_0" in pipe.unet.peft_config or len(pipe.unet.peft_config) == 1
    adapted = _generate(pipe)
    assert adapted.shape == base.shape and not torch.allclose(torch.tensor(adapted), torch.tensor(base))


def test_sdxl_lora_trains_and_loads(tiny, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    final = train(config(tiny, tmp_path / "xl", "lora.r=4", "learning_rate=1e-2", kind="sdxl"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"])
    pipe.load_lora_weights(final)
    assert _generate(pipe).shape == (1, 64, 64, 3)


# ---------------------------------------------------------------------------------------- learning


def test_tiny_vae_latents_have_unit_scale(tiny):
    """make_tiny_* calibrate the random VAE's scaling factor (SD's 0.18215 would give std ≈ 0.06)."""
    from diffusers import AutoencoderKL

    from mmpref.adapters.diffusion import encode_images

    vae = AutoencoderKL.from_pretrained(tiny["sd15"], subfolder="vae")
    pixels = torch.stack([pair_pixels(p, 64).pixels for p in prepare_image_dataset(tiny["train"]).pairs[:8]])
    std = encode_images(vae, pixels.flatten(0, 1)).std().item()
    assert 0.7 < std < 1.4
    again = make_tiny_sd15(Path(tiny["sd15"]).parent / "sd15-again", seed=0)  # same seed, same folder
    for name in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (again / name).read_bytes() == (Path(tiny["sd15"]) / name).read_bytes()


@pytest.fixture(scope="module")
def style_task(tmp_path_factory):
    """The bundled style task at full size (160 train, 48 held-out pairs), written afresh."""
    return make_image_style_task(tmp_path_factory.mktemp("style"), n_train=160, n_eval=48, seed=0)


@pytest.fixture(scope="module")
def denoiser(tiny, style_task, tmp_path_factory):
    """The tiny SD 1.5 with its UNet pretrained on plain denoising of the task's images (chosen and rejected
    alike): a neutral reference that already denoises, as SD 1.5 does for real preference runs."""
    from mmpref.cli import main

    out = tmp_path_factory.mktemp("denoiser")
    assert main(["make-tiny", "sd15", str(out), "--pretrain-on", str(style_task[0])]) == 0  # pretrain_tiny_sd15
    return out


# Measured on 2 CPU cores (seeds 0 and 1, same data): held-out accuracy 0.50 before; after 150 steps
# 0.83 / 0.79 (DPO) and 0.81 / 0.83 (RPO, CLIP image+text weights); with the random UNet as reference
# accuracy stayed near chance. About 40 s per run on quiet cores.
LEARNING_RUN = ["batch_size=16", "learning_rate=5e-5", "max_steps=150", "eval_every=0", "warmup_steps=0",
                "lr_scheduler=constant", "eval_batch_size=48", "diffusion.eval_noise_draws=8",
                "diffusion.prompt_dropout=0", "log_every=50"]  # fmt: skip
LEARNED_ACCURACY = 0.7


@pytest.mark.parametrize("loss", ["sigmoid", "rpo"])
def test_preference_training_learns_the_style_on_held_out_pairs(tiny, style_task, denoiser, tmp_path, loss):
    train_file, eval_file = style_task
    # RPO's softmax weights spread β over the batch's 16 contrasts per chosen image: a larger β
    extra = ["loss.type=rpo", "loss.beta=5000", f"rpo.clip_model=local-dir:{tiny['clip']}"] if loss == "rpo" \
        else ["loss.beta=500"]  # fmt: skip
    cfg = config(tiny, tmp_path, f"model={denoiser}", f"dataset={train_file}", f"eval_dataset={eval_file}",
                 *LEARNING_RUN, *extra)  # fmt: skip
    train(cfg)
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    acc = [r["eval/rewards/accuracies"] for r in evals if "eval/rewards/accuracies" in r]
    assert acc[0] == 0.5  # policy = reference: every margin is 0
    assert acc[-1] >= LEARNED_ACCURACY, acc


# ------------------------------------------------------------------------------- samples and `mmpref sample`


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_sample_hook_logs_scores_and_the_sample_command_reproduces_it(tiny, tmp_path, kind):
    from mmpref.cli import main

    prompts = ["a red circle on a blue background", "a green square on a white background"]
    out = tmp_path / "run"
    lora = ["lora.r=4", "lora.alpha=4", "learning_rate=1e-2"] if kind == "lora" else ["learning_rate=1e-3"]
    cfg = config(tiny, out, f"samples.prompts={','.join(prompts)}", "samples.num_inference_steps=2",
                 f"samples.style_refs={Path(tiny['train']).parent / 'style_refs'}", "eval_every=1",
                 "samples.style_names=striped,plain", "samples.style_target=striped",
                 f"samples.clip_model=local-dir:{tiny['clip']}", *lora)  # fmt: skip
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if "samples/style_score" in r}
    assert sorted(scored) == [0, 1, 2]
    for name in ("samples/style_score", "samples/style_accuracy", "samples/content_score"):
        assert all(math.isfinite(r[name]) for r in scored.values()), name
    assert "samples/reference_style_score" in scored[0]
    samples = out / "samples"
    assert (samples / "latest.png").is_file() and (samples / "grid-step-00000002.png").is_file()

    def pixels(path):
        return np.asarray(Image.open(path), dtype=np.int16)

    # at step 0 the policy is the reference: same seeds, same images
    assert np.array_equal(pixels(samples / "reference/000.png"), pixels(samples / "step-00000000/000.png"))
    assert not np.array_equal(pixels(samples / "reference/000.png"), pixels(samples / "step-00000002/000.png"))

    # `mmpref sample` on the run: the reference and the final weights, with the same seeds, give the same images
    (tmp_path / "prompts.txt").write_text("# two prompts\n" + "\n".join(prompts) + "\n")
    again = tmp_path / "again"
    assert main(["sample", str(out), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
                 "--out", str(again)]) == 0  # fmt: skip
    for i in range(2):
        ref, trained = pixels(again / f"reference/{i:03d}.png"), pixels(again / f"trained/{i:03d}.png")
        assert np.abs(ref - pixels(samples / f"reference/{i:03d}.png")).max() <= 1
        assert np.abs(trained - pixels(samples / f"step-00000002/{i:03d}.png")).max() <= 1
    assert Image.open(again / "grid.png").size[1] > 2 * 64
    assert main(["sample", str(tmp_path / "nowhere"), "--prompts", str(tmp_path / "prompts.txt")]) == 2


def test_ema_weights_are_the_average_of_the_trained_ones(tiny, tmp_path):
    """final/ of an EMA run equals diffusers' EMA recursion applied to the weights after each step of a plain
    run (training itself is unchanged by EMA): s₁ = w₁, sₖ = dₖ·sₖ₋₁ + (1 − dₖ)·wₖ, dₖ = min(d, k/(9 + k))."""
    from diffusers import UNet2DConditionModel

    common = ["lr_scheduler=constant", "learning_rate=1e-3", "eval_dataset=null", "log_every=1"]

    def weights(final):
        return UNet2DConditionModel.from_pretrained(final, subfolder="unet").state_dict()

    steps = [weights(train(config(tiny, tmp_path / f"plain{k}", f"max_steps={k}", *common))) for k in (1, 2, 3)]
    decay = 0.9
    ema = weights(train(config(tiny, tmp_path / "ema", "max_steps=3", f"diffusion.ema_decay={decay}", *common)))
    for name, shadow in steps[0].items():
        expected = shadow
        for k, w in enumerate(steps[1:], start=2):
            d = min(decay, k / (9 + k))
            expected = d * expected + (1 - d) * w[name]
        torch.testing.assert_close(ema[name], expected, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(ema[n], steps[-1][n]) for n in ema)
