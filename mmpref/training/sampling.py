"""Images from a trained UNet beside its reference: ``mmpref sample`` and diffusion training's sample hook.

Generation is diffusers' own pipeline (``DiffusionPipeline.from_pretrained`` on the base model folder, so
SD 1.5 and SDXL alike, with the folder's scheduler). Prompt ``i`` is generated with the seed ``seed + i`` on
every side, one prompt per call, so the reference and the trained column of a grid start from the same
noise and differ only by the training; a prompt's image does not depend on which other prompts are listed.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mmpref.data.errors import DataError


def read_prompt_list(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line; blank lines and ``#`` comments skipped) or a JSON Lines file
    with a ``prompt`` or ``caption`` per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: no such file {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(str(row.get("prompt", row.get("caption"))))
            except (json.JSONDecodeError, AttributeError) as e:
                raise DataError(f"{path}, line {n}: not a JSON object with a 'prompt' ({e})") from e
    else:
        prompts = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def load_pipeline(model: str | Path, unet: torch.nn.Module | None = None, device: str | None = None,
                  revision: str | None = None):  # fmt: skip
    """The diffusers pipeline of ``model`` (a hub id or folder; SD 1.5 or SDXL), optionally with ``unet``
    in place of its own."""
    from diffusers import DiffusionPipeline

    kwargs = {"unet": unet} if unet is not None else {}
    pipe = DiffusionPipeline.from_pretrained(model, revision=revision, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
) -> list[Image.Image]:
    """One image per prompt; prompt ``i`` uses ``torch.Generator().manual_seed(seed + i)``."""
    size = {"height": resolution, "width": resolution} if resolution else {}
    images = []
    for i, prompt in enumerate(prompts):
        out = pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   generator=torch.Generator().manual_seed(seed + i), **size)  # fmt: skip
        images.append(out.images[0])
    return images


@contextmanager
def unet_swapped(pipe, unet: torch.nn.Module):
    """``pipe`` with ``unet`` in place of its own for the duration, in eval mode."""
    own, was_training = pipe.unet, unet.training
    pipe.unet = unet.eval()
    try:
        yield pipe
    finally:
        pipe.unet = own
        unet.train(was_training)


def image_grid(
    columns: Mapping[str, Sequence[Image.Image]], prompts: Sequence[str], cell: int = 256
) -> Image.Image:
    """A grid: one row per prompt, one column per named side (e.g. reference, trained), labelled."""
    names = list(columns)
    label_h, text_w, chars = 20, max(cell, 160), max(cell, 160) // 6  # ~6 px per character of PIL's font
    grid = Image.new("RGB", (text_w + cell * len(names), label_h + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(names):
        draw.text((text_w + j * cell + 4, 4), name, fill="black")
        for i, image in enumerate(columns[name]):
            grid.paste(image.convert("RGB").resize((cell, cell)), (text_w + j * cell, label_h + i * cell))
    for i, prompt in enumerate(prompts):
        lines = textwrap.wrap(prompt, chars)[: cell // 12]
        draw.multiline_text((4, label_h + i * cell + 4), "\n".join(lines), fill="black")
    return grid


def save_images(images: Sequence[Image.Image], folder: Path, prompts: Sequence[str]) -> list[Path]:
    """``folder/000.png, 001.png, ...`` plus ``prompts.jsonl`` (file → prompt), the layout
    ``mmpref style-score --prompts`` and ``compare-style`` read."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with open(folder / "prompts.jsonl", "w") as f:
        for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
            path = folder / f"{i:03d}.png"
            image.save(path)
            paths.append(path)
            f.write(json.dumps({"file_name": path.name, "prompt": prompt}) + "\n")
    return paths


# How one image goes into each Accelerate tracker's ``log_images``: tensorboard's ``add_images`` takes a
# batch array, aim's and clearml's take the image itself, the others (wandb, swanlab, ...) a list of images.
_SINGLE_IMAGE_TRACKERS = ("aim", "clearml")


