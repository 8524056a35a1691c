"""The plan of a run: every check that needs no model weights, made in seconds before anything heavy loads.

:func:`plan` resolves the modality once, reads only what is cheap (the model's marker files such as
``config.json`` / ``model_index.json``, the data's columns and row count as ``datasets`` reports them, the
launcher's environment through the Accelerator), decides the objective, the reference, the scale-out verdict and
the attention and optimizer backends, and raises every :class:`ConfigError` a config can earn, naming the key the
user set. Once a :class:`RunPlan` exists nothing else in a run raises ``ConfigError``: the stages after it
(:mod:`mmpref.training.loop`) only load, compute and train.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmpref import hub
from mmpref.data.errors import DataError
from mmpref.data.sources import RowSource, open_rows, open_stream
from mmpref.data.splits import config_sources, epoch_order, held_out_split
from mmpref.data.validation import label_tensor
from mmpref.errors import ConfigError
from mmpref.files import path_problem
from mmpref.hub import ModelSource
from mmpref.losses import Objective
from mmpref.training.config import DATA_SUFFIXES, TrainConfig
from mmpref.training.distributed import sharding

DEFAULT_EPOCHS = 3  # when neither max_steps nor num_epochs is set, as TRL's num_train_epochs
IMAGE_SCORE_COLUMNS = ("score_0", "score_1")
TEXT_SCORE_COLUMNS = ("score_chosen", "score_rejected")


@dataclass(frozen=True)
class DataPlan:
    """One source of rows as the plan opened it: the rows (memory-mapped Arrow, or a stream), what messages call
    them, their columns, their count (None for a stream) and their format (``paired`` | ``unpaired``)."""

    rows: RowSource | None  # None for a stream
    stream: Any  # (datasets.IterableDataset, name, folder) of ``streaming: true``, else None
    name: str
    columns: tuple[str, ...]
    num_rows: int | None
    format: str
    options: dict


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, decided before any weights load (module docstring).

    ``reference``: ``precomputed`` (text: the policy's log-probs before its first update, once), ``frozen_copy``
    (a frozen copy of the weights), ``adapters_off`` (LoRA: the same model with its adapters off) or ``none``
    (a reference-free loss). ``eval`` is the eval data of its own (or a named split), else None (a held-out
    share of ``train``, ``eval_split`` as a float, is drawn from the usable rows when the splits are prepared).
    """

    cfg: TrainConfig
    modality: str  # "text" | "diffusion"
    source: ModelSource | None  # None: the model was given already loaded (Python API)
    objective: Objective
    reference: str
    train: DataPlan
    eval: DataPlan | None
    processes: int
    sharding: str | None
    sdxl: bool = False
    chat_template: str | None = None  # the ``chat_template`` key's template, read once (a file's contents)
    given: dict | None = None  # the Python API's model / tokenizer (never datasets: the plan opened those)

    @property
    def streamed(self) -> bool:
        return self.train.stream is not None


