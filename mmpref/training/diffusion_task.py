"""Diffusion preference training (Diffusion-DPO, Diffusion-RPO) of SD 1.5 / SDXL UNets for the one loop.

:class:`DiffusionTask` is a :class:`~mmpref.training.task.Task`, the loop's contract: it owns the UNet,
the frozen VAE / text encoder(s) / reference, and the image data, and turns a batch into
:class:`~mmpref.training.objective.Rows` of ℓ (docs/design.md §1, §7; formulas in :mod:`mmpref.adapters.diffusion`).

Choices, all documented here because Diffusion-RPO has no public reference code:

* **β**: ℓ = −½(err_θ − err_ref), so ``loss.beta: 5000`` is the original Diffusion-DPO code's β
  (the diffusers example's ``beta_dpo: 2500`` folds the ½ in; it equals 5000 here).
* **Model kind**: SDXL when the folder has ``text_encoder_2`` or the UNet's ``addition_embed_type`` is
  ``text_time``; otherwise SD 1.5-style (one CLIP text encoder, last hidden state).
* **Reference**: a frozen copy of the UNet, or with ``lora:`` the same UNet with its adapters disabled
  (LoRA through diffusers' peft integration, ``unet.add_adapter``, on ``to_q, to_k, to_v, to_out.0``, the
  diffusion entry of ``LoraConfig.DEFAULT_TARGETS``, unless ``lora.target_modules`` names others).
  ``precompute_ref`` does not apply: the noise and timestep differ at every step, so the reference runs
  every step (one no-grad forward).
* **Cache** (``diffusion.cache_latents: true``, default): VAE latents (posterior *mean* × scaling factor,
  the same function the uncached path uses, so caching only adds float16 rounding) and text-encoder outputs,
  plus the empty caption's, are computed once per dataset and model into
  ``<dataset folder>/.mmpref_cache/latents-<hash>`` (see :mod:`mmpref.data.latent_cache`); training then
  never calls the VAE encoder or a text encoder. Uncached, both run every step (diffusers' example).
* **Prompt dropout**: per pair (both images), with probability ``diffusion.prompt_dropout``; cached or not,
  the draws are the same, and so are the batches.
* **Training randomness per row**: ``collate_train`` takes one number from torch's global RNG per batch
  (stored in checkpoints, so resume is exact) and derives from it and the dataset row one seed per pair,
  which draws the pair's prompt dropout, flip, ε and t. So a pair's draws do not depend on the process or
  batch slot it lands in, and N data-parallel processes compute the same losses and gradients as one
  process on the same global batch (tested with two gloo processes).
* **Noise**: evaluation uses fixed seeds per dataset row,
  so the eval metrics of different steps (and runs) see the same noise. One (ε, t) draw makes the eval
  accuracy of a small set noisy: ``diffusion.eval_noise_draws: K`` averages each pair's ℓ over K fixed
  draws (K forwards of policy and reference per eval batch), an estimate of the expectation over t and ε
  that Diffusion-DPO's objective is defined with.
* **Diffusion-RPO**: one CLIP embedding per image (``rpo.embedding``: text | image | image+text, the
  normalised mean of the two normalised embeddings by default), from open_clip (``rpo.clip_model``, a
  ``local-dir:`` folder or an architecture name with ``rpo.clip_weights``), computed once per dataset and
  cached beside it; they go into ``Rows.embeddings`` as (B, 2, D), so chosen image i is weighted against
  rejected image j by their own similarity.
* **Saving**: ``final/unet`` is a diffusers ``UNet2DConditionModel`` folder; with LoRA, ``final/`` holds
  ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(final)``.
* **EMA** (``diffusion.ema_decay`` > 0): diffusers' ``EMAModel`` over the trained parameters (the adapters
  with LoRA), stepped after each optimizer step, checkpointed; ``final/`` and the final evaluation use it.
* **Samples** (``samples.prompts``): at every evaluation, diffusers' pipeline generates the prompts with the
  policy (seed ``samples.seed + i`` for prompt i), once with the reference; images, grids and style scores
  go under ``output_dir/samples`` and into the metrics (:mod:`mmpref.training.sampling`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from mmpref.adapters.diffusion import (
    adapters_disabled,
    adapters_off,
    diffusion_logratios,
    encode_images,
    encode_prompt_sd15,
    encode_prompt_sdxl,
    frozen_reference,
    sdxl_time_ids,
    tokenize_captions,
)
from mmpref.data.images import ImagePair, clip_embeddings, pair_pixels, prepare_image_dataset
from mmpref.data.latent_cache import LatentCache
from mmpref.data.text import config_sources, held_out_split
from mmpref.hub import ModelSource, folder_fingerprint
from mmpref.losses import tie_accuracy
from mmpref.training.config import DTYPES, ConfigError, TrainConfig, model_source, score_checks
from mmpref.training.distributed import check_scale_out
from mmpref.training.objective import Rows
from mmpref.training.sampling import (
    generate,
    image_grid,
    load_pipeline,
    log_image,
    save_images,
    unet_swapped,
)
from mmpref.training.task import Task

logger = logging.getLogger(__name__)
MIXED = {"fp16": torch.float16, "bf16": torch.bfloat16}
CACHE_VERSION = 2  # 2: SDXL time ids hold the mirrored crop edge too
EVAL_SEED_STRIDE = 1_000_003
TRAIN_ROW_STRIDE = 1_000_003  # seed offset between rows of a training batch; +1 is a row's noise seed
EVAL_DRAW_STRIDE = 2**40  # seed offset of each further evaluation draw of a row (beyond any row seed)


class _ImageSplit:
    """One split: its pairs, cache and RPO embeddings."""

    def __init__(self, task: DiffusionTask, pairs: list[ImagePair], cache_dir: Path, name: str):
        self.task, self.pairs, self.cache_dir, self.name = task, pairs, cache_dir, name  # the dataset's
        self.cache: LatentCache | None = None
        self.labels = None  # image rows are always pairs (the loop balances unpaired text rows by these)
        self.embeddings: Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)


class DiffusionTask(Task):
    """Diffusion-DPO / Diffusion-RPO on a SD 1.5 or SDXL pipeline folder (module docstring)."""

    modality = "diffusion"
    unit = "images"  # what count_units counts, for the throughput report

    def __init__(self, cfg: TrainConfig, accelerator, source: ModelSource | None = None, train_dataset=None,
                 eval_dataset=None):  # fmt: skip
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        check_scale_out(cfg, accelerator, frozen_reference=cfg.lora is None, text=False)
        source = source or model_source(cfg)
        self.cfg, self.accelerator, self.source = cfg, accelerator, source
        index_file = source.file("model_index.json")
        index = json.loads(index_file.read_text()) if index_file else {}
        if not index.get("unet"):
            raise ConfigError(f"model: {cfg.model} is not a diffusers pipeline with a UNet (model_index.json, unet/)")
        dc = cfg.diffusion
        device = accelerator.device
        weight_dtype = MIXED.get(accelerator.mixed_precision, DTYPES[cfg.torch_dtype])

        def part(cls, subfolder: str, **kwargs):  # one component of the pipeline, hub id or folder alike
            return cls.from_pretrained(source.name, subfolder=subfolder, **source.kwargs, **kwargs)

        self.unet = part(UNet2DConditionModel, "unet", torch_dtype=DTYPES[cfg.torch_dtype])
        self.is_sdxl = bool(index.get("text_encoder_2")) or self.unet.config.addition_embed_type == "text_time"
        self.scheduler = part(DDPMScheduler, "scheduler")
        # fp32 VAE: the SDXL VAE overflows in fp16 (diffusers' scripts keep it fp32 too); cached, it is cheap
        self.vae = part(AutoencoderKL, "vae").requires_grad_(False).eval().to(device)
        self.tokenizers = [part(CLIPTokenizer, "tokenizer")]
        self.text_encoders = [part(CLIPTextModel, "text_encoder", torch_dtype=weight_dtype)]
        if self.is_sdxl:
            self.tokenizers.append(part(CLIPTokenizer, "tokenizer_2"))
            self.text_encoders.append(part(CLIPTextModelWithProjection, "text_encoder_2", torch_dtype=weight_dtype))
        for enc in self.text_encoders:
            enc.requires_grad_(False).eval().to(device)
        # the latent and text caches depend on the VAE and text encoders only, not on the UNet
        self._fingerprint = source.identity() if source.is_hub else folder_fingerprint(
            *(source.folder / sub for sub in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
        )  # fmt: skip

        if dc.attention == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError as e:
                raise ConfigError(
                    "diffusion.attention: xformers is not installed (pip install 'mmpref[xformers]'); "
                    "use diffusion.attention=sdpa (PyTorch's fused attention, the default)"
                ) from e
            self.unet.enable_xformers_memory_efficient_attention()

        # -- data
        load = {"on_bad_rows": cfg.on_bad_rows, "image_root": cfg.image_root,
                "confine_image_paths": cfg.confine_image_paths, **score_checks(cfg)}  # fmt: skip
        (train_data, options), evaluation = config_sources(cfg, train_dataset, eval_dataset)
        train = prepare_image_dataset(train_data, **options, **load)
        train_pairs, eval_pairs, eval_cache = train.pairs, [], train.cache_dir
        if evaluation is not None:  # eval data of its own, or a named split
            eval_data, options = evaluation
            evald = prepare_image_dataset(eval_data, **options, **load)
            eval_pairs, eval_cache = evald.pairs, evald.cache_dir
        elif cfg.eval_split:
            train_order, eval_order = held_out_split(len(train_pairs), cfg.eval_split, cfg.seed)
            eval_pairs = [train_pairs[i] for i in eval_order]
            train_pairs = [train_pairs[i] for i in train_order]
        self.train = _ImageSplit(self, train_pairs, train.cache_dir, "train")
        self.eval = _ImageSplit(self, eval_pairs, eval_cache, "eval") if eval_pairs else None
        for split in (self.train, self.eval):
            if split is None:
                continue
            if dc.cache_latents:
                split.cache = self._build_cache(split)
            if cfg.loss.type == "rpo" and cfg.rpo.mode != "diagonal":
                split.embeddings = clip_embeddings(
                    split.pairs, model=cfg.rpo.clip_model, weights=cfg.rpo.clip_weights, mode=cfg.rpo.embedding,
                    cache_dir=split.cache_dir, device=device,
                )  # fmt: skip
        if dc.cache_latents:  # training never encodes: free the encoders
            self.vae, self.text_encoders = None, []
        self._empty: dict[str, Tensor] | None = None

        # -- reference, memory savers, LoRA
        self.reference: nn.Module | None = None
        if cfg.lora is None:
            self.reference = frozen_reference(self.unet).to(device, weight_dtype)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if cfg.lora is not None:
            from peft import LoraConfig

            lc = cfg.lora
            self.unet.requires_grad_(False)
            self.unet.add_adapter(LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                             init_lora_weights="gaussian",
                                             target_modules=lc.targets(self.modality)))  # fmt: skip
            for p in self.unet.parameters():
                if p.requires_grad:  # train the adapters in fp32, as diffusers' cast_training_params does
                    p.data = p.data.float()
        self.model = self.unet
        # EMA of the trained weights (diffusers' EMAModel, as its training scripts use it): updated after every
        # optimizer step, checkpointed with the run, and copied into the model before the final evaluation
        # and save, so final/ holds the averaged weights. With LoRA only the adapters are averaged.
        self.ema = None
        if dc.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self._trainable(self.unet), decay=dc.ema_decay)
            self.ema.to(device)
        self._pipe = self._embedder = None  # built on first use by sample_and_score
        self._reference_images: list | None = None
        self._scorers: dict | None = None  # samples.scorers, loaded on first use
        self._reference_scores: dict[str, Tensor] | None = None  # of the reference images, scored once

    # -- encoding (cache build, or every step without cache) -----------------------------------------
    def _encode_text(self, captions: list[str]) -> dict[str, Tensor]:
        with torch.no_grad():
            ids = [tokenize_captions(tok, captions) for tok in self.tokenizers]
            if not self.is_sdxl:
                return {"prompt_embeds": encode_prompt_sd15(self.text_encoders[0], ids[0]).float()}
            embeds, pooled = encode_prompt_sdxl(self.text_encoders, ids)
            return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}

    def _pixels(self, split: _ImageSplit, i: int, flip: bool = False, generator=None):
        dc = self.cfg.diffusion
        return pair_pixels(
            split.pairs[i], dc.resolution, center_crop=dc.center_crop, flip=flip, generator=generator
        )

    def _crop_generator(self, split: _ImageSplit, i: int) -> torch.Generator | None:
        """Cached random crops are drawn once per row, from a seed of the row's content."""
        if self.cfg.diffusion.center_crop:
            return None
        return torch.Generator().manual_seed(int(split.pairs[i].digest[:12], 16) + self.cfg.seed)

    def _encode_latents(self, pixels: Tensor) -> Tensor:
        """(n, 2, 3, R, R) pixel pairs -> (n, 2, C, h, w) latents."""
        lat = encode_images(self.vae, pixels.flatten(0, 1).to(self.accelerator.device)).float()
        return lat.view(pixels.shape[0], 2, *lat.shape[1:])

    def _build_cache(self, split: _ImageSplit) -> LatentCache:
        dc = self.cfg.diffusion
        key = json.dumps([CACHE_VERSION, self._fingerprint, dc.resolution, dc.center_crop, dc.random_flip,
                          None if dc.center_crop else self.cfg.seed, [p.digest for p in split.pairs]])  # fmt: skip
        folder = split.cache_dir / f"latents-{hashlib.sha256(key.encode()).hexdigest()[:32]}"

        def encode(rows: list[int]) -> dict[str, Tensor]:
            pp = [self._pixels(split, i, generator=self._crop_generator(split, i)) for i in rows]
            pixels = torch.stack([p.pixels for p in pp])
            lat = [self._encode_latents(pixels)]
            if dc.random_flip:
                lat.append(self._encode_latents(pixels.flip(-1)))
            out = {
                "latents": torch.stack(lat, dim=1),
                **self._encode_text([split.pairs[i].caption for i in rows]),
            }
            if self.is_sdxl:  # original (h, w), crop (top, left), and the left edge a flip reports
                out["time_ids"] = torch.tensor(
                    [[*p.original_size, *p.crop_top_left, p.mirrored_left] for p in pp], dtype=torch.int32
                )
            return out

        def extra() -> dict[str, Tensor]:
            return {f"empty_{k}": v[0] for k, v in self._encode_text([""]).items()}

        logger.info("building the latent cache of %d %s pairs in %s", len(split), split.name, folder)
        return LatentCache.build(folder, len(split), encode, extra=extra, batch_size=self.cfg.eval_batch_size,
                                 accelerator=self.accelerator, desc=f"latent cache {split.name}")  # fmt: skip

    # -- batches -----------------------------------------------------------------------------------
    def _collate(self, split: _ImageSplit, indices: list[int], train: bool) -> dict[str, Tensor]:
        dc, b = self.cfg.diffusion, len(indices)
        batch: dict[str, Tensor] = {"row_index": torch.tensor([split.pairs[i].row for i in indices])}
        if split.pairs[indices[0]].scores is not None:  # odpo / rdpo: (chosen, rejected) scores of each pair
            batch["scores"] = torch.tensor([split.pairs[i].scores for i in indices], dtype=torch.float32)
        drop, flip = torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
        if train:  # one global-RNG draw per batch, then per-row seeds (module docstring)
            batch_seed = int(torch.randint(0, 2**62, (1,)))
            batch["train_seed"] = (batch_seed + batch["row_index"] * TRAIN_ROW_STRIDE) % 2**62
            draws = torch.stack([torch.rand(2, generator=torch.Generator().manual_seed(int(s)))
                                 for s in batch["train_seed"]])  # fmt: skip
            drop = draws[:, 0] < dc.prompt_dropout
            flip = (draws[:, 1] < 0.5) & dc.random_flip
        if split.cache is not None:
            got = split.cache.rows(indices)
            lat = got["latents"].float()  # (b, F, 2, C, h, w)
            batch["latents"] = lat[torch.arange(b), flip.long() if lat.shape[1] > 1 else 0]
            for name in ("prompt_embeds", "pooled"):
                if name in got:
                    value = got[name].float()
                    empty = split.cache.extra[f"empty_{name}"].float()
                    batch[name] = torch.where(drop.view(-1, *[1] * (value.ndim - 1)), empty, value)
            if "time_ids" in got:  # a flipped pair reports its crop's left edge in the mirrored image
                tid = got["time_ids"].float()
                left = torch.where(flip, tid[:, 4], tid[:, 3])
                batch["time_ids"] = torch.cat([tid[:, :3], left[:, None]], dim=1)
        else:
            pp = [self._pixels(split, i, flip=bool(f)) for i, f in zip(indices, flip)]
            batch["pixels"] = torch.stack([p.pixels for p in pp])
            captions = ["" if d else split.pairs[i].caption for i, d in zip(indices, drop)]
            for k, tok in enumerate(self.tokenizers):
                batch[f"input_ids_{k}"] = tokenize_captions(tok, captions)
            if self.is_sdxl:
                batch["time_ids"] = torch.tensor(
                    [[*p.original_size, *p.crop_top_left] for p in pp], dtype=torch.float32
                )
        if self.is_sdxl:  # target size: the training resolution
            batch["time_ids"] = sdxl_time_ids(batch["time_ids"][:, :2], batch["time_ids"][:, 2:4],
                                              (dc.resolution, dc.resolution))  # fmt: skip
        if split.embeddings is not None:
            batch["embeddings"] = split.embeddings[indices]
        if not train:  # fixed noise per row: comparable evaluations
            batch["noise_seed"] = batch["row_index"] + EVAL_SEED_STRIDE * (self.cfg.seed + 1)
        return batch

    def collate_train(self, indices: list[int]) -> dict[str, Tensor]:
        return self._collate(self.train, indices, train=True)

    def collate_eval(self, indices: list[int]) -> dict[str, Tensor]:
        return self._collate(self.eval, indices, train=False)

    def _conditioning(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor] | None]:
        """(latents (B, 2, C, h, w), encoder hidden states (B, S, D), SDXL added conditioning or None)."""
        device = self.accelerator.device
        if "latents" in batch:
            latents, ehs, pooled = batch["latents"], batch["prompt_embeds"], batch.get("pooled")
        else:
            latents = self._encode_latents(batch["pixels"])
            with torch.no_grad():
                ids = [batch[f"input_ids_{k}"] for k in range(len(self.tokenizers))]
                if self.is_sdxl:
                    ehs, pooled = encode_prompt_sdxl(self.text_encoders, ids)
                else:
                    ehs, pooled = encode_prompt_sd15(self.text_encoders[0], ids[0]), None
        dtype = self.unet.dtype
        added = None
        if self.is_sdxl:
            added = {"text_embeds": pooled.to(device, dtype), "time_ids": batch["time_ids"].to(device, dtype)}
        return latents.to(device, dtype), ehs.to(device, dtype), added

    def rows(self, model: nn.Module, batch: dict[str, Tensor]) -> Rows:
        latents, ehs, added = self._conditioning(batch)
        reference = self.reference
        if reference is None:
            reference = adapters_disabled(self.accelerator.unwrap_model(model))
        if "noise_seed" not in batch:  # training: each pair's own seed (module docstring), else the global RNG
            seeds = batch.get("train_seed")
            generator = None if seeds is None else [torch.Generator().manual_seed(int(s) + 1) for s in seeds]
            out = diffusion_logratios(model, reference, latents[:, 0], latents[:, 1], ehs, self.scheduler,
                                      added_cond_kwargs=added, generator=generator)  # fmt: skip
            logratios, model_err, ref_err = out.logratios, out.model_err, out.ref_err
        else:  # evaluation: the mean over `eval_noise_draws` fixed draws per row
            draws = []
            for k in range(self.cfg.diffusion.eval_noise_draws):
                generator = [
                    torch.Generator().manual_seed(int(s) + k * EVAL_DRAW_STRIDE) for s in batch["noise_seed"]
                ]
                draws.append(diffusion_logratios(model, reference, latents[:, 0], latents[:, 1], ehs, self.scheduler,
                                                 added_cond_kwargs=added, generator=generator))  # fmt: skip
            logratios = torch.stack([d.logratios for d in draws]).mean(0)
            model_err = torch.stack([d.model_err for d in draws]).mean(0)
            ref_err = torch.stack([d.ref_err for d in draws]).mean(0)
        return Rows(
            logratios=logratios,
            row_index=batch["row_index"],
            embeddings=batch.get("embeddings"),
            scores=batch.get("scores"),
            metrics=_error_metrics(model_err, ref_err),
        )

    # -- EMA hooks of the loop ---------------------------------------------------------------------
    @staticmethod
    def _trainable(model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def checkpoint_objects(self) -> list:
        """Extra state saved in every checkpoint (and restored by ``--resume``)."""
        return [self.ema] if self.ema is not None else []

    def after_optimizer_step(self, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.step(self._trainable(self.accelerator.unwrap_model(model)))

    def finalize(self, model: nn.Module) -> None:
        """Before the final evaluation and save: the EMA weights replace the trained ones."""
        if self.ema is not None:
            self.ema.copy_to(self._trainable(self.accelerator.unwrap_model(model)))

    # -- samples: the evaluation hook ----------------------------------------------------------------
    def sample_and_score(self, model: nn.Module, step: int) -> dict[str, float]:
        """Generate ``samples.prompts`` (fixed seeds) with the policy, save them and a grid beside the
        reference's images under ``output_dir/samples``, and score them when ``samples.style_refs`` is set and
        with every scorer of ``samples.scorers`` (:mod:`mmpref.metrics.scorers`): ``samples/<name>`` (the mean
        over the prompts), ``samples/reference_<name>`` and ``samples/<name>_win_rate`` (trained vs reference per
        prompt, ties ½; 0.5 at step 0, where the policy is the reference).

        Runs on the main process only. The pipeline (VAE decoder, text encoders) and the scorers are loaded once,
        on first use; the reference's images are generated and scored once. Returns ``samples/*`` metrics for
        the trackers.
        """
        sc, acc = self.cfg.samples, self.accelerator
        if not sc.prompts or not acc.is_main_process:
            return {}
        unet = acc.unwrap_model(model)
        if self._pipe is None:
            self._pipe = load_pipeline(self.source.name, unet=unet, device=acc.device, **self.source.kwargs)
        options = dict(seed=sc.seed, num_inference_steps=sc.num_inference_steps, guidance_scale=sc.guidance_scale,
                       resolution=self.cfg.diffusion.resolution)  # fmt: skip
        root, metrics = Path(self.cfg.output_dir) / "samples", {}
        if self._reference_images is None:
            reference = self.reference if self.reference is not None else unet
            with adapters_off(unet) if self.reference is None else nullcontext(), acc.autocast():
                with unet_swapped(self._pipe, reference) as pipe:
                    self._reference_images = generate(pipe, sc.prompts, **options)
            paths = save_images(self._reference_images, root / "reference", sc.prompts)
            metrics.update(self._score_samples(paths, "samples/reference_"))
        with acc.autocast(), unet_swapped(self._pipe, unet) as pipe:
            images = generate(pipe, sc.prompts, **options)
        paths = save_images(images, root / f"step-{step:08d}", sc.prompts)
        grid = image_grid({"reference": self._reference_images, f"step {step}": images}, sc.prompts)
        grid.save(root / f"grid-step-{step:08d}.png")
        grid.save(root / "latest.png")  # where a person looks first
        log_image(acc, "samples", grid, step)  # to every configured tracker that takes images
        metrics.update(self._score_samples(paths, "samples/"))
        metrics.update(self._preference_scores(images))
        return metrics

    def _preference_scores(self, images: list) -> dict[str, float]:
        """``samples.scorers`` on the policy's images against the reference's (scored once)."""
        from mmpref.metrics.scorers import load_scorer
        from mmpref.metrics.stats import win_rate

        sc = self.cfg.samples
        if not sc.scorers:
            return {}
        if self._scorers is None:
            self._scorers = {name: load_scorer(name, sc.scorer_models.get(name), device=self.accelerator.device)
                             for name in sc.scorers}  # fmt: skip
        if self._reference_scores is None:
            self._reference_scores = {name: s.score(self._reference_images, sc.prompts)
                                      for name, s in self._scorers.items()}  # fmt: skip
        metrics = {}
        for name, scorer in self._scorers.items():
            trained, reference = scorer.score(images, sc.prompts), self._reference_scores[name]
            metrics[f"samples/{name}"] = trained.mean().item()
            metrics[f"samples/reference_{name}"] = reference.mean().item()
            metrics[f"samples/{name}_win_rate"] = win_rate(trained, reference, n_resamples=0).value
        return metrics

    def _score_samples(self, images: list[Path], prefix: str) -> dict[str, float]:
        """Style score, style accuracy and content score (docs/design.md §9) of one set of samples."""
        from mmpref.metrics import ClipEmbedder, evaluate_style

        sc = self.cfg.samples
        if not sc.style_refs:
            return {}
        if self._embedder is None:
            model = sc.clip_model or self.cfg.rpo.clip_model  # one of them is set (config validation)
            weights = sc.clip_weights if sc.clip_model else self.cfg.rpo.clip_weights
            self._embedder = ClipEmbedder(model, weights, device=self.accelerator.device, progress=False,
                                          cache_dir=Path(self.cfg.output_dir) / "cache" / "clip",
                                          key="samples.clip_model" if sc.clip_model else "rpo.clip_model")  # fmt: skip
        prompts = {path.name: prompt for path, prompt in zip(images, sc.prompts, strict=True)}
        target = sc.style_names.index(sc.style_target) if sc.style_names else None
        result = evaluate_style(self._embedder, images, sc.style_refs, prompts=prompts,
                                style_names=sc.style_names or None, target_index=target, n_resamples=200)  # fmt: skip
        return {prefix + name: m.value for name, m in result.metrics.items()}

    def count_units(self, batch: dict[str, Tensor]) -> int:
        """Images (two per pair)."""
        return 2 * int(batch["row_index"].shape[0])

    def save(self, model: nn.Module, out_dir: Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """Full UNet: ``out_dir/unet`` (a ``UNet2DConditionModel`` folder). LoRA: ``out_dir`` holds
        ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(out_dir)``.

        ``state_dict``: the gathered weights when the UNet is sharded (FSDP, ZeRO-3), else None.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.lora is not None:
            from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, state_dict=state_dict))
            pipeline = StableDiffusionXLPipeline if self.is_sdxl else StableDiffusionPipeline
            # the adapter's config (r, lora_alpha, targets) goes into the file: without it load_lora_weights
            # assumes lora_alpha = r and applies the LoRA at r/alpha of its trained strength
            metadata = model.peft_config["default"].to_dict()
            pipeline.save_lora_weights(out_dir, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata,
                                       safe_serialization=True)  # fmt: skip
            kind = "lora"
        else:
            if state_dict is not None:  # the sharded module holds no whole weights: save a whole copy
                whole = type(model).from_config(model.config)
                whole.load_state_dict(state_dict)
                model = whole
            model.save_pretrained(out_dir / "unet", safe_serialization=True)
            kind = "unet"
        base = self.source.name if self.source.is_hub else str(Path(self.source.name).resolve())
        info = {"base_model": base, "revision": self.source.revision, "kind": kind, "sdxl": self.is_sdxl}
        (out_dir / "mmpref.json").write_text(json.dumps(info, indent=2))


def _error_metrics(model_err: Tensor, ref_err: Tensor) -> dict[str, Tensor]:
    """The raw squared errors, as the Diffusion-DPO code logs them (docs/design.md §7)."""
    m, r = model_err.detach(), ref_err.detach()
    return {
        "diffusion/model_mse": m.mean(),
        "diffusion/ref_mse": r.mean(),
        "diffusion/model_mse_chosen": m[:, 0].mean(),
        "diffusion/model_mse_rejected": m[:, 1].mean(),
        "diffusion/implicit_acc": tie_accuracy((m[:, 1] - r[:, 1]) - (m[:, 0] - r[:, 0])).mean(),
    }
