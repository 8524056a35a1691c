"""Host memory and time to the first step on Pick-a-Pic-sized image preference data; epoch-2 speed.

The goal measured: Diffusion-DPO on a dataset the size of Pick-a-Pic v2 (959,000 pairs, ~335 GB of JPEG
bytes) with host memory that does not grow with the dataset and a first step within seconds.

**Data.** Pick-a-Pic-shaped Parquet files of ``--pairs`` pairs (default 1,000, 10,000 and 50,000): columns
``caption`` (a distinct string per row), ``jpg_0`` and ``jpg_1`` (JPEG bytes, 512x512, ~58 KB each, about
Pick-a-Pic's mean) and ``label_0`` (1.0 or 0.0, float64 as in Pick-a-Pic), written with pyarrow in row groups
of 500 rows. The images come from a pool of a few hundred distinct noisy gradients; each pair takes two
different ones, and each stored image carries a JPEG comment naming its row and side, so every image's bytes
are unique and no cache keyed by content can share work between rows (decoding is unaffected). The files go
under ``--work`` (default /tmp/mmpref-image-bench) and are reused on a rerun; a tiny SD 1.5 pipeline
(:func:`mmpref.tiny_models.make_tiny_sd15`) is trained at ``--resolution`` (64 px: 8x8 latents).

**Contenders**, each in a fresh process, on the same tiny model, batch size, LoRA and fp32:

* ``mmpref lazy``: ``mmpref.training.train`` on ``configs/sd15/dpo.yaml`` with ``diffusion.cache_latents=lazy``
  (rows encoded when a batch first draws them);
* ``mmpref ahead``: the same with ``diffusion.cache_latents=ahead`` (every row encoded before step 1);
* ``diffusers path``: a re-creation of the data path and step of diffusers'
  ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``: ``load_dataset("parquet", ...)``,
  ``with_transform`` decoding both JPEGs of every row drawn (resize, center crop, random flip, normalize), a
  shuffled ``DataLoader``, VAE encode (``latent_dist.sample()``) and text encode at every step, then the DPO
  step (policy forward/backward over [w; l], reference forward with the adapters disabled, sigmoid loss,
  clipping, AdamW).

Both sides train LoRA (rank 4 on ``to_q, to_k, to_v, to_out.0``, as the diffusers example, which trains LoRA
only), so one step does the same UNet work; overrides on mmpref's side: no evaluation, no samples, no
reporting, ``mixed_precision=no``, ``gradient_checkpointing=false``, ``gradient_accumulation_steps=1``.

**What is measured.** Per contender and size: the peak anonymous memory (``RssAnon`` of /proc/self/status,
sampled every 20 ms by a thread of the process from its start to the end of step 1: heap and tensors, not
the page cache of memory-mapped files) and the wall time from the process's launch to the end of step 1.
Fitted over the sizes (least squares): the memory slope in KiB per pair and its extrapolation to 959,000
pairs. Before the contenders of a size run, each library makes its one-time copy of the Parquet file (mmpref:
``mmpref.data.sources.open_rows``; datasets: ``load_dataset``), in a process of its own, timed and reported
apart, so "time to step 1" is that of a rerun on the prepared data. Every other cache (mmpref's latents, the
run folder) is removed before each contender, so every run encodes from scratch. At the smallest size (or
``--speed-pairs``) each contender also trains 2 epochs; the steps/s of epoch 2, from ``on_step_end`` time
stamps, shows whether a lazily filled cache reaches the speed of one built ahead ("fully cached").

Targets printed beside the figures: memory slope <= 2 KiB/pair; time to step 1 within 2x of the diffusers
path at every size and not growing with the pairs; epoch-2 speed of ``lazy`` equal (within 5%) to the fully
cached speed. All figures go to ``--work/results/image_data-<time>.json``.

Other processes on the CPU slow the tiny model's multi-threaded steps several times over: on a busy machine
use ``--threads 1`` and ``--repeats 3`` (least disturbed time, highest peak). ``--legacy-cache-values`` runs a
library whose ``diffusion.cache_latents`` is still a bool (lazy -> false, ahead -> true).

Run from the repository root (the first run also writes the data: 5.5 GiB and ~30 s at 50,000 pairs):

    .venv/bin/python benchmarks/image_data.py                        # 1k, 10k, 50k pairs
    .venv/bin/python benchmarks/image_data.py --quick                # 200 and 1,000 pairs: a smoke run, minutes
    .venv/bin/python benchmarks/image_data.py --pairs 1000 10000 --repeats 3 --threads 1 --work /data/bench
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sd15" / "dpo.yaml"
PICKAPIC_PAIRS = 959_000
CONTENDERS = ("mmpref lazy", "mmpref ahead", "diffusers path")
LEGACY_CACHE = {"lazy": "false", "ahead": "true"}  # diffusion.cache_latents while it was a bool
LORA_RANK = 4
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LEARNING_RATE = 1.68e-5  # configs/sd15/dpo.yaml's; the speed does not depend on it
BETA = 5000.0  # mmpref's β; the diffusers example's beta_dpo is β/2
VAE_ENCODE_BATCH = 8  # the diffusers example's --vae_encode_batch_size default
ROW_GROUP = 500  # rows per Parquet row group (~58 MB): generation memory stays bounded
POOL_SIZE = 256
IMAGE_SIDE = 512
SAMPLE_EVERY_S = 0.02
RESULT = "RESULT "  # a child's last stdout line: RESULT {json}

TARGET_SLOPE_KIB = 2.0
TARGET_TIME_RATIO = 2.0
TARGET_SPEED_RATIO = 0.95

# ------------------------------------------------------------------------------------------ memory


class RssAnonSampler:
    """The peak RssAnon of this process, read from /proc/self/status every ``interval`` seconds by a thread.

    RssAnon counts the process's anonymous pages (heap, tensors, Python objects); pages of memory-mapped files
    (Arrow tables, safetensors) are RssFile and belong to the page cache, which the kernel can reclaim.
    """

    def __init__(self, interval: float = SAMPLE_EVERY_S):
        self.interval, self.peak_kib = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read_kib() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, self.read_kib())
            self._stop.wait(self.interval)

    def start(self) -> RssAnonSampler:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop sampling; the peak in KiB, this last reading included."""
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self.read_kib())
        return self.peak_kib