def plan(cfg: TrainConfig, accelerator, given: dict | None = None) -> RunPlan:
    """Check everything about a run that needs no model weights and decide how it runs (module docstring).

    ``given``: the Python API's in-memory ``model``, ``tokenizer``, ``train_dataset``, ``eval_dataset``.
    Raises :class:`ConfigError` (the key named) or :class:`~mmpref.data.errors.DataError` (the file named).
    """
    given = {k: v for k, v in (given or {}).items() if v is not None}
    if not cfg.dataset and "train_dataset" not in given:
        raise ConfigError("dataset: required (a hub dataset id, or a local file, folder or glob)")
    source = None if "model" in given else model_source(cfg)
    modality = modality_of(cfg, source)
    objective = Objective.from_config(cfg.loss, cfg.rpo)
    for problem in objective.problems():
        raise ConfigError(problem)
    if (why := objective.supports(modality)) is not None:
        raise ConfigError(why)
    sdxl = False
    if modality == "diffusion":
        if {"model", "tokenizer"} & set(given):
            raise ConfigError("model: the diffusion task loads its pipeline from `model` (a hub id or folder)")
        sdxl = _check_pipeline(cfg, source)
        _check_attention(cfg)
        if objective.needs_embeddings:
            _check_clip(cfg)
    else:
        if "model" in given and "tokenizer" not in given:
            raise ConfigError("tokenizer: an already loaded model needs its tokenizer (train(..., tokenizer=))")
        if source is not None:
            _check_custom_code(cfg, source)
        if objective.needs_embeddings and cfg.rpo.embedding_model:
            hub.resolve_model("rpo.embedding_model", cfg.rpo.embedding_model, markers=hub.SENTENCE_TRANSFORMERS,
                              what="a sentence-transformers model")  # fmt: skip
    reference = _reference(cfg, modality, objective)
    check_scale_out(cfg, accelerator, frozen_reference=reference == "frozen_copy", text=modality == "text")
    if cfg.streaming:
        check_streaming(cfg, modality, objective)
    _check_local_data(cfg)
    check_output_dir(cfg)
    _check_optimizer(cfg)

    template = chat_template_text(cfg) if modality == "text" else None
    train, evaluation, held_out = _open_data(cfg, given, modality)
    for data in (train, evaluation):
        if data is not None:
            _check_columns(data, modality, objective)
            if modality == "text" and template is None:
                _check_chat_template(data, source, given.get("tokenizer"))
    run = RunPlan(cfg=cfg, modality=modality, source=source, objective=objective, reference=reference, train=train,
                  eval=evaluation, processes=accelerator.num_processes, sharding=sharding(accelerator), sdxl=sdxl, chat_template=template,
                  given={k: given[k] for k in ("model", "tokenizer") if k in given})  # fmt: skip
    if not run.streamed:  # rows as datasets counts them; bad rows are left out later (the schedule stage)
        size = len(held_out[0]) if held_out else train.num_rows
        labels = _labels(train, held_out) if cfg.rpo.balance_unpaired else None
        schedule_length(cfg, size, labels, run.processes, ConfigError)
    return run


# -- the model ----------------------------------------------------------------------------------------------
def model_source(cfg: TrainConfig) -> ModelSource:
    """``model`` resolved (a :class:`mmpref.hub.ModelSource`): a folder or hub id holding a model of ``modality``."""
    markers = {"text": hub.TRANSFORMERS, "diffusion": hub.DIFFUSERS_PIPELINE}.get(cfg.modality, hub.ANY_MODEL)
    return hub.resolve_model("model", cfg.model, revision=cfg.revision, markers=markers,
                             what="a transformers model or a diffusers pipeline")  # fmt: skip


def modality_of(cfg: TrainConfig, source: ModelSource | None) -> str:
    """``modality``, or for ``auto`` what the model's marker file says: a ``model_index.json`` is a diffusers
    pipeline, anything else (or a model given in memory) a causal LM."""
    if cfg.modality != "auto":
        return cfg.modality
    return "diffusion" if source is not None and source.marker == "model_index.json" else "text"


def _read_json(source: ModelSource, filename: str) -> dict:
    path = source.file(filename)
    try:
        return json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: {source.name}'s {filename} is not readable JSON ({exc})") from exc


def _check_pipeline(cfg: TrainConfig, source: ModelSource) -> bool:
    """The pipeline has a UNet; returns whether it is SDXL (a second text encoder, or a ``text_time`` UNet)."""
    index = _read_json(source, "model_index.json")
    if not index.get("unet"):
        raise ConfigError(f"model: {cfg.model} is not a diffusers pipeline with a UNet (model_index.json, unet/)")
    unet = _read_json(source, "unet/config.json")
    return bool(index.get("text_encoder_2")) or unet.get("addition_embed_type") == "text_time"


