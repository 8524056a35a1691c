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
* **Cache** (``diffusion.cache_latents``: ``lazy``, the default, ``ahead`` or ``off``): VAE latents
  (posterior *mean* × scaling factor, the same function the uncached path uses, so caching only adds float16 rounding) and text-encoder outputs,
  plus the empty caption's, are computed once per row and model into
  ``<dataset folder>/.mmpref_cache/latents-<hash>`` (see :mod:`mmpref.data.row_cache`): with ``lazy`` (the
  default) when a batch first draws the row, with ``ahead`` before step 1; from then on training never calls
  the VAE encoder or a text encoder for that row. ``off``: both run every step (diffusers' example).
* **Prompt dropout**: per pair (both images), with probability ``diffusion.prompt_dropout``; cached or not,
  the draws are the same, and so are the batches.
* **Training randomness per row**: one seed per pair, a hash of the run's ``seed``, the epoch and the dataset
  row (:func:`train_seed`), draws the pair's prompt dropout, flip, ε and t. So a pair's draws do not depend
  on the process or batch slot it lands in, and N data-parallel processes compute the same losses and
  gradients as one process on the same global batch (tested with two gloo processes); nor on how far the
  loader has read ahead, so a resumed run (which replays its position) draws exactly what the
  uninterrupted one drew.
* **Noise**: evaluation uses fixed seeds per dataset row,
  so the eval metrics of different steps (and runs) see the same noise. One (ε, t) draw makes the eval
  accuracy of a small set noisy: ``diffusion.eval_noise_draws: K`` averages each pair's ℓ over K fixed
  draws (K forwards of policy and reference per eval batch), an estimate of the expectation over t and ε
  that Diffusion-DPO's objective is defined with.
* **Diffusion-RPO**: one CLIP embedding per image (``rpo.embedding``: text | image | image+text, the
  normalised mean of the two normalised embeddings by default), from open_clip (``rpo.clip_model``, a
  ``local-dir:`` folder or an architecture name with ``rpo.clip_weights``), computed once per row when a
  batch first draws it and cached beside the data (float16; a stream's are computed per batch); they go into
  ``Rows.embeddings`` as (B, 2, D), so chosen image i is weighted against rejected image j by their own
  similarity.
* **Data** (:mod:`mmpref.data.images`): an index into the source's Arrow rows; images are checked when first
  read, and a bad one stops the run or, with ``on_bad_rows: skip``, is recorded in ``output_dir/bad_rows.jsonl``
  and replaced in its batch by the next usable row (:meth:`DiffusionTask._read`).
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
from collections.abc import Sequence
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
from mmpref.data.images import (
    BadImageRow,
    ImagePair,
    ImageRows,
    ImageStream,
    PairEmbedder,
    pair_pixels,
    prepare_image_dataset,
)
from mmpref.data.row_cache import RowCache
from mmpref.data.text import DataError, config_sources, held_out_split, open_stream
from mmpref.hub import ModelSource, folder_fingerprint
from mmpref.losses import tie_accuracy
from mmpref.progress import progress
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
CACHE_VERSION = 4  # 2: SDXL time ids hold the mirrored crop edge too; 3: per-row chunks; 4: flips apart
EVAL_SEED_STRIDE = 1_000_003
CROP_ROW_STRIDE = 1_000_003  # seed offset between rows' cached random crops
EVAL_DRAW_STRIDE = 2**40  # seed offset of each further evaluation draw of a row (beyond any row seed)


class _ImageSplit:
    """One split: its rows (an index into the source), its latent cache and its RPO embedding cache."""

    streamed = False

    def __init__(self, data: ImageRows, name: str):
        self.data, self.name = data, name
        self.latents: RowCache | None = None  # VAE latents + text-encoder outputs (diffusion.cache_latents)
        self.flipped: RowCache | None = None  # the mirrored images' latents (random_flip), encoded when drawn
        self.clip: RowCache | None = None  # Diffusion-RPO's CLIP embeddings
        self.labels = None  # image rows are always pairs (the loop balances unpaired text rows by these)

    def __len__(self) -> int:
        return len(self.data)

    def caches(self) -> list[RowCache]:
        return [c for c in (self.latents, self.flipped, self.clip) if c is not None]

    def needed(self, flip: bool) -> list[RowCache]:
        """The caches a row drawn with (``flip``) or without a flip reads."""
        return [c for c in (self.latents, self.flipped if flip else None, self.clip) if c is not None]


class _StreamedSplit:
    """The training split of ``streaming: true``: an :class:`ImageStream`, batches of decoded pairs."""

    streamed = True
    labels = None
    latents = flipped = clip = None  # nothing to cache under: a stream's rows have no fixed place

    def __init__(self, data: ImageStream, name: str):
        self.data, self.name = data, name

    def stream(self, epoch: int) -> ImageStream:
        return self.data.for_epoch(epoch)

    def caches(self) -> list[RowCache]:
        return []


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

        # -- data: an index into the sources; images are read (and checked) when a batch first needs them
        load = {"on_bad_rows": cfg.on_bad_rows, "image_root": cfg.image_root,
                "confine_image_paths": cfg.confine_image_paths, **score_checks(cfg)}  # fmt: skip
        (train_data, options), evaluation = config_sources(cfg, train_dataset, eval_dataset)
        self._bad_rows_file = Path(cfg.output_dir) / "bad_rows.jsonl"
        self._bad_seen: set[int] = set()
        if cfg.streaming:
            train = self._stream(train_data, options)
        else:
            train = prepare_image_dataset(train_data, **options, **load)
        evald = None
        if evaluation is not None:  # eval data of its own, or a named split
            eval_data, options = evaluation
            evald = prepare_image_dataset(eval_data, **options, **load)
        elif cfg.eval_split:
            train_order, eval_order = held_out_split(len(train), cfg.eval_split, cfg.seed)
            train, evald = train.subset(train_order), train.subset(eval_order)
        self.train = _StreamedSplit(train, "train") if cfg.streaming else _ImageSplit(train, "train")
        self.eval = _ImageSplit(evald, "eval") if evald is not None else None
        self.embedder = None
        if cfg.loss.type == "rpo" and cfg.rpo.mode != "diagonal":
            self.embedder = PairEmbedder(cfg.rpo.clip_model, cfg.rpo.clip_weights, cfg.rpo.embedding, device)
        for split in self.splits():
            if dc.cache_latents != "off":
                split.latents = RowCache(self._latent_folder(split), split.data.dataset.num_rows)
                if dc.random_flip:
                    split.flipped = RowCache(split.latents.folder / "flipped", split.data.dataset.num_rows)
            if self.embedder is not None:
                key = json.dumps([self.embedder.identity, split.data.identity])
                folder = split.data.cache_dir / f"clip-{hashlib.sha256(key.encode()).hexdigest()[:32]}"
                split.clip = RowCache(folder, split.data.dataset.num_rows)
        if dc.cache_latents == "ahead":
            self.fill_caches()
        if dc.cache_latents != "off" and self._caches_complete():  # training never encodes: free the encoders
            self.vae, self.text_encoders = None, []

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

    def _empty_caption(self) -> dict[str, Tensor]:
        return {f"empty_{k}": v[0] for k, v in self._encode_text([""]).items()}

    def _crop_generator(self, row: int) -> torch.Generator | None:
        """Random crops of cached rows are drawn once per row, from the row number and the run's seed."""
        if self.cfg.diffusion.center_crop:
            return None
        return torch.Generator().manual_seed(row * CROP_ROW_STRIDE + self.cfg.seed)

    def _encode_latents(self, pixels: Tensor) -> Tensor:
        """(n, k, 3, R, R) images -> (n, k, C, h, w) latents."""
        lat = encode_images(self.vae, pixels.flatten(0, 1).to(self.accelerator.device)).float()
        return lat.view(*pixels.shape[:2], *lat.shape[1:])

    def _latent_folder(self, split: _ImageSplit) -> Path:
        dc = self.cfg.diffusion
        key = json.dumps([CACHE_VERSION, self._fingerprint, dc.resolution, dc.center_crop, dc.random_flip,
                          None if dc.center_crop else self.cfg.seed, split.data.identity])  # fmt: skip
        return split.data.cache_dir / f"latents-{hashlib.sha256(key.encode()).hexdigest()[:32]}"

    def _encode_rows(self, pairs: list[ImagePair], flipped: bool = False) -> dict[str, Tensor]:
        """What the latent cache holds of decoded pairs: the latents, the captions' text-encoder outputs and,
        for SDXL, the time ids; with ``flipped``, only the latents of the mirrored images (a cache of their own,
        filled when a flip is first drawn, so the first epoch encodes what it trains on and no more).

        One pair at a time, so a row's cached values depend on that row alone, not on which rows shared its
        batch: lazy and ahead caches, and one or many processes, hold the same numbers bit for bit.
        """
        dc = self.cfg.diffusion
        pp = [pair_pixels(p, dc.resolution, center_crop=dc.center_crop, generator=self._crop_generator(p.row))
              for p in pairs]  # fmt: skip
        parts = []
        for p, pair in zip(pp, pairs):
            pixels = p.pixels[None].flip(-1) if flipped else p.pixels[None]  # (1, 2, 3, R, R)
            part = {"latents": self._encode_latents(pixels)}
            parts.append(part if flipped else {**part, **self._encode_text([pair.caption])})
        out = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        if self.is_sdxl and not flipped:  # original (h, w), crop (top, left), and the left edge a flip reports
            out["time_ids"] = torch.tensor(
                [[*p.original_size, *p.crop_top_left, p.mirrored_left] for p in pp], dtype=torch.int32
            )
        return out

    def _draws(self, row: int, epoch: int) -> tuple[bool, bool]:
        """A training pair's (prompt dropped, flipped), from its own seed (:func:`train_seed`)."""
        dc = self.cfg.diffusion
        u = torch.rand(2, generator=torch.Generator().manual_seed(train_seed(self.cfg.seed, epoch, row)))
        return bool(u[0] < dc.prompt_dropout), bool(u[1] < 0.5) and dc.random_flip

    # -- reading rows: bad rows, caches ------------------------------------------------------------
    def _stream(self, source, options: dict) -> ImageStream:
        """``streaming: true``: the training rows as a stream, each process reading its own shards."""
        cfg, acc = self.cfg, self.accelerator
        ds, name, folder = open_stream(source, **options)
        base = Path(cfg.image_root).expanduser() if cfg.image_root else folder or Path.cwd()
        return ImageStream(ds, source=name, base=base, confine_to=base if cfg.confine_image_paths else None,
                           seed=cfg.seed, buffer=cfg.shuffle_buffer, rank=acc.process_index, world=acc.num_processes,
                           on_bad_rows=cfg.on_bad_rows, on_bad=lambda exc: self._record_bad(self.train, exc))  # fmt: skip

    def splits(self) -> list[_ImageSplit]:
        """The indexed splits (a streamed training split has no rows to cache ahead)."""
        return [s for s in (self.train, self.eval) if s is not None and not s.streamed]

    def _needs_images(self, split: _ImageSplit, i: int, flip: bool) -> bool:
        """Whether position ``i`` must be read from its images: uncached, or a cache it needs lacks it."""
        if self.cfg.diffusion.cache_latents == "off":
            return True
        row, stamp = split.data.row(i), split.data.image_stamps([i])[0]
        return any(c.missing([row], [stamp]) for c in split.needed(flip))

    def _read(self, split: _ImageSplit, positions: Sequence[int], flip_of=lambda row: False,
              replace: bool = True) -> tuple[list[int], dict[int, ImagePair]]:  # fmt: skip
        """The positions to use for ``positions`` and the decoded pairs of those the caches lack.

        An image found bad here stops the run (``on_bad_rows: error``, naming the row and the column) or is
        recorded in ``output_dir/bad_rows.jsonl`` and, with ``replace``, stood in for by the next usable row,
        the same one in every run and process, so resumed and multi-process runs stay exact. ``flip_of(row)``:
        whether the row is drawn flipped (it then needs the mirrored latents too).
        """
        used, loaded = [], {}
        for i in positions:
            for step in range(len(split)):
                j = (i + step) % len(split)
                if not self._needs_images(split, j, flip_of(split.data.row(j))):
                    used.append(j)
                    break
                try:
                    loaded[j] = split.data.load(j)
                except BadImageRow as exc:
                    if self.cfg.on_bad_rows == "error":
                        raise
                    self._record_bad(split, exc)
                    if not replace:
                        break
                    continue
                used.append(j)
                break
            else:
                raise DataError(f"{split.data.source}: every image pair is bad, nothing left to train on")
        return used, loaded

    def _record_bad(self, split: _ImageSplit, exc: BadImageRow) -> None:
        if exc.row not in self._bad_seen:
            self._bad_seen.add(exc.row)
            logger.warning("%s: skipped row %d (on_bad_rows=skip): %s", split.data.source, exc.row, exc.reason)
            self._bad_rows_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self._bad_rows_file, "a") as f:  # one short line per write: appends do not interleave
                f.write(json.dumps({"split": split.name, "row": exc.row, "reason": exc.reason}) + "\n")

    def _cached(self, split: _ImageSplit, used: list[int], loaded: dict[int, ImagePair],
                flip: Sequence[bool]) -> dict[str, Tensor]:  # fmt: skip
        """The cached tensors of these positions (latents in each row's drawn orientation, text, CLIP
        ``embeddings``), encoding what is missing."""
        rows = [split.data.row(i) for i in used]
        stamps = split.data.image_stamps(used)
        got: dict[str, Tensor] = {}
        if split.latents is not None:  # the empty caption's outputs too, for prompt dropout
            got.update({f"extra/{k}": v for k, v in split.latents.set_extra(self._empty_caption).items()})
            got.update(split.latents.fetch(rows, lambda todo: self._encode_rows([loaded[used[k]] for k in todo]),
                                           stamps))  # fmt: skip
        flips = [k for k, f in enumerate(flip) if f]
        if split.flipped is not None and flips:
            mirrored = split.flipped.fetch(
                [rows[k] for k in flips], lambda todo: self._encode_rows([loaded[used[flips[t]]] for t in todo], True),
                [stamps[k] for k in flips],
            )["latents"]  # fmt: skip
            got["latents"] = got["latents"].clone()
            got["latents"][flips] = mirrored
        if split.clip is not None:
            got.update(split.clip.fetch(rows, lambda todo: {"embeddings": self.embedder([loaded[used[k]] for k in todo])},
                                        stamps))  # fmt: skip
        return got

    def fill_caches(self) -> None:
        """Encode every row not cached yet, before training (``cache_latents: ahead``, ``mmpref cache``):
        each process takes every P-th batch, with a progress bar; rows cached earlier are skipped, so a
        killed fill resumes where it stopped."""
        acc, size = self.accelerator, self.cfg.eval_batch_size
        for split in self.splits():
            if not split.caches():
                continue
            starts = range(acc.process_index * size, len(split), size * acc.num_processes)
            for start in progress(starts, desc=f"cache {split.name}", unit="batch", accelerator=acc):
                both = self.cfg.diffusion.random_flip  # ahead: both orientations of every row
                used, loaded = self._read(split, range(start, min(len(split), start + size)),
                                          flip_of=lambda row, both=both: both, replace=False)  # fmt: skip
                self._cached(split, used, loaded, [both] * len(used))
            for cache in split.caches():
                cache.flush()
        acc.wait_for_everyone()

    def _caches_complete(self) -> bool:
        return all(c.cached_rows() >= len(s) for s in self.splits() for c in s.caches())

    def flush(self) -> None:
        """Before a checkpoint and at the end: rows encoded since the last flush go to disk."""
        for split in self.splits():
            for cache in split.caches():
                cache.flush()

    def data_metrics(self) -> dict[str, float]:
        """``data/bad_rows_skipped``: distinct rows whose images were found bad while training (all processes)."""
        if self.cfg.on_bad_rows != "skip":
            return {}
        seen = set()
        if self._bad_rows_file.is_file():
            for line in self._bad_rows_file.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line another process is still writing
                    continue
                seen.add((entry["split"], entry["row"]))
        return {"data/bad_rows_skipped": float(len(seen))}

    # -- batches -----------------------------------------------------------------------------------
    def _collate(self, split: _ImageSplit, indices: list, train: bool, epoch: int = 0) -> dict[str, Tensor]:
        """A batch of ``indices`` (positions in ``split``; decoded pairs for a streamed split)."""
        dc, b = self.cfg.diffusion, len(indices)
        if split.streamed:
            used, loaded = list(range(b)), dict(enumerate(indices))
            rows, captions = [p.row for p in indices], [p.caption for p in indices]
            scores = [p.scores for p in indices] if indices[0].scores is not None else None
        else:
            flip_of = (lambda row: self._draws(row, epoch)[1]) if train else (lambda row: False)
            used, loaded = self._read(split, indices, flip_of)
            rows, captions, scores = split.data.meta(used)
        batch: dict[str, Tensor] = {"row_index": torch.tensor(rows)}
        if scores is not None:  # odpo / rdpo: (chosen, rejected) scores of each pair
            batch["scores"] = torch.tensor(scores, dtype=torch.float32)
        drop, flip = torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)
        if train:  # per-row seeds from the run's seed, the epoch and the row (module docstring)
            batch["train_seed"] = torch.tensor([train_seed(self.cfg.seed, epoch, r) for r in rows])
            drop, flip = (torch.tensor(d) for d in zip(*[self._draws(r, epoch) for r in rows]))
        got = self._cached(split, used, loaded, flip.tolist()) if split.caches() else {}
        if self.embedder is not None and split.clip is None:  # uncached (a stream): this batch's own
            got["embeddings"] = self.embedder([loaded[i] for i in used])
        if "embeddings" in got:
            batch["embeddings"] = got.pop("embeddings").float()
        if split.latents is not None:
            batch["latents"] = got["latents"].float()  # (b, 2, C, h, w), each row in its drawn orientation
            for name in ("prompt_embeds", "pooled"):
                if name in got:
                    value, empty = got[name].float(), got[f"extra/empty_{name}"].float()
                    batch[name] = torch.where(drop.view(-1, *[1] * (value.ndim - 1)), empty, value)
            if "time_ids" in got:  # a flipped pair reports its crop's left edge in the mirrored image
                tid = got["time_ids"].float()
                left = torch.where(flip, tid[:, 4], tid[:, 3])
                batch["time_ids"] = torch.cat([tid[:, :3], left[:, None]], dim=1)
        else:
            pp = [pair_pixels(loaded[i], dc.resolution, center_crop=dc.center_crop, flip=bool(f))
                  for i, f in zip(used, flip)]  # fmt: skip
            batch["pixels"] = torch.stack([p.pixels for p in pp])
            captions = ["" if d else c for c, d in zip(captions, drop)]
            for k, tok in enumerate(self.tokenizers):
                batch[f"input_ids_{k}"] = tokenize_captions(tok, captions)
            if self.is_sdxl:
                batch["time_ids"] = torch.tensor(
                    [[*p.original_size, *p.crop_top_left] for p in pp], dtype=torch.float32
                )
        if self.is_sdxl:  # target size: the training resolution
            batch["time_ids"] = sdxl_time_ids(batch["time_ids"][:, :2], batch["time_ids"][:, 2:4],
                                              (dc.resolution, dc.resolution))  # fmt: skip
        if not train:  # fixed noise per row: comparable evaluations
            batch["noise_seed"] = batch["row_index"] + EVAL_SEED_STRIDE * (self.cfg.seed + 1)
        return batch

    def collate_train(self, indices: list[int], epoch: int = 0) -> dict[str, Tensor]:
        return self._collate(self.train, indices, train=True, epoch=epoch)

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


def train_seed(seed: int, epoch: int, row: int) -> int:
    """The seed of a training pair's draws (prompt dropout, flip; +1: its ε and t): a hash of the run's seed, the
    epoch and the dataset row, so it depends on nothing else: not the process, the batch slot, or how far a
    loader has read ahead."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


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