def log_image(accelerator, name: str, image: Image.Image, step: int) -> list[str]:
    """Log ``image`` as ``name`` at ``step`` to every tracker of ``accelerator`` that takes images (those whose
    Accelerate tracker has ``log_images``); returns their names."""
    import numpy as np

    logged = []
    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images"):  # e.g. mlflow, comet_ml: scalars only in Accelerate
            continue
        if tracker.name == "tensorboard":
            tracker.log_images({name: np.asarray(image.convert("RGB"))[None]}, step=step, dataformats="NHWC")
        elif tracker.name in _SINGLE_IMAGE_TRACKERS:
            tracker.log_images({name: image}, step=step)
        else:
            tracker.log_images({name: [image]}, step=step)
        logged.append(tracker.name)
    return logged


# --------------------------------------------------------------------------------- mmpref sample


def resolve_trained(target: str | Path) -> Path:
    """The ``final`` folder of a run from a YAML config (its ``output_dir``), a run folder, or ``final`` itself."""
    target = Path(target)
    if target.is_file() and target.suffix in (".yaml", ".yml"):
        from mmpref.training import load_config

        target = Path(load_config(target).output_dir)
    for folder in (target, target / "final"):
        if (folder / "mmpref.json").is_file():
            return folder
    raise FileNotFoundError(
        f"{target}: not a trained diffusion run (no mmpref.json in it or in its final/); "
        "pass a config, its output_dir or output_dir/final"
    )


def trained_pipeline(final: Path, device: str | None = None):
    """The base pipeline with the trained weights of ``final``: a full UNet, or LoRA via ``load_lora_weights``."""
    from diffusers import UNet2DConditionModel

    info = json.loads((final / "mmpref.json").read_text())
    if info["kind"] == "lora":
        pipe = load_pipeline(info["base_model"], device=device, revision=info.get("revision"))
        pipe.load_lora_weights(final)
        return pipe, info
    unet = UNet2DConditionModel.from_pretrained(final, subfolder="unet")
    return load_pipeline(info["base_model"], unet=unet, device=device, revision=info.get("revision")), info


def run_sample(
    target: str | Path,
    prompts: str | Path,
    *,
    out: str | Path | None = None,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    device: str | None = None,
) -> tuple[Path, list[str]]:
    """``mmpref sample``: reference and trained images of the same prompts and seeds, and their grid.

    ``target`` is a training config, its ``output_dir`` or ``output_dir/final`` (:func:`resolve_trained`),
    ``prompts`` a file of :func:`read_prompt_list`. Writes ``out/reference/``, ``out/trained/`` (each with its
    ``prompts.jsonl``) and ``out/grid.png``; ``out`` defaults to ``<output_dir>/samples``, ``device`` to cuda
    when available. Returns ``out`` and the prompts.
    """
    prompt_list = read_prompt_list(prompts)
    final = resolve_trained(target)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out) if out else final.parent / "samples"
    options = dict(seed=seed, num_inference_steps=steps, guidance_scale=guidance_scale,
                   resolution=resolution)  # fmt: skip
    trained, info = trained_pipeline(final, device)
    trained_images = generate(trained, prompt_list, **options)
    del trained
    reference_images = generate(load_pipeline(info["base_model"], device=device), prompt_list, **options)
    save_images(reference_images, out / "reference", prompt_list)
    save_images(trained_images, out / "trained", prompt_list)
    image_grid({"reference": reference_images, "trained": trained_images}, prompt_list).save(out / "grid.png")
    return out, prompt_list


class Samples:
    """A diffusion run's samples at every evaluation (``samples`` config section), called as
    ``samples(model, step)`` -> metrics.

    ``reference``: the run's reference (:mod:`mmpref.training.reference`), whose images are generated once.
    """

    def __init__(self, cfg, accelerator, source, reference):
        self.cfg, self.accelerator, self.source, self.reference = cfg, accelerator, source, reference
        self._pipe = self._embedder = None  # built on first use
        self._reference_images: list | None = None
        self._scorers: dict | None = None  # samples.scorers, loaded on first use
        self._reference_scores: dict | None = None  # of the reference images, scored once

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
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
            with self.reference.as_model(unet) as reference, acc.autocast():
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
