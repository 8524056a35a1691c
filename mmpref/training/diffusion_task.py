"""Diffusion preference training (Diffusion-DPO, Diffusion-RPO) of SD 1.5 / SDXL UNets for the one loop.

:class:`DiffusionTask` is a :class:`~mmpref.training.task.Task`: it owns the UNet, the frozen VAE / text
encoder(s) / reference and the image data, and turns a batch into :class:`~mmpref.losses.LogRatios` of ℓ
(formulas in :mod:`mmpref.adapters.diffusion`). Every choice (the β convention, the model kind, the reference,
the lazy caches, the per-pair randomness of :func:`train_seed`, the evaluation noise, Diffusion-RPO's CLIP
embeddings, EMA, samples) is documented in docs/design.md §7, because Diffusion-RPO has no public reference
code. Saving: ``final/unet`` is a diffusers ``UNet2DConditionModel`` folder; with LoRA, ``final/`` holds
``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(final)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from mmpref.adapters.diffusion import (
    diffusion_logratios,
    encode_images,
    encode_prompt_sd15,
    encode_prompt_sdxl,
    sdxl_time_ids,
    tokenize_captions,
)
from mmpref.data.errors import DataError
from mmpref.data.image_inputs import PairEmbedder, pair_pixels
from mmpref.data.image_stream import ImageStream
from mmpref.data.images import BadImageRow, ImagePair, ImageRows, prepare_image_dataset
from mmpref.data.row_cache import RowCache
from mmpref.data.splits import Splits, prepare_splits
from mmpref.hub import folder_fingerprint, weights_named_on_failure
from mmpref.losses import LogRatios, tie_accuracy
from mmpref.progress import progress
from mmpref.training.config import DTYPES
from mmpref.training.plan import DataPlan
from mmpref.training.reference import AdaptersOff, FrozenCopy, Reference
from mmpref.training.sampling import Samples
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


@dataclass
class DiffusionModels:
    """What :meth:`DiffusionTask.load_models` returns for the later stages (the task keeps the VAE, text
    encoders, tokenizers and scheduler it encodes and noises with)."""

    unet: nn.Module
    weight_dtype: torch.dtype  # of the frozen parts: the launcher's mixed precision, else torch_dtype


class DiffusionTask(Task):
    """Diffusion-DPO / Diffusion-RPO on a SD 1.5 or SDXL pipeline folder (module docstring)."""

    modality = "diffusion"
    unit = "images"  # what count_units counts, for the throughput report

    # -- the stages ---------------------------------------------------------------------------------
    def prepare_splits(self) -> Splits:
        """An index into each source's usable rows (images are read, and checked, when a batch first needs them);
        a streamed training split reads its rows as training goes."""
        cfg = self.cfg
        self._bad_rows_file = Path(cfg.output_dir) / "bad_rows.jsonl"
        self._bad_seen: set[int] = set()
        share = 0.0 if cfg.streaming else cfg.eval_split
        return prepare_splits(self.plan.train, self.plan.eval, share, cfg.seed, self._indexed)

    def _indexed(self, data: DataPlan) -> ImageRows | ImageStream:
        cfg, objective = self.cfg, self.plan.objective
        if data.stream is not None:
            return self._stream(*data.stream)
        return prepare_image_dataset(data.rows, on_bad_rows=cfg.on_bad_rows, image_root=cfg.image_root,
                                     confine_image_paths=cfg.confine_image_paths, needs_scores=objective.needs_scores,
                                     chosen_scores_higher=objective.chosen_scores_higher)  # fmt: skip

    def load_models(self) -> DiffusionModels:
        """The pipeline's components through diffusers' and transformers' ``from_pretrained`` (hub id or folder)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        cfg, source, device = self.cfg, self.source, self.accelerator.device
        weight_dtype = MIXED.get(self.accelerator.mixed_precision, DTYPES[cfg.torch_dtype])

        def part(cls, subfolder: str, **kwargs):  # one component of the pipeline, hub id or folder alike
            with weights_named_on_failure(source):  # a damaged weights file is named, not a library traceback
                return cls.from_pretrained(source.name, subfolder=subfolder, **source.kwargs, **kwargs)

        self.is_sdxl = self.plan.sdxl
        self.unet = part(UNet2DConditionModel, "unet", torch_dtype=DTYPES[cfg.torch_dtype])
        if cfg.diffusion.attention == "xformers":  # the plan checked that xformers is installed
            self.unet.enable_xformers_memory_efficient_attention()
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
        return DiffusionModels(self.unet, weight_dtype)

    def build_artifacts(self, models: DiffusionModels, splits: Splits) -> Splits:
        """Each split's row caches (latents and text-encoder outputs, mirrored latents, RPO's CLIP embeddings):
        opened, filled ahead with ``cache_latents: ahead``; the encoders are freed once every row is cached."""
        dc = self.cfg.diffusion
        self.train = _StreamedSplit(splits.train, "train") if self.cfg.streaming else _ImageSplit(splits.train, "train")
        self.eval = _ImageSplit(splits.eval, "eval") if splits.eval is not None else None
        self.embedder = None
        if self.plan.objective.needs_embeddings:
            rpo = self.cfg.rpo
            self.embedder = PairEmbedder(rpo.clip_model, rpo.clip_weights, rpo.embedding, self.accelerator.device)
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
        return Splits(self.train, self.eval)

    def make_reference(self, models: DiffusionModels, splits: Splits) -> Reference:
        """A frozen copy of the UNet, or with LoRA the UNet itself with its adapters off (``plan.reference``)."""
        if self.plan.reference == "frozen_copy":
            self.reference = FrozenCopy(models.unet, self.accelerator.device, models.weight_dtype)
        else:
            self.reference = AdaptersOff()
        return self.reference

    def wrap_for_training(self, models: DiffusionModels) -> nn.Module:
        """Gradient checkpointing, LoRA (diffusers' peft integration, ``unet.add_adapter``) and the EMA."""
        cfg, unet = self.cfg, models.unet
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if cfg.lora is not None:
            from peft import LoraConfig

            lc = cfg.lora
            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, init_lora_weights="gaussian",
                                        target_modules=lc.targets(self.modality)))  # fmt: skip
            for p in unet.parameters():
                if p.requires_grad:  # train the adapters in fp32, as diffusers' cast_training_params does
                    p.data = p.data.float()
        self.model = unet
        # EMA of the trained weights (diffusers' EMAModel, as its training scripts use it): updated after every
        # optimizer step, checkpointed with the run, and copied into the model before the final evaluation
        # and save, so final/ holds the averaged weights. With LoRA only the adapters are averaged.
        self.ema = None
        if cfg.diffusion.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self._trainable(unet), decay=cfg.diffusion.ema_decay)
            self.ema.to(self.accelerator.device)
        self.samples = Samples(cfg, self.accelerator, self.source, self.reference)  # used by sample_and_score
        return unet

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
    def _stream(self, ds, name: str, folder: Path | None) -> ImageStream:
        """``streaming: true``: the training rows as a stream (opened by the plan), each process its own shards."""
        cfg, acc = self.cfg, self.accelerator
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

    def rows(self, model: nn.Module, batch: dict[str, Tensor]) -> LogRatios:
        latents, ehs, added = self._conditioning(batch)
        reference = partial(self.reference.predict, model)
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
        return LogRatios(
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
        """``samples.prompts`` generated, saved and scored (:class:`~mmpref.training.sampling.Samples`)."""
        return self.samples(model, step)

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
