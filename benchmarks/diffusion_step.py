"""Training steps per second on diffusion: mmpref's cached Diffusion-DPO step vs the diffusers example's.

docs/design.md §15: one process, the contenders alternating in rounds (each round: ``--warmup`` untimed steps,
then ``--steps`` timed ones), the same model, data and LoRA for all. The headline uses the real SD 1.5
architecture (the published ``unet`` / ``vae`` / ``text_encoder`` configs of stable-diffusion-v1-5,
written inline below, random weights, nothing downloaded) at 512 px, LoRA (rank 4, on ``to_q, to_k,
to_v, to_out.0``, as the diffusers example) on the UNet, a batch of one pair, fp32.
``--tiny`` runs the same code on :func:`mmpref.tiny_models.make_tiny_sd15` at 64 px (a smoke run: a
ratio from tiny configs does not count, docs/design.md §15).

Contenders (all train the one LoRA UNet, each with its own AdamW over the adapters):

1. ``mmpref``: mmpref's own objects: ``DiffusionTask`` (``build_task`` runs its stages, which build the latent
   and text embedding cache, ``cache_latents: ahead``, untimed), ``task.collate_train``, ``task.rows`` (one policy
   forward over [w; l], one reference forward with the adapters off, ``task.reference``), the run's
   ``Objective``, backward, gradient clipping,
   AdamW, LR scheduler: the body of ``mmpref.training.loop.train`` (see :func:`mmpref_runner`).
2. ``diffusers-example``: a re-creation of the step of diffusers'
   ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``: VAE encode of both images
   (``latent_dist.sample()``), text encode of the caption, policy UNet forward over 2B, reference
   forward with ``disable_adapters()``, the same sigmoid loss, clipping, AdamW. Its pixels and token
   ids are prepared once, untimed (the example does that in its data loader; leaving it out only
   flatters the example).
3. ``floor``: policy forward/backward over 2B plus the no-grad reference forward on fixed latents and
   text embeddings, and the AdamW step on the adapters: the work no cached implementation can skip.

Peak memory (``--memory``, default on): in a fresh subprocess each, a LoRA step whose reference is
the same UNet with adapters disabled vs. one whose reference is a full frozen copy of the UNet;
peak RSS on CPU (``resource.getrusage``), ``torch.cuda.max_memory_allocated`` on a GPU.

    python benchmarks/diffusion_step.py            # SD 1.5 at 512 px: tens of seconds a step on 2 CPU cores
    python benchmarks/diffusion_step.py --tiny     # tiny models at 64 px, seconds
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

CONTENDERS = ("mmpref", "diffusers-example", "floor")
BETA = 5000.0  # mmpref's β; the example's beta_dpo is β/2 (mmpref.adapters.diffusion)
LEARNING_RATE = 1e-8
LORA_RANK = 4
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
CAPTION = "a red circle on a blue background"

# The published stable-diffusion-v1-5 configs (unet/, vae/, text_encoder/ config.json), random weights.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    act_fn="silu", norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)  # fmt: skip
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
)  # fmt: skip
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, steps_offset=1, prediction_type="epsilon")  # fmt: skip

Runner = Callable[[int, int], list[float]]  # (warmup, steps) -> seconds of each timed step


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_sd15_folder(folder: Path, seed: int) -> None:
    """A StableDiffusionPipeline folder with SD 1.5's architecture and random weights.

    The tokenizer is mmpref's tiny CLIP BPE (ids < 1000, padded to 77 as SD's): only the encoder's cost
    matters here, and that is set by the 77 positions and the 12 layers, not by the vocabulary.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmpref.tiny_models import _seeded, _write_clip_tokenizer

    tokenizer = _write_clip_tokenizer(folder / "tokenizer")
    text_cfg = CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    modules = _seeded(seed, lambda: dict(unet=UNet2DConditionModel(**SD15_UNET), vae=AutoencoderKL(**SD15_VAE),
                                         text_encoder=CLIPTextModel(text_cfg)))  # fmt: skip
    pipe = StableDiffusionPipeline(**modules, tokenizer=tokenizer, scheduler=DDPMScheduler(**SD15_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(folder)


def write_pairs(folder: Path, n: int, size: int, seed: int) -> Path:
    """``n`` pairs of the bundled style task drawn at ``size`` px, Pick-a-Pic rows."""
    from mmpref.data.image_task import make_image_style_task

    train, _ = make_image_style_task(folder, n_train=n, n_eval=1, size=size, seed=seed)
    return train


def time_loop(step: Callable[[], None], warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    stamps = [time.perf_counter()]
    for _ in range(steps):
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


# ------------------------------------------------------------------------------------------ mmpref


def make_task(model_dir: Path, data_file: Path, out_dir: Path, resolution: int, steps: int, seed: int,
              lora: bool = True):  # fmt: skip
    from accelerate import Accelerator

    from mmpref.training import load_config
    from mmpref.training.build import build_task

    overrides = [f"model={model_dir}", f"dataset={data_file}", f"output_dir={out_dir}", "report_to=none",
                 f"diffusion.resolution={resolution}", f"loss.beta={BETA}", "batch_size=1", "eval_batch_size=1",
                 f"learning_rate={LEARNING_RATE}", f"max_steps={steps}", f"seed={seed}", "max_grad_norm=1.0",
                 "diffusion.prompt_dropout=0.0", "diffusion.cache_latents=ahead"]  # fmt: skip
    if lora:
        overrides += [f"lora.r={LORA_RANK}", f"lora.alpha={LORA_RANK}"]  # on to_q, to_k, to_v, to_out.0
    cfg = load_config(None, overrides)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    return cfg, accelerator, build_task(cfg, accelerator)


def mmpref_runner(cfg, accelerator, task) -> Runner:
    """The body of ``mmpref.training.loop.train`` for one micro-batch per step, without its logging,
    evaluation and checkpoint branches (off in this configuration)."""
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    from mmpref.losses import Objective
    from mmpref.training.loop import build_optimizer

    objective = Objective.from_config(cfg.loss, cfg.rpo)  # built once, as the run's plan does
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=10**6)
    model, optimizer = accelerator.prepare(model, optimizer)
    n = len(task.train)

    def batches():
        while True:
            order = torch.randperm(n).tolist()
            loader = DataLoader(
                order, batch_size=cfg.batch_size, collate_fn=task.collate_train, drop_last=True
            )
            yield from accelerator.prepare_data_loader(loader)

    it = batches()

    def step() -> None:
        batch = next(it)
        with accelerator.autocast():
            rows = task.rows(model, batch)
            out = objective(rows)
        if not torch.isfinite(out.loss):
            raise FloatingPointError("non-finite loss")
        accelerator.backward(out.loss)
        {k: float(v) for k, v in {"loss": out.loss.detach(), **out.metrics}.items()}  # the loop's metric sums
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return lambda warmup, steps: time_loop(step, warmup, steps)


# ----------------------------------------------------------------------------------- the example


def example_runner(model_dir: Path, unet, task, resolution: int) -> Runner:
    """The diffusers Diffusion-DPO example's step (train_diffusion_dpo.py, LoRA, SD 1.5)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from mmpref.data.image_inputs import pair_pixels

    dev = device()
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").requires_grad_(False).to(dev)
    text_encoder = (
        CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").requires_grad_(False).to(dev)
    )
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    # what its data loader yields: (B, 6, H, W) pixels, chosen then rejected on channels, and input ids
    data = []
    for pair in task.train.data.pairs:
        pp = pair_pixels(pair, resolution).pixels  # (2, 3, R, R): chosen, rejected
        ids = tokenizer(pair.caption, max_length=tokenizer.model_max_length, padding="max_length",
                        truncation=True, return_tensors="pt").input_ids  # fmt: skip
        data.append((pp.reshape(1, 6, resolution, resolution), ids))
    k = [0]
    beta_dpo = BETA / 2

    def step() -> None:
        pixel_values, input_ids = data[k[0] % len(data)]
        k[0] += 1
        feed_pixel_values = torch.cat(pixel_values.to(dev).chunk(2, dim=1))
        with torch.no_grad():  # the example's vae has requires_grad False; no graph is kept either way
            latents = vae.encode(feed_pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        bsz = latents.shape[0] // 2
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=dev).repeat(2)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.no_grad():
            ehs = text_encoder(input_ids.to(dev), return_dict=False)[0].repeat(2, 1, 1)
        model_pred = unet(noisy, timesteps, ehs).sample
        target = noise
        model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        model_losses_w, model_losses_l = model_losses.chunk(2)
        model_diff = model_losses_w - model_losses_l
        unet.disable_adapters()
        with torch.no_grad():
            ref_preds = unet(noisy, timesteps, ehs).sample.detach()
            ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
            ref_losses_w, ref_losses_l = ref_loss.chunk(2)
            ref_diff = ref_losses_w - ref_losses_l
        unet.enable_adapters()
        logits = ref_diff - model_diff
        loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return lambda warmup, steps: time_loop(step, warmup, steps)


# ------------------------------------------------------------------------------------------- floor


def floor_runner(unet, task) -> Runner:
    """Policy forward/backward over [w; l] and the reference forward, on fixed cached tensors."""
    from functools import partial

    from mmpref.adapters.diffusion import diffusion_logratios

    batch = task.collate_train([0])
    latents = batch["latents"].to(device())
    ehs = batch["prompt_embeds"].to(device())
    reference = partial(task.reference.predict, unet)  # LoRA: the UNet with its adapters off, as the task calls it
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)

    def step() -> None:
        out = diffusion_logratios(unet, reference, latents[:, 0], latents[:, 1], ehs, task.scheduler)
        loss = -F.logsigmoid(BETA * (out.logratios[:, 0] - out.logratios[:, 1])).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return lambda warmup, steps: time_loop(step, warmup, steps)


# ------------------------------------------------------------------------------------------ memory


def peak_memory_child(model_dir: str, latent_size: int, reference_kind: str, steps: int) -> None:
    """One LoRA training step (``steps`` of them) with the given reference; prints peak memory as JSON."""
    from functools import partial

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from mmpref.adapters.diffusion import diffusion_logratios
    from mmpref.training.reference import AdaptersOff, FrozenCopy

    dev = device()
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to(dev)
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    ref = FrozenCopy(unet) if reference_kind == "copy" else AdaptersOff()  # a copy: before the adapters
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))  # fmt: skip
    reference = partial(ref.predict, unet)  # as DiffusionTask.rows calls its reference
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 1, 4, latent_size, latent_size, generator=g).to(dev)
    ehs = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(dev)
    loaded = _peak_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        out = diffusion_logratios(unet, reference, lat[0], lat[1], ehs, scheduler)
        (-F.logsigmoid(BETA * (out.logratios[:, 0] - out.logratios[:, 1])).mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"reference": reference_kind, "peak_after_load": loaded, "peak": _peak_bytes()}))


def _peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure_memory(model_dir: Path, latent_size: int, threads: int | None) -> dict[str, dict]:
    results = {}
    for kind in ("adapters-disabled", "copy"):
        cmd = [sys.executable, __file__, "--memory-child", str(model_dir), str(latent_size), kind]
        if threads:
            cmd += ["--threads", str(threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[kind] = json.loads(out.strip().splitlines()[-1])
    return results


# -------------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny SD 1.5 at 64 px: a smoke run, not a result")
    p.add_argument("--rounds", type=int, default=2, help="0: measure peak memory only")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--pairs", type=int, default=4, help="pairs in the dataset (one per step)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-child", nargs=3, metavar=("MODEL", "LATENT", "KIND"), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    if args.memory_child:
        model, latent, kind = args.memory_child
        peak_memory_child(model, int(latent), kind, steps=1)
        return None
    torch.manual_seed(args.seed)
    resolution = 64 if args.tiny else 512
    total = args.rounds * (args.warmup + args.steps) + 1
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mmpref-diffbench-") as tmp:
        root = Path(tmp)
        model_dir = root / "model"
        t0 = time.perf_counter()
        if args.tiny:
            from mmpref.tiny_models import make_tiny_sd15

            make_tiny_sd15(model_dir, seed=args.seed)
        else:
            build_sd15_folder(model_dir, args.seed)
        data_file = write_pairs(root / "data", args.pairs, resolution, args.seed)
        gc.collect()
        print(f"model folder and data written in {time.perf_counter() - t0:.0f}s; building mmpref's cache ...",
              flush=True)  # fmt: skip
        t0 = time.perf_counter()
        cfg, accelerator, task = make_task(model_dir, data_file, root / "run", resolution, total, args.seed)
        print(f"DiffusionTask built (latents and text embeddings cached) in {time.perf_counter() - t0:.0f}s",
              flush=True)  # fmt: skip
        unet = task.unet
        runners: dict[str, Runner] = {
            "mmpref": mmpref_runner(cfg, accelerator, task),
            "diffusers-example": example_runner(model_dir, unet, task, resolution),
            "floor": floor_runner(unet, task),
        }
        times: dict[str, list[list[float]]] = {name: [] for name in CONTENDERS}
        for r in range(args.rounds):
            for name in CONTENDERS:
                gc.collect()
                times[name].append(runners[name](args.warmup, args.steps))
                rate = args.steps / sum(times[name][-1])
                print(f"round {r + 1}/{args.rounds}  {name:<18} {rate:8.4f} steps/s  "
                      f"({statistics.mean(times[name][-1]):.2f} s/step)", flush=True)  # fmt: skip
        del runners, task, unet
        gc.collect()
        memory = None
        if args.memory:
            latent = resolution // 8
            print("measuring peak memory in fresh subprocesses ...", flush=True)
            memory = measure_memory(model_dir, latent, args.threads)

    result = report(times, memory, args, resolution, load_start)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return result


def report(times, memory, args, resolution, load_start) -> dict:
    if args.rounds == 0:  # `--rounds 0`: peak memory only
        times = {name: [[math.nan]] for name in CONTENDERS}
    per_round = {name: [len(t) / sum(t) for t in ts] for name, ts in times.items()}
    best = {name: max(r) for name, r in per_round.items()}
    median = {name: statistics.median([s for t in ts for s in t]) for name, ts in times.items()}
    dev = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"\n== diffusion step, {'TINY SD 1.5 (smoke run only)' if args.tiny else 'SD 1.5 architecture'}, "
          f"{resolution} px, LoRA r={LORA_RANK}, 1 pair/step, fp32, {dev}, torch {torch.__version__}")  # fmt: skip
    print(f"{'contender':<18} {'steps/s (best round)':>21} {'median s/step':>14}")
    for name in CONTENDERS:
        print(f"{name:<18} {best[name]:21.4f} {median[name]:14.2f}")
    ratios = {
        "mmpref / diffusers-example": best["mmpref"] / best["diffusers-example"],
        "mmpref / floor": best["mmpref"] / best["floor"],
        "diffusers-example / floor": best["diffusers-example"] / best["floor"],
    }
    for k, v in ratios.items():
        print(f"{k:<28} {v:6.3f}x")
    if memory:
        unit = "GPU max_memory_allocated" if torch.cuda.is_available() else "peak RSS"
        print(f"\npeak memory of a LoRA step ({unit}, fresh process each):")
        for kind, m in memory.items():
            print(
                f"  reference = {kind:<18} {m['peak'] / 2**30:7.2f} GiB  (after loading: {m['peak_after_load'] / 2**30:.2f} GiB)"
            )
        saved = memory["copy"]["peak"] - memory["adapters-disabled"]["peak"]
        print(f"  adapters-disabled saves {saved / 2**30:.2f} GiB")
    load_end = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    print(f"\nload average (1 min): {load_start:.2f} at start, {load_end:.2f} at end, {cores} cores")
    if load_start > cores - torch.get_num_threads() + 0.5 or load_end > cores + 0.5:
        print("WARNING: other processes were using the CPU; timings are inflated and noisy.")
    return {"per_round_steps_per_s": per_round, "median_s_per_step": median, "ratios": ratios, "memory": memory,
            "resolution": resolution, "tiny": args.tiny, "device": dev}  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