def _mib(kib: float) -> float:
    return round(kib / 1024, 1)


# -------------------------------------------------------------------------------------------- data

WORDS = {
    "adj": "red blue golden tiny giant ancient futuristic misty neon quiet wooden glass floating broken".split(),
    "noun": "cat robot castle forest lighthouse dragon city teapot astronaut garden whale library fox".split(),
    "verb": "sleeping glowing melting dancing hiding waiting flying reading drifting burning".split(),
    "place": "on the moon|under the sea|in a snowstorm|at sunset|in a cathedral|on mars|in a jar".split("|"),
    "style": "oil painting|8k photo|watercolor|pixel art|studio ghibli style|concept art|line drawing".split("|"),
}


def image_pool(size: int = POOL_SIZE, seed: int = 0) -> list[bytes]:
    """Distinct 512x512 JPEGs of ~58 KB: a colour gradient, smooth blobs and grain (the grain sets the size)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMAGE_SIDE, 0:IMAGE_SIDE] / IMAGE_SIDE
    pool = []
    for _ in range(size):
        c = rng.uniform(0, 170, (3, 3))
        base = np.stack([c[k, 0] * x + c[k, 1] * y + c[k, 2] * (1 - x) for k in range(3)], axis=-1)
        blobs = Image.fromarray(np.clip(rng.normal(128, 40, (16, 16, 3)), 0, 255).astype(np.uint8))
        smooth = np.asarray(blobs.resize((IMAGE_SIDE, IMAGE_SIDE), Image.BICUBIC), dtype=np.float32) - 128
        grain = rng.normal(0, rng.uniform(7.5, 10.0), (IMAGE_SIDE, IMAGE_SIDE, 3))  # q85: ~58 KB on average
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + smooth + grain, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
        pool.append(buf.getvalue())
    return pool


def unique_jpeg(jpeg: bytes, tag: str) -> bytes:
    """``jpeg`` with a comment segment (COM) after its start marker: other bytes, the same pixels."""
    text = tag.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def write_pairs(path: Path, n: int, pool: list[bytes], seed: int = 0) -> None:
    """``n`` Pick-a-Pic-shaped rows, a row group at a time, into ``path`` (renamed into place when complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64())])  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    # JPEG bytes do not compress: only the captions are worth snappy's time
    compression = {"caption": "snappy", "jpg_0": "none", "jpg_1": "none", "label_0": "snappy"}
    with pq.ParquetWriter(tmp, schema, compression=compression) as writer:
        for start in range(0, n, ROW_GROUP):
            rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
            for i in range(start, min(n, start + ROW_GROUP)):
                w = {k: rng.choice(v) for k, v in WORDS.items()}
                rows["caption"].append(f"a {w['adj']} {w['noun']} {w['verb']} {w['place']}, {w['style']}, #{i}")
                a = rng.randrange(len(pool))
                b = (a + 1 + rng.randrange(len(pool) - 1)) % len(pool)  # never the same image twice
                rows["jpg_0"].append(unique_jpeg(pool[a], f"row {i} jpg_0"))
                rows["jpg_1"].append(unique_jpeg(pool[b], f"row {i} jpg_1"))
                rows["label_0"].append(float(rng.random() < 0.5))
            writer.write_table(pa.Table.from_pydict(rows, schema=schema))
    os.replace(tmp, path)