def _check_custom_code(cfg: TrainConfig, source: ModelSource) -> None:
    """A model whose ``config.json`` / ``tokenizer_config.json`` maps classes to its own Python files
    (``auto_map``) runs that code when it loads: refused unless ``trust_remote_code`` says otherwise."""
    if cfg.trust_remote_code:
        return
    for filename in ("config.json", "tokenizer_config.json"):
        if _read_json(source, filename).get("auto_map"):
            raise ConfigError(
                f"trust_remote_code: {source.name} contains custom code (auto_map in its {filename}) and loading "
                "it would run that code; read it first, then set trust_remote_code: true only if you trust it"
            )


def _check_clip(cfg: TrainConfig) -> None:
    """Diffusion-RPO weighs its contrasts by CLIP similarity: an open_clip model must be named and resolvable."""
    if not cfg.rpo.clip_model:
        raise ConfigError(
            "rpo.clip_model: Diffusion-RPO weights contrasts by CLIP similarity and needs an open_clip model: "
            "a local-dir: folder, or an architecture name plus rpo.clip_weights (a local checkpoint); "
            "or use rpo.mode=diagonal, which needs no embeddings"
        )
    hub.open_clip_name("rpo.clip_model", cfg.rpo.clip_model)


def _check_attention(cfg: TrainConfig) -> None:
    if cfg.diffusion.attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ConfigError("diffusion.attention: xformers is not installed (pip install 'mmpref[xformers]'); use "
                          "diffusion.attention=sdpa (PyTorch's fused attention, the default)")  # fmt: skip


def _check_optimizer(cfg: TrainConfig) -> None:
    if cfg.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("optimizer: adamw8bit needs bitsandbytes (pip install 'mmpref[bnb]')")


def _reference(cfg: TrainConfig, modality: str, objective: Objective) -> str:
    """Which reference the run uses (:class:`RunPlan`)."""
    if objective.reference_free:
        return "none"
    if modality == "text" and cfg.precompute_ref:
        return "precomputed"
    return "frozen_copy" if cfg.lora is None else "adapters_off"


# -- the launch ---------------------------------------------------------------------------------------------
def check_scale_out(cfg: TrainConfig, accelerator, *, frozen_reference: bool, text: bool) -> None:
    """What the sharded modes (:func:`~mmpref.training.distributed.sharding`) cannot run, named with the fix
    (:mod:`mmpref.training.distributed` explains why). ``frozen_reference``: the run would keep a frozen copy of
    the model as its reference; ``text``: a causal LM (``precompute_ref`` is available)."""
    mode = sharding(accelerator)
    if mode is None:
        return
    if mode.startswith("zero") and cfg.gradient_accumulation_steps != 1:
        raise ConfigError(
            f"gradient_accumulation_steps: must be 1 under DeepSpeed (got {cfg.gradient_accumulation_steps}); "
            "DeepSpeed steps at every backward here, so raise batch_size, or use DDP or FSDP to accumulate"
        )
    if mode.startswith("zero") and cfg.nonfinite == "skip":
        raise ConfigError("nonfinite: skip cannot skip DeepSpeed's steps (its engine steps inside backward)")
    if mode == "zero3" and accelerator.state.deepspeed_plugin.zero3_init_flag:
        raise ConfigError(
            "zero3_init_flag: set it to false in the Accelerate config (deepspeed_config); mmpref runs the "
            "reference pass and the frozen encoders before DeepSpeed shards the model, so models must load whole"
        )
    if mode == "zero3" and frozen_reference:
        fix = "lora (the reference is the base model with adapters off)"
        if text:
            fix = "precompute_ref: true (the default; reference log-probs computed once) or " + fix
        raise ConfigError(
            "reference: a frozen reference copy is not sharded by DeepSpeed ZeRO-3 (every GPU would hold a "
            f"whole second model); use {fix}, or ZeRO-2 / FSDP"
        )
    if mode in ("zero3", "fsdp") and cfg.lora is not None and cfg.lora.merge:
        raise ConfigError(
            f"lora.merge: merging needs the whole model in one process, not possible under {mode}; set "
            "lora.merge=false and merge the saved adapter afterwards (peft: merge_and_unload)"
        )


