"""The model card of ``final/`` (``README.md`` with Hub metadata) and the upload of ``final/`` to the Hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from mmpref.hub import HUB_ID, ModelSource, split_revision
from mmpref.losses import Objective
from mmpref.losses.objective import LOSS_PAPERS, SMOOTHED
from mmpref.training.config import DATA_SUFFIXES, TrainConfig

DIFFUSION_PAPERS = {
    "dpo": ("Diffusion-DPO", "Wallace et al. 2023", "2311.12908"),
    "rpo": ("Diffusion-RPO", "Gu et al. 2024", "2406.06382"),
}
SAMPLES_FILE = "samples.png"


class HubUploadError(RuntimeError):
    """Uploading ``final/`` failed; the message names the repository. ``final/`` stays on disk."""


def hub_dataset_id(value: str | None) -> str | None:
    """A ``dataset`` value as a Hub dataset id (any ``@revision`` dropped), or None for a local file, folder
    or glob."""
    if not value or Path(value).exists() or value.startswith((".", "/", "~")) or "*" in value:
        return None
    name, _ = split_revision(value)
    if name.lower().endswith(DATA_SUFFIXES) or os.sep in name.replace("/", "") or not HUB_ID.fullmatch(name):
        return None
    return name


def _cite(paper: tuple[str, str, str | None]) -> str:
    name, authors, arxiv = paper
    link = f", [arXiv {arxiv}](https://arxiv.org/abs/{arxiv})" if arxiv else ""
    return f"**{name}** ({authors}{link})"


def _method(cfg: TrainConfig, diffusion: bool) -> str:
    objective = Objective.from_config(cfg.loss, cfg.rpo)
    rpo = objective.is_rpo
    text = f"Trained with {_cite(LOSS_PAPERS[cfg.loss.type])}"
    if rpo:
        base = objective.base
        text += f" in mode `{cfg.rpo.mode}`, on the pairwise loss `{base}`, {_cite(LOSS_PAPERS[base])}"
    else:
        text += f" (`loss.type: {cfg.loss.type}`)"
    if diffusion:
        text += (f", in its diffusion form {_cite(DIFFUSION_PAPERS['rpo' if rpo else 'dpo'])}: the log-ratios "
                 "are the UNet's denoising errors against those of the frozen reference")  # fmt: skip
    return text + "."


def _hyperparameters(
    cfg: TrainConfig, diffusion: bool, steps: int, processes: int, lora_targets: list[str]
) -> dict[str, object]:
    loss, lora = cfg.loss, cfg.lora
    objective = Objective.from_config(cfg.loss, cfg.rpo)
    rows: dict[str, object] = {"loss": loss.type, "β": loss.beta}
    if objective.is_rpo:
        rows.update({"RPO mode": cfg.rpo.mode, "RPO base loss": cfg.rpo.base_loss,
                     "RPO temperature": cfg.rpo.temperature})  # fmt: skip
        if cfg.rpo.mode == "diagonal":
            rows["RPO diagonal weight"] = cfg.rpo.diagonal_weight
    if objective.base in SMOOTHED:
        rows["label smoothing ε"] = loss.label_smoothing
    if objective.reference_free:  # SimPO's target margin
        rows["γ"] = loss.gamma
    if loss.sft_weight:
        rows["SFT weight"] = loss.sft_weight
    rows.update({
        "optimizer": cfg.optimizer, "learning rate": cfg.learning_rate, "lr schedule": cfg.lr_scheduler,
        "warmup steps": cfg.warmup_steps, "weight decay": cfg.weight_decay, "max grad norm": cfg.max_grad_norm,
        "steps": steps, "batch size per process": cfg.batch_size,
        "gradient accumulation": cfg.gradient_accumulation_steps, "processes": processes,
        "effective batch size": cfg.batch_size * cfg.gradient_accumulation_steps * processes,
        "weights dtype": cfg.torch_dtype, "mixed precision": cfg.mixed_precision or "no", "seed": cfg.seed,
    })  # fmt: skip
    if diffusion:
        dc = cfg.diffusion
        rows.update({"resolution": dc.resolution, "prompt dropout": dc.prompt_dropout,
                     "random flip": dc.random_flip, "EMA decay": dc.ema_decay})  # fmt: skip
    else:
        rows.update({"max length": cfg.max_length, "max prompt length": cfg.max_prompt_length})
    if lora is not None:
        rows.update({"LoRA r": lora.r, "LoRA alpha": lora.alpha, "LoRA dropout": lora.dropout,
                     "LoRA target modules": ", ".join(lora_targets)})  # fmt: skip
    return rows


def _table(header: tuple[str, str], rows: dict[str, object]) -> str:
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    return "\n".join([*lines, *(f"| {k} | {cell(v)} |" for k, v in rows.items())])


def _usage(cfg: TrainConfig, base: str, diffusion: bool, sdxl: bool, location: str) -> str:
    """A snippet that loads the model from ``location``; ``base``: the base model's from_pretrained arguments."""
    if diffusion:
        pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
        if cfg.lora is not None:
            code = (f"from diffusers import {pipeline}\n\npipe = {pipeline}.from_pretrained({base})\n"
                    f'pipe.load_lora_weights("{location}")')  # fmt: skip
        else:
            code = (f"from diffusers import {pipeline}, UNet2DConditionModel\n\n"
                    f'unet = UNet2DConditionModel.from_pretrained("{location}", subfolder="unet")\n'
                    f"pipe = {pipeline}.from_pretrained({base}, unet=unet)")  # fmt: skip
        return f'```python\n{code}\nimage = pipe("a prompt").images[0]\n```'
    if cfg.lora is None:
        code = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{location}")')  # fmt: skip
    else:
        code = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({base})\n"
                f'model = PeftModel.from_pretrained(base, "{location}")')  # fmt: skip
    text = f'```python\n{code}\ntokenizer = AutoTokenizer.from_pretrained("{location}")\n```'
    if cfg.lora is not None and cfg.lora.merge:
        text += ("\n\n`merged/` holds the adapter merged into the base weights, a plain transformers model: "
                 f'`AutoModelForCausalLM.from_pretrained("{location}", subfolder="merged")`.')  # fmt: skip
    return text