def ensure_data(work: Path, n: int, pool: list[bytes] | None) -> tuple[Path, dict[str, Any], list[bytes] | None]:
    """The Parquet file of ``n`` pairs (written if missing), facts about it, and the image pool (made on need)."""
    path = work / "data" / f"pairs-{n}" / "train.parquet"
    info: dict[str, Any] = {"path": str(path)}
    if not path.is_file():
        if pool is None:
            t = time.perf_counter()
            pool = image_pool()
            print(f"image pool: {len(pool)} JPEGs, mean {sum(map(len, pool)) / len(pool) / 1024:.1f} KiB, "
                  f"{time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
        t = time.perf_counter()
        write_pairs(path, n, pool)
        info["written_s"] = round(time.perf_counter() - t, 1)
        print(f"wrote {path} ({n:,} pairs) in {info['written_s']} s", flush=True)
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    if meta.num_rows != n:
        raise SystemExit(f"{path} holds {meta.num_rows} rows, not {n}: delete it to have it written again")
    info.update(file_gib=round(path.stat().st_size / 2**30, 2), row_groups=meta.num_row_groups)
    return path, info, pool


def ensure_model(work: Path) -> Path:
    folder = work / "tiny-sd15"
    if not (folder / "model_index.json").is_file():
        from mmpref.tiny_models import make_tiny_sd15

        make_tiny_sd15(folder, seed=0)
    return folder


# ---------------------------------------------------------------------------------- caches on disk


def derived_dirs(work: Path, data: Path) -> list[Path]:
    """Where runs leave caches derived from the data: mmpref's folder beside the file, its hash memo, the
    ``datasets`` caches (the diffusers path's copy, mmpref's shared folder)."""
    n = data.parent.name
    return [data.parent / ".mmpref_cache", work / "mmpref-cache", work / "hf-home", work / "hf-datasets" / n]


def snapshot(dirs: list[Path]) -> set[Path]:
    return {p for d in dirs if d.exists() for p in d.rglob("*")}


def restore(dirs: list[Path], keep: set[Path]) -> None:
    """Remove whatever appeared under ``dirs`` since ``keep`` was taken (e.g. a latent cache)."""
    for d in dirs:
        if not d.exists():
            continue
        for p in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if p in keep:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def wipe(dirs: list[Path]) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------- children


def child_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HOME=str(work / "hf-home"), MMPREF_CACHE=str(work / "mmpref-cache"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    return env


def run_child(spec: dict[str, Any], work: Path, tag: str, timeout: float | None) -> dict[str, Any]:
    """``spec`` in a fresh process (this file, ``--child``); its RESULT line, or the error and the log's tail."""
    log = work / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "t0": time.time()}  # the launch: "time to step 1" counts interpreter start and imports
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    with open(log, "w") as err:
        try:
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=child_env(work),
                                  cwd=work, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s; log: {log}"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"exit code {done.returncode}; log: {log}: " + " | ".join(tail)}
    return {**json.loads(lines[-1][len(RESULT) :]), "process_s": round(time.time() - spec["t0"], 1)}


def combine(tries: list[dict[str, Any]], speed: bool = False) -> dict[str, Any]:
    """One figure from repeated runs: the least disturbed time (other processes only ever add to it), or the
    fastest epoch 2, and the highest memory peak; every try is kept in ``tries``."""
    good = [t for t in tries if "error" not in t and (not speed or "epoch2_steps_per_s" in t)]
    if len(tries) == 1 or not good:
        return tries[-1]
    if speed:
        best = max(good, key=lambda t: t["epoch2_steps_per_s"])
    else:
        best = min(good, key=lambda t: t["time_to_step1_s"])
    return {**best, "peak_rss_anon_mib": max(t["peak_rss_anon_mib"] for t in good), "tries": tries}


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()


class StepClock:
    """Time stamps of every optimizer step; at step 1 the peak memory and the time since the launch."""

    def __init__(self, sampler: RssAnonSampler, t0: float):
        self.sampler, self.t0 = sampler, t0
        self.stamps: list[float] = []
        self.result: dict[str, Any] = {}

    def step_done(self) -> None:
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:
            self.result.update(time_to_step1_s=round(time.time() - self.t0, 2),
                               rss_anon_step1_mib=_mib(RssAnonSampler.read_kib()),
                               peak_rss_anon_mib=_mib(self.sampler.stop()))  # fmt: skip

    def speeds(self, per_epoch: int) -> dict[str, Any]:
        """steps/s of epoch 1 (without its first step) and of epoch 2, when the run got that far."""
        s, out = self.stamps, {"steps": len(self.stamps), "steps_per_epoch": per_epoch}
        if len(s) >= per_epoch > 1:
            out["epoch1_steps_per_s"] = round((per_epoch - 1) / (s[per_epoch - 1] - s[0]), 3)
        if len(s) >= 2 * per_epoch:
            out["epoch2_steps_per_s"] = round(per_epoch / (s[2 * per_epoch - 1] - s[per_epoch - 1]), 3)
        return out


def child_mmpref(spec: dict[str, Any], clock: StepClock) -> dict[str, Any]:
    from mmpref.training import Callback, ConfigError, load_config, train

    _quiet()
    overrides = [
        f"model={spec['model']}", f"dataset={spec['data']}", "eval_dataset=", "eval_split=0",
        f"output_dir={spec['out']}", f"diffusion.resolution={spec['resolution']}",
        f"diffusion.cache_latents={spec['cache']}", "mixed_precision=no", "gradient_checkpointing=false",
        "samples.prompts=[]", "report_to=none", f"batch_size={spec['batch_size']}", "gradient_accumulation_steps=1",
        f"lora.r={LORA_RANK}", f"lora.alpha={LORA_RANK}", f"learning_rate={LEARNING_RATE}", "lr_scheduler=constant",
        "warmup_steps=0", "eval_every=0", "save_every=0", "log_every=1000000", f"loss.beta={BETA}",
    ]  # fmt: skip
    overrides += [f"max_steps={spec['max_steps']}"] if spec.get("max_steps") else ["max_steps=", "num_epochs=2"]
    try:
        cfg = load_config(CONFIG, overrides)
    except ConfigError as exc:
        raise SystemExit(f"{exc} (a library whose cache_latents is still a bool: add --legacy-cache-values)") from exc

    class Clock(Callback):
        def on_step_end(self, step: int, model) -> None:
            clock.step_done()

    train(cfg, callbacks=[Clock()])
    return clock.speeds(spec["pairs"] // spec["batch_size"])


def child_diffusers(spec: dict[str, Any], clock: StepClock) -> dict[str, Any]:
    """The data path and DPO step of diffusers' train_diffusion_dpo.py (LoRA, SD 1.5), on the tiny model."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from datasets import load_dataset
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from torchvision import transforms
    from transformers import AutoTokenizer, CLIPTextModel, get_scheduler

    _quiet()
    model, resolution = spec["model"], spec["resolution"]
    accelerator = Accelerator(mixed_precision="no")
    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer", use_fast=False)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for m in (vae, text_encoder, unet):
        m.requires_grad_(False).to(accelerator.device)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))  # fmt: skip
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    train_dataset = load_dataset("parquet", data_files={"train": spec["data"]}, split="train",
                                 cache_dir=spec["hf_cache"])  # fmt: skip
    train_transforms = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),  # the example's default (--random_crop off)
        transforms.RandomHorizontalFlip(),  # the example's default (--no_hflip off)
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])  # fmt: skip

    def preprocess_train(examples: dict[str, list]) -> dict[str, list]:
        columns = []
        for name in ("jpg_0", "jpg_1"):
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in examples[name]]
            columns.append([train_transforms(im) for im in images])
        combined = []
        for pair, label_0 in zip(zip(*columns), examples["label_0"]):
            combined.append(torch.cat(pair[::-1] if label_0 == 0 else pair, dim=0))  # chosen first, on channels
        examples["pixel_values"] = combined
        examples["input_ids"] = tokenizer(examples["caption"], max_length=tokenizer.model_max_length,
                                          padding="max_length", truncation=True, return_tensors="pt").input_ids  # fmt: skip
        return examples

    train_dataset = train_dataset.with_transform(preprocess_train)

    def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([e["pixel_values"] for e in examples]).to(memory_format=torch.contiguous_format)
        return {"pixel_values": pixel_values.float(), "input_ids": torch.stack([e["input_ids"] for e in examples])}

    loader = torch.utils.data.DataLoader(train_dataset, batch_size=spec["batch_size"], shuffle=True,
                                         collate_fn=collate_fn, num_workers=0)  # fmt: skip
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    per_epoch, max_steps = len(loader), spec.get("max_steps") or 2 * len(loader)
    beta_dpo = BETA / 2
    unet.train()
    step = 0
    while step < max_steps:
        for batch in loader:
            feed = torch.cat(batch["pixel_values"].chunk(2, dim=1))  # (2B, 3, R, R): chosen block, rejected block
            latents = torch.cat([vae.encode(feed[i : i + VAE_ENCODE_BATCH]).latent_dist.sample()
                                 for i in range(0, feed.shape[0], VAE_ENCODE_BATCH)])  # fmt: skip
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
            bsz = latents.shape[0] // 2
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                      device=latents.device).repeat(2)  # fmt: skip
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            with torch.no_grad():
                ehs = text_encoder(batch["input_ids"].to(accelerator.device))[0].repeat(2, 1, 1)
            pred = unet(noisy, timesteps, ehs).sample
            model_losses = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
            model_w, model_l = model_losses.chunk(2)
            accelerator.unwrap_model(unet).disable_adapters()
            with torch.no_grad():
                ref = unet(noisy, timesteps, ehs).sample.detach()
                ref_losses = F.mse_loss(ref.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
                ref_w, ref_l = ref_losses.chunk(2)
            accelerator.unwrap_model(unet).enable_adapters()
            loss = -F.logsigmoid(beta_dpo * ((ref_w - ref_l) - (model_w - model_l))).mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            loss.item()  # the example logs it every step
            step += 1
            clock.step_done()
            if step >= max_steps:
                break
    return clock.speeds(per_epoch)


def child_copy(spec: dict[str, Any], sampler: RssAnonSampler) -> dict[str, Any]:
    """One library's one-time copy of the Parquet file (the Arrow copy later runs read)."""
    start = time.perf_counter()
    if spec["kind"] == "copy-mmpref":
        from mmpref.data.sources import open_rows

        rows = open_rows(spec["data"]).dataset.num_rows
    else:
        from datasets import load_dataset

        rows = load_dataset("parquet", data_files={"train": spec["data"]}, split="train",
                            cache_dir=spec["hf_cache"]).num_rows  # fmt: skip
    return {"rows": rows, "seconds": round(time.perf_counter() - start, 1), "peak_rss_anon_mib": _mib(sampler.stop())}


def child_main(spec: dict[str, Any]) -> None:
    sampler = RssAnonSampler().start()  # first: the imports count too
    result: dict[str, Any] = {"startup_s": round(time.time() - spec["t0"], 2)}
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    if spec["kind"].startswith("copy-"):
        result.update(child_copy(spec, sampler))
    else:
        clock = StepClock(sampler, spec["t0"])
        run = child_mmpref if spec["kind"] == "mmpref" else child_diffusers
        result.update(run(spec, clock))
        result.update(clock.result)
    print(RESULT + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ report


def fit(xs: list[float], ys: list[float], at: float) -> tuple[float, float]:
    """Least-squares slope of ``ys`` over ``xs``, and the line's value at ``at``. A slope below 0 is noise
    (nothing shrinks with more data): the value at ``at`` is then the measured mean, not a line going negative."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    return slope, my + max(slope, 0.0) * (at - mx)


def ok(flag: bool) -> str:
    return "ok" if flag else "MISSED"


def report(runs: list[dict], copies: dict[int, dict], speed: list[dict], label: dict[str, str],
           header: str) -> dict[str, Any]:  # fmt: skip
    print(f"\n== memory and time to step 1: {header}")
    print("| pairs | contender | peak RssAnon | RssAnon at step 1 | time to step 1 | vs diffusers path |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    base = {r["pairs"]: r for r in runs if r["contender"] == "diffusers path" and "error" not in r}
    for r in runs:
        name = label[r["contender"]]
        if "error" in r:
            print(f"| {r['pairs']:,} | {name} | failed: {r['error'][:200]} | | | |")
            continue
        d = base.get(r["pairs"])
        ratio = f"{r['time_to_step1_s'] / d['time_to_step1_s']:.2f}x" if d else "n/a"
        print(f"| {r['pairs']:,} | {name} | {r['peak_rss_anon_mib']:,.0f} MiB | {r['rss_anon_step1_mib']:,.0f} MiB "
              f"| {r['time_to_step1_s']:.1f} s | {ratio} |")  # fmt: skip

    fits: dict[str, dict] = {}
    print(f"\n== growth with the pairs, fitted over the sizes; extrapolated to Pick-a-Pic v2 ({PICKAPIC_PAIRS:,} pairs)")
    print("| contender | memory slope | peak RssAnon at 959k | time slope | time to step 1 at 959k | targets |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for c in label:
        good = sorted((r for r in runs if r["contender"] == c and "error" not in r), key=lambda r: r["pairs"])
        if len(good) < 2:
            continue
        xs = [float(r["pairs"]) for r in good]
        m_slope, m_at = fit(xs, [r["peak_rss_anon_mib"] * 1024 for r in good], PICKAPIC_PAIRS)  # KiB
        t_slope, t_at = fit(xs, [r["time_to_step1_s"] for r in good], PICKAPIC_PAIRS)
        f = {"memory_kib_per_pair": round(m_slope, 3), "peak_rss_anon_gib_at_959k": round(m_at / 2**20, 2),
             "time_s_per_100k_pairs": round(t_slope * 1e5, 2), "time_to_step1_s_at_959k": round(t_at, 1)}  # fmt: skip
        targets = [f"memory {ok(m_slope <= TARGET_SLOPE_KIB)}"]
        if c != "diffusers path":
            ratios = [r["time_to_step1_s"] / base[r["pairs"]]["time_to_step1_s"] for r in good if r["pairs"] in base]
            f["time_ratio_vs_diffusers"] = [round(x, 2) for x in ratios]
            first, last = good[0]["time_to_step1_s"], good[-1]["time_to_step1_s"]
            flat = last - first <= max(1.0, 0.2 * first)  # flat: within 20% (or 1 s) over the measured sizes
            f["time_flat"] = flat
            targets += [f"time {ok(max(ratios) <= TARGET_TIME_RATIO and flat) if ratios else 'n/a'}"]
        fits[c] = {**f, "targets": ", ".join(targets)}
        print(f"| {label[c]} | {m_slope:.2f} KiB/pair | {f['peak_rss_anon_gib_at_959k']:.1f} GiB "
              f"| {f['time_s_per_100k_pairs']:.1f} s / 100k pairs | {f['time_to_step1_s_at_959k']:,.0f} s | {fits[c]['targets']} |")  # fmt: skip
    print(f"targets: memory slope <= {TARGET_SLOPE_KIB:g} KiB/pair; time to step 1 <= {TARGET_TIME_RATIO:g}x the "
          "diffusers path at every size and flat (largest size within 20% or 1 s of the smallest)")  # fmt: skip

    print("\n== one-time copy of the Parquet file (each library's own Arrow copy, fresh process each; not in the above)")
    print("| pairs | Parquet | mmpref (open_rows) | datasets (load_dataset) |")
    print("| ---: | ---: | ---: | ---: |")
    for n, c in copies.items():
        cells = []
        for side in ("mmpref", "datasets"):
            r = c[side]
            cells.append(f"failed: {r['error'][:120]}" if "error" in r
                         else f"{r['seconds']:.1f} s, peak RssAnon {r['peak_rss_anon_mib']:,.0f} MiB")  # fmt: skip
        print(f"| {n:,} | {c['data']['file_gib']:.2f} GiB | {cells[0]} | {cells[1]} |")

    speed_out: dict[str, Any] = {}
    if speed:
        print("\n== steps/s over 2 epochs (epoch 1 without its first step)")
        print("| pairs | contender | epoch 1 | epoch 2 | epoch 2 vs fully cached |")
        print("| ---: | --- | ---: | ---: | ---: |")
        cached = next((r.get("epoch2_steps_per_s") for r in speed if r["contender"] == "mmpref ahead"), None)
        for r in speed:
            if "error" in r or "epoch2_steps_per_s" not in r:
                print(f"| {r['pairs']:,} | {label[r['contender']]} | failed: {r.get('error', 'no epoch 2')[:200]} | | |")
                continue
            ratio = r["epoch2_steps_per_s"] / cached if cached else float("nan")
            speed_out[r["contender"]] = {"epoch2_vs_fully_cached": round(ratio, 3)}
            print(f"| {r['pairs']:,} | {label[r['contender']]} | {r.get('epoch1_steps_per_s', float('nan')):.2f} "
                  f"| {r['epoch2_steps_per_s']:.2f} | {ratio:.2f}x |")  # fmt: skip
        lazy = speed_out.get("mmpref lazy", {}).get("epoch2_vs_fully_cached")
        if lazy is not None:
            speed_out["target"] = ok(lazy >= TARGET_SPEED_RATIO)
            print(f"target: mmpref lazy's epoch 2 at the fully cached speed (>= {TARGET_SPEED_RATIO:.2f}x): "
                  f"{speed_out['target']}")  # fmt: skip
    return {"fits": fits, "speed_ratios": speed_out}


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    p.add_argument("--quick", action="store_true", help="200 and 1,000 pairs, speed at 200: a smoke run")
    p.add_argument("--work", type=Path, default=Path("/tmp/mmpref-image-bench"),
                   help="data, model, caches, logs and results (never inside the repository)")  # fmt: skip
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS), metavar="NAME",
                   help=f"any of: {', '.join(repr(c) for c in CONTENDERS)}")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step, on every side")
    p.add_argument("--resolution", type=int, default=64, help="training resolution (the tiny SD 1.5 is 64 px)")
    p.add_argument("--steps", type=int, default=2, help="steps of a memory / time run (measured to step 1)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per contender and size: the least disturbed time (fastest epoch 2), the highest peak")  # fmt: skip
    p.add_argument("--speed-pairs", type=int, default=None, help="size of the 2-epoch runs (default: the smallest)")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the 2-epoch runs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in every child (default: torch's; 1 with --quick)")  # fmt: skip
    p.add_argument("--keep-copies", action="store_true",
                   help="keep the Arrow copies after a size (default: removed, so every run measures them afresh)")  # fmt: skip
    p.add_argument("--data-only", action="store_true", help="write the data and the model folder, then stop")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed to each child process")
    p.add_argument("--legacy-cache-values", action="store_true",
                   help="for a library whose diffusion.cache_latents is a bool: lazy -> false (encode every step), "
                        "ahead -> true (whole cache before step 1)")  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.pairs = [200, 1_000]
        args.threads = args.threads or 1
    args.pairs = sorted(set(args.pairs))
    if any(n % args.batch_size or n < 2 * args.batch_size for n in [*args.pairs, args.speed_pairs or args.pairs[0]]):
        p.error("every --pairs / --speed-pairs size must be a multiple of --batch-size, and at least two batches")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return
    work = args.work.expanduser().resolve()
    if work == REPO or REPO in work.parents:
        raise SystemExit(f"--work {work} is inside the repository; choose a folder outside it")
    work.mkdir(parents=True, exist_ok=True)
    cache = {c: LEGACY_CACHE[c] if args.legacy_cache_values else c for c in ("lazy", "ahead")}
    label = {c: f"{c} (cache_latents={cache[c.split()[1]]})" if c.startswith("mmpref") else c
             for c in args.contenders}  # fmt: skip
    model = ensure_model(work)
    common = {"model": str(model), "resolution": args.resolution, "batch_size": args.batch_size, "threads": args.threads}

    def spec(contender: str, data: Path, n: int, out: Path, max_steps: int | None) -> dict[str, Any]:
        s = {**common, "data": str(data), "pairs": n, "out": str(out), "max_steps": max_steps,
             "hf_cache": str(work / "hf-datasets" / data.parent.name)}  # fmt: skip
        if contender == "diffusers path":
            return {**s, "kind": "diffusers"}
        return {**s, "kind": "mmpref", "cache": cache[contender.split()[1]]}

    speed_n = args.speed_pairs or args.pairs[0]
    sizes = sorted(set(args.pairs) | ({speed_n} if args.speed else set()))
    runs: list[dict] = []
    copies: dict[int, dict] = {}
    speed: list[dict] = []
    pool = None
    load_start = os.getloadavg()[0]
    if args.data_only:
        for n in sizes:
            pool = ensure_data(work, n, pool)[2]
        return
    for n in sizes:
        data, info, pool = ensure_data(work, n, pool)
        dirs = derived_dirs(work, data)
        wipe(dirs)  # every size starts from the Parquet file alone
        copies[n] = {"data": info}
        for side in ("mmpref", "datasets"):
            copy = {"kind": f"copy-{side}", "data": str(data), "hf_cache": str(work / "hf-datasets" / data.parent.name)}
            r = run_child(copy, work, f"{n}-copy-{side}", args.timeout)
            copies[n][side] = r
            print(f"{n:,} pairs  copy ({side}): {json.dumps(r)}", flush=True)
        prepared = snapshot(dirs)
        tasks = [(c, args.steps, runs) for c in args.contenders] if n in args.pairs else []
        tasks += [(c, None, speed) for c in args.contenders] if args.speed and n == speed_n else []
        for contender, steps, into in tasks:
            out = work / "runs" / contender.replace(" ", "-")
            tag = f"{n}-{contender.replace(' ', '-')}-{'steps' if steps else 'epochs'}"
            tries = []
            for k in range(args.repeats):
                restore(dirs, prepared)  # no latent cache survives from the previous contender or try
                shutil.rmtree(out, ignore_errors=True)
                tries.append(run_child(spec(contender, data, n, out, steps), work, f"{tag}-{k}", args.timeout))
            r = {"pairs": n, "contender": contender, **combine(tries, speed=steps is None)}
            into.append(r)
            print(f"{n:,} pairs  {label[contender]} ({'2 epochs' if steps is None else f'{steps} steps'}): "
                  f"{json.dumps({k: v for k, v in r.items() if k not in ('pairs', 'contender')})}", flush=True)  # fmt: skip
        restore(dirs, prepared)
        if not args.keep_copies:
            wipe(dirs)

    import torch

    threads = args.threads or torch.get_num_threads()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores, {threads} threads"
    header = (f"tiny SD 1.5 at {args.resolution} px, batch {args.batch_size} pairs, LoRA r={LORA_RANK}, fp32, {device}, "
              f"torch {torch.__version__}")  # fmt: skip
    summary = report(runs, {n: c for n, c in copies.items() if n in args.pairs}, speed, label, header)
    load_end = os.getloadavg()[0]
    print(f"\nload average (1 min): {load_start:.2f} at start, {load_end:.2f} at end, {os.cpu_count()} cores")
    if load_start > 0.5 * (os.cpu_count() or 1):
        print("WARNING: other processes were using the CPU at the start; times are inflated and noisy.")
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "child"},
              "setting": header, "cache_values": cache, "runs": runs, "copies": {str(k): v for k, v in copies.items()},
              "speed": speed, **summary, "load_average": [load_start, load_end]}  # fmt: skip
    path = work / "results" / f"image_data-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