def check_output_dir(cfg: TrainConfig) -> None:
    """``output_dir`` takes files (created if missing; a probe file written and removed)."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"output_dir: cannot write to {out} ({exc.strerror or exc}); choose a writable folder"
        ) from exc


def check_streaming(cfg: TrainConfig, modality: str, objective: Objective) -> None:
    """What a streamed ``dataset`` cannot do, refused with the way out: a stream is read front to back, its
    length unknown and its rows without a place to come back to."""
    if cfg.max_steps is None:
        raise ConfigError("max_steps: a streamed dataset has no known length, so epochs cannot set the schedule; "
                          "set max_steps (or streaming: false)")  # fmt: skip
    if isinstance(cfg.eval_split, float) and cfg.eval_split:
        raise ConfigError("eval_split: a held-out share needs the rows counted first, which a stream does not do; "
                          "name an eval split (eval_split: test) or give eval_dataset (or streaming: false)")  # fmt: skip
    if modality == "text" and cfg.precompute_ref and not objective.reference_free:
        raise ConfigError("precompute_ref: the reference log-probs of a streamed dataset cannot be computed "
                          "before training (its rows arrive as training reads them); set precompute_ref: false, "
                          "which runs the frozen reference at every step (or streaming: false)")  # fmt: skip
    if modality == "diffusion" and cfg.diffusion.cache_latents != "off":
        raise ConfigError("diffusion.cache_latents: a stream's rows have no fixed place to cache them under; set "
                          "diffusion.cache_latents: off (VAE and text encoders run every step, as in diffusers' "
                          "example), or train from a local copy (streaming: false) to cache")  # fmt: skip
    if modality == "text" and objective.needs_embeddings:
        raise ConfigError("loss.type: RPO's prompt embeddings are computed once over the whole dataset, which a "
                          "stream does not allow; use rpo.mode: diagonal, another loss, or streaming: false")  # fmt: skip


# -- the data -----------------------------------------------------------------------------------------------
def _check_local_data(cfg: TrainConfig) -> None:
    for key in ("dataset", "eval_dataset"):
        value = getattr(cfg, key)
        # a missing local file is named here; a hub id or a glob is the data loader's to resolve
        if value and value.lower().endswith(DATA_SUFFIXES) and not Path(value).exists() and "*" not in value:
            raise ConfigError(f"{key}: no such file {value}")


def _open_data(cfg: TrainConfig, given: dict, modality: str):
    """The training and eval sources opened (a memory-mapped Arrow table, or a stream), and the positions of
    a held-out share."""
    (train_source, options), evaluation = config_sources(cfg, given.get("train_dataset"), given.get("eval_dataset"))
    train = _open(train_source, options, modality, stream=cfg.streaming)
    evald, held_out = None, None
    if evaluation is not None:
        evald = _open(*evaluation, modality, stream=False)
    elif cfg.eval_split:
        held_out = held_out_split(train.num_rows, cfg.eval_split, cfg.seed)
    return train, evald, held_out


def _open(source: Any, options: dict, modality: str, stream: bool) -> DataPlan:
    if stream:
        ds, name, folder = open_stream(source, **options)
        columns = tuple(ds.column_names or next(iter(ds)))
        return DataPlan(None, (ds, name, folder), name, columns, None, _format(name, columns, modality), options)
    rows = open_rows(source, **options)
    name, columns = str(rows.name), tuple(rows.dataset.column_names)
    if rows.dataset.num_rows == 0:
        raise DataError(f"{name}: no rows")
    return DataPlan(rows, None, name, columns, rows.dataset.num_rows, _format(name, columns, modality), options)


def _format(name: str, columns: tuple[str, ...], modality: str) -> str:
    if modality == "diffusion":
        return "paired"  # image rows are always pairs (jpg_0, jpg_1); their columns are checked when prepared
    from mmpref.data.text_formats import detect_format

    try:
        return detect_format(columns)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from exc


def _check_columns(data: DataPlan, modality: str, objective: Objective) -> None:
    """The rows can feed the objective: their format, and the score columns odpo / rdpo read."""
    if (why := objective.accepts(data.format)) is not None:
        raise ConfigError(f"{why} ({data.name} holds {data.format} rows)")
    if objective.needs_scores:
        wanted = IMAGE_SCORE_COLUMNS if modality == "diffusion" else TEXT_SCORE_COLUMNS
        if not all(c in data.columns for c in wanted):
            raise ConfigError(f"{objective.type_key}: {objective.base} needs {' and '.join(wanted)} in every row; "
                              f"{data.name} has the columns {', '.join(data.columns)}")  # fmt: skip


def chat_template_text(cfg: TrainConfig) -> str | None:
    """The ``chat_template`` key's template: the file it names (``.jinja``, or any existing file), else the string."""
    value = cfg.chat_template
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.suffix in (".jinja", ".j2") or (len(value) < 4096 and "{" not in value and path.exists()):
        if (problem := path_problem(path, "template file")) is not None:
            raise ConfigError(f"chat_template: {problem}")
        return path.read_text(encoding="utf-8")
    return value