def write_model_card(folder: Path, cfg: TrainConfig, source: ModelSource | None, metrics: dict[str, float], *,
                     diffusion: bool, steps: int, processes: int = 1, sdxl: bool = False, location: str = "final",
                     model: nn.Module | None = None) -> Path:  # fmt: skip
    """Write ``folder/README.md``: Hub metadata, method, hyperparameters, final metrics, how to load the model
    (from ``location``), and for diffusion the last sample grid, copied beside it.

    ``source``: the resolved base model; only a hub model goes into the metadata (a folder is named in the text).
    ``model``: the trained model, whose adapter names the modules LoRA was applied to.
    """
    folder = Path(folder)
    lora_targets: list[str] = []
    if cfg.lora is not None:  # as applied (the default targets depend on the modality)
        adapter = getattr(model, "peft_config", {}).get("default")
        targets = adapter.target_modules if adapter is not None else cfg.lora.targets("diffusion" if diffusion else "text")
        lora_targets = sorted(targets)
    hub = source is not None and source.is_hub
    base_name = source.name if source is not None else cfg.model
    base_args = f'"{base_name}"' + (f', revision="{source.revision}"' if hub and source.revision else "")
    datasets = list(dict.fromkeys(d for d in map(hub_dataset_id, (cfg.dataset, cfg.eval_dataset)) if d))
    objective = Objective.from_config(cfg.loss, cfg.rpo)
    method = "rpo" if objective.is_rpo else "dpo"
    tags = ["mmpref", method, objective.base]
    if cfg.lora is not None:
        tags.append("lora")
    if diffusion:
        family = "stable-diffusion-xl" if sdxl else "stable-diffusion"
        tags += ["text-to-image", family, f"diffusion-{method}"]
        library = "diffusers"
    else:
        library = "peft" if cfg.lora is not None else "transformers"  # as peft's own cards name adapters
    data = ModelCardData(
        base_model=base_name if hub else None, datasets=datasets or None, library_name=library,
        tags=list(dict.fromkeys(tags)), pipeline_tag="text-to-image" if diffusion else "text-generation",
    )  # fmt: skip

    kind = "A LoRA adapter for" if cfg.lora is not None else "A fine-tune of"
    trained_on = f"`{cfg.dataset}`"
    if cfg.eval_dataset:
        trained_on += f" (evaluated on `{cfg.eval_dataset}`)"
    elif isinstance(cfg.eval_split, str):
        trained_on += f" (evaluated on its `{cfg.eval_split}` split)"
    elif cfg.eval_split:
        trained_on += f" (evaluated on a held-out {cfg.eval_split:.0%} of it)"
    settings = _table(("setting", "value"), _hyperparameters(cfg, diffusion, steps, processes, lora_targets))
    sections = [
        f"# {cfg.hub_model_id or Path(cfg.output_dir).resolve().name}",
        f"{kind} `{base_name}`, preference-trained with mmpref on {trained_on}.",
        f"## Method\n\n{_method(cfg, diffusion)}",
        f"## Hyperparameters\n\n{settings}",
        "## Final evaluation\n\n"
        + (_table(("metric", "value"), metrics) if metrics else "No evaluation data was configured."),
        f"## Usage\n\n{_usage(cfg, base_args, diffusion, sdxl, location)}",
    ]
    grid = Path(cfg.output_dir) / "samples" / "latest.png"
    if diffusion and grid.is_file():
        shutil.copyfile(grid, folder / SAMPLES_FILE)
        sections.append("## Samples\n\nOne row per prompt: the base model's image, then this model's, from the "
                        f"same seed (`samples.prompts`).\n\n![samples]({SAMPLES_FILE})")  # fmt: skip
    path = folder / "README.md"
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n").save(path)
    return path


def push_to_hub(folder: Path, cfg: TrainConfig) -> str:
    """Create ``cfg.hub_model_id`` if needed and upload ``folder`` to it; returns the repository id.

    Raises :class:`HubUploadError` naming the repository; ``folder`` stays complete on disk either way.
    """
    from huggingface_hub import HfApi

    api, repo = HfApi(), cfg.hub_model_id
    message = f"mmpref: {cfg.loss.type} training run {Path(cfg.output_dir).resolve().name}"
    try:
        repo = api.create_repo(repo, private=cfg.hub_private, exist_ok=True).repo_id  # NAME -> USER/NAME
        api.upload_folder(folder_path=folder, repo_id=repo, commit_message=message)
    except Exception as exc:  # network, login, permissions, quota: the cause stays chained
        raise HubUploadError(
            f"push_to_hub: uploading {folder} to the Hub repository {repo} failed ({exc}); the trained model "
            f"is saved there: upload it later with `hf upload {repo} {folder}`"
        ) from exc
    return repo