def _has_chat_template(source: ModelSource | None, tokenizer) -> bool:
    """Whether the tokenizer (given, or the model's files) carries a chat template, read from its files only."""
    if tokenizer is not None:
        return bool(getattr(tokenizer, "chat_template", None))
    if source.file("chat_template.jinja") is not None or source.file("chat_template.json") is not None:
        return True
    return bool(_read_json(source, "tokenizer_config.json").get("chat_template"))


def _check_chat_template(data: DataPlan, source: ModelSource | None, tokenizer) -> None:
    """Conversational rows need a chat template: without the ``chat_template`` key, the tokenizer's own."""
    from mmpref.data.text_formats import is_conversation

    features = data.rows.dataset.features if data.rows is not None else getattr(data.stream[0], "features", None)
    columns = ("prompt", "chosen", "completion")
    if not features or not any(is_conversation(features[c]) for c in columns if c in features):
        return
    if _has_chat_template(source, tokenizer):
        return
    name = source.name if source is not None else "the given tokenizer"
    raise ConfigError(
        f"chat_template: {data.name} holds conversations (lists of messages), and {name} has no chat template to "
        "render them with (a base model's tokenizer); set chat_template: to a Jinja template (a string or a .jinja "
        "file), train a chat model, or give the rows as plain text"
    )


def _labels(train: DataPlan, held_out: tuple[list[int], list[int]] | None) -> torch.Tensor | None:
    """The ``label`` column of unpaired training rows (for the balanced epoch length), else None."""
    if train.format != "unpaired" or train.rows is None:
        return None
    labels = label_tensor(train.rows.dataset)
    return labels[held_out[0]] if held_out else labels


# -- the schedule -------------------------------------------------------------------------------------------
def schedule_length(cfg: TrainConfig, size: int, labels: torch.Tensor | None, processes: int,
                    error: type[Exception] = DataError) -> int:  # fmt: skip
    """``max_steps``, or the optimizer steps of ``num_epochs`` passes over ``size`` training rows (an epoch as
    :func:`~mmpref.data.splits.epoch_order` reads it: with ``labels``, balanced batches until the smaller side
    runs out); raises ``error`` when an epoch gives fewer batches per process than one optimizer step
    accumulates."""
    accum = cfg.gradient_accumulation_steps
    rows = len(epoch_order(size, cfg.seed, 0, labels, cfg.batch_size))
    per_epoch = rows // (cfg.batch_size * processes)
    if per_epoch < accum:
        raise error(
            f"dataset: {rows} rows give fewer than {accum} batches of {cfg.batch_size} per process "
            f"({processes} processes); lower batch_size or gradient_accumulation_steps, or add rows"
        )
    return cfg.max_steps or math.ceil((cfg.num_epochs or DEFAULT_EPOCHS) * (per_epoch // accum))

