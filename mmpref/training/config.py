"""Run configuration: YAML files plus ``dotted.key=value`` overrides, checked before anything loads.

Every key is a dataclass field below, so the defaults and the documentation live in one place.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mmpref.errors import ConfigError as ConfigError  # re-exported: configs raise it
from mmpref.losses import Objective


@dataclass
class LossConfig:
    type: str = "sigmoid"  # one of LOSS_TYPES, or "rpo"
    beta: float = 0.1
    label_smoothing: float = 0.0  # ε of robust / cdpo
    gamma: float = 0.5  # SimPO target margin γ
    offset_alpha: float = 1.0  # ODPO: Δ_r = α·log(s_w − s_l) from score columns
    reward_temperature: float = 1.0  # rDPO: p = σ((s_w − s_l)/τ_r) from score columns
    sft_weight: float = 0.0  # NLL on the chosen response (TRL: the "sft" loss_type; formerly rpo_alpha)


@dataclass
class RPOConfig:
    mode: str = "paired"  # paired | unpaired | diagonal
    temperature: float = 0.5
    diagonal_weight: float = 0.8
    base_loss: str = "sigmoid"
    embedding_model: str | None = None  # text: sentence-transformers hub id or folder; None: the packaged all-MiniLM-L6-v2
    embedding: str = "image+text"  # diffusion: CLIP embedding of the text, the image, or the mean of both
    clip_model: str | None = None  # diffusion: open_clip hub id (ORG/NAME), local-dir: folder, or architecture name
    clip_weights: str | None = None  # diffusion: local checkpoint file for clip_model
    global_batch: bool = False  # contrast matrix over the batch of all processes
    balance_unpaired: bool = True  # unpaired rows: every batch holds as many desirable as undesirable rows


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # modules to adapt; None: the modality's DEFAULT_TARGETS (text: the attention projections q_proj, k_proj,
    # v_proj, o_proj of transformers' LMs; diffusion: the UNet's attention to_q, to_k, to_v, to_out.0).
    # A list is used as given.
    target_modules: list[str] | None = None
    merge: bool = False  # also save a merged full model under final/merged

    DEFAULT_TARGETS: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "text": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "diffusion": ("to_q", "to_k", "to_v", "to_out.0"),
    }

    def targets(self, modality: str) -> list[str]:
        """The modules LoRA adapts in a model of ``modality`` ("text" or "diffusion")."""
        if self.target_modules is not None:
            return list(self.target_modules)
        return list(self.DEFAULT_TARGETS[modality])


@dataclass
class DiffusionConfig:
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    prompt_dropout: float = 0.2  # probability of an empty caption (Diffusion-DPO)
    # VAE latents and text-encoder outputs, computed once per row and cached: lazy (when a batch first reads the
    # row), ahead (every row before step 1), off (encoded at every step, as diffusers' example); true = lazy
    cache_latents: str = "lazy"
    attention: str = "sdpa"  # sdpa | xformers
    ema_decay: float = 0.0  # 0: no EMA of the trained weights
    eval_noise_draws: int = 1  # evaluation: ℓ of each pair averaged over this many fixed (ε, t) draws


@dataclass
class SampleConfig:
    """Diffusion: images generated at every evaluation (start, every ``eval_every`` steps, end), saved under
    ``output_dir/samples`` with a reference-vs-trained grid, and scored for style when ``style_refs`` is set."""

    prompts: list[str] = field(default_factory=list)  # fixed prompts; none: no sampling during training
    seed: int = 0  # prompt i uses seed + i at every evaluation, so steps are comparable
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    style_refs: str | None = None  # folder of style reference images: adds samples/style_score
    style_names: list[str] = field(default_factory=list)  # candidate styles: adds samples/style_accuracy
    style_target: str | None = None  # which of style_names is the trained style
    clip_model: str | None = None  # scoring CLIP (hub id, local-dir: or open_clip name); default: rpo.clip_model
    clip_weights: str | None = None  # local checkpoint file for clip_model; default: rpo.clip_weights
    # image preference scorers of mmpref.metrics.scorers (pickscore, hpsv2, hpsv21, imagereward, aesthetic,
    # clipscore): samples/<name>, samples/reference_<name> and samples/<name>_win_rate at every evaluation
    scorers: list[str] = field(default_factory=list)
    scorer_models: dict = field(default_factory=dict)  # scorer -> hub id, folder or checkpoint; default: the authors'


@dataclass
class TrainConfig:
    model: str = ""  # a hub id (ORG/NAME, optionally ORG/NAME@revision) or a local folder
    revision: str | None = None  # hub revision (branch, tag or commit) of `model`
    modality: str = "auto"  # auto (diffusion when the model has a model_index.json) | text | diffusion
    dataset: str = ""  # hub dataset id, a file datasets reads (json/jsonl/parquet/csv/arrow), a folder, a glob
    dataset_config: str | None = None  # the hub dataset's configuration (load_dataset's `name`)
    dataset_revision: str | None = None  # hub revision of `dataset` / `eval_dataset`
    train_split: str = "train"
    # read `dataset` as a stream (datasets' IterableDataset: nothing downloaded ahead, a shuffle buffer, each
    # process its own shards); needs max_steps, a named eval split or eval_dataset, no precomputed reference
    streaming: bool = False
    shuffle_buffer: int = 10_000  # rows of the stream's shuffle buffer
    eval_dataset: str | None = None  # same forms as `dataset`; default: `dataset` itself with eval_split
    eval_split: str | float = 0.0  # a split name of the eval data, or a held-out share (0..1) of `dataset`
    image_root: str | None = None  # relative image paths resolve here (default: the dataset file's folder)
    confine_image_paths: bool = False  # untrusted data: image paths must stay inside that folder
    output_dir: str = "runs/mmpref"
    loss: LossConfig = field(default_factory=LossConfig)
    rpo: RPOConfig = field(default_factory=RPOConfig)
    lora: LoraConfig | None = None
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    samples: SampleConfig = field(default_factory=SampleConfig)
    precompute_ref: bool = True
    max_steps: int | None = None  # optimizer steps; default: from num_epochs
    num_epochs: float | None = None  # passes over the training data (default 3, as TRL) when max_steps is unset
    batch_size: int = 4
    eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    optimizer: str = (
        "adamw"  # adamw | rmsprop (the RPO paper's choice) | adafactor | adamw8bit (bitsandbytes)
    )
    lr_scheduler: str = "linear"  # any transformers.get_scheduler name
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None  # no | fp16 | bf16; unset: what `accelerate launch` / its config says
    torch_dtype: str = "float32"  # float32 | bfloat16 | float16
    gradient_checkpointing: bool = False
    max_length: int = 512
    max_prompt_length: int = 256
    truncation_mode: str = "keep_end"  # keep_end | keep_start, for the prompt
    # conversational rows: the Jinja chat template to render them with (a template string, or a .jinja file),
    # in place of the tokenizer's own; needed when the tokenizer has none (a base model)
    chat_template: str | None = None
    # LM head over this many answer positions at a time, recomputed in backward: the [tokens, vocabulary]
    # logits never exist whole; null: as many as keep a chunk's logits within 2^25 (1024 at a 32k vocabulary,
    # 220 at 151,936); 0: all at once
    lm_head_chunk_size: int | None = None
    on_bad_rows: str = "error"  # error | skip
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the start and the end only
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    # before step 1 the run's checkpoints and final/ are estimated against output_dir's free space: too little is a
    # warning, or with true an error (exit 2) before training starts
    fail_on_low_disk: bool = False
    nonfinite: str = "stop"  # a NaN/inf loss or gradient: stop the run, or skip the optimizer step
    max_skipped_steps: int = 10  # nonfinite: skip stops the run once more steps than this were skipped
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # any Accelerate tracker(s), all, none
    trust_remote_code: bool = False
    push_to_hub: bool = False  # upload final/ (model card included) to hub_model_id at the end
    hub_model_id: str | None = None  # ORG/NAME (or NAME under your account)
    hub_private: bool = False


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # torch_dtype names

CHOICES = {
    "optimizer": ("adamw", "rmsprop", "adafactor", "adamw8bit"),
    "modality": ("auto", "text", "diffusion"),
    "rpo.embedding": ("text", "image", "image+text"),
    "diffusion.attention": ("sdpa", "xformers"),
    "diffusion.cache_latents": ("lazy", "ahead", "off"),
    "mixed_precision": (None, "no", "fp16", "bf16"),
    "torch_dtype": tuple(DTYPES),
    "truncation_mode": ("keep_end", "keep_start"),
    "on_bad_rows": ("error", "skip"),
    "nonfinite": ("stop", "skip"),
}
POSITIVE = ("batch_size", "eval_batch_size",
            "gradient_accumulation_steps", "learning_rate", "max_length", "max_prompt_length",
            "keep_checkpoints", "diffusion.resolution",
            "diffusion.eval_noise_draws", "samples.num_inference_steps", "log_every", "shuffle_buffer")  # fmt: skip
NON_NEGATIVE = ("warmup_steps", "weight_decay", "max_grad_norm", "eval_every", "save_every",
                "max_skipped_steps", "lm_head_chunk_size")  # fmt: skip


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, value, inner[0])
        for tp in inner:  # several types (eval_split: a name or a share): the first that takes the value
            try:
                return _coerce(key, value, tp)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(t.__name__ for t in inner)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # ints are floats too; YAML reads 1e-6 (no dot) as a string
            value = float(value)
        except (ValueError, OverflowError):
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads `no` / `yes` as booleans
        return "yes" if value else "no"
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; valid keys here: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()})


def _get(cfg: TrainConfig, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range and consistency checks that the types alone do not express."""
    dc = cfg.diffusion  # YAML reads true / false as booleans, which the str key receives as yes / no
    dc.cache_latents = {"yes": "lazy", "true": "lazy", "no": "off", "false": "off"}.get(dc.cache_latents, dc.cache_latents)
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            names = ", ".join(str(a) for a in allowed if a is not None)
            raise ConfigError(f"{key}: must be one of {names}, got {_get(cfg, key)!r}")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if _get(cfg, key) is not None and _get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)!r}")
    for problem in Objective.from_config(cfg.loss, cfg.rpo).problems():  # the loss and rpo sections
        raise ConfigError(problem)
    if not 0 <= cfg.diffusion.prompt_dropout < 1:
        raise ConfigError(
            f"diffusion.prompt_dropout: must be in [0, 1), got {cfg.diffusion.prompt_dropout!r}"
        )
    if not 0 <= cfg.diffusion.ema_decay < 1:
        raise ConfigError(f"diffusion.ema_decay: must be in [0, 1), got {cfg.diffusion.ema_decay!r}")
    sc = cfg.samples
    if sc.style_refs and not (sc.clip_model or cfg.rpo.clip_model):
        raise ConfigError("samples.clip_model: needed to score samples against samples.style_refs "
                          "(an open_clip name with samples.clip_weights, or local-dir:FOLDER)")  # fmt: skip
    if sc.style_names and sc.style_target not in sc.style_names:
        raise ConfigError(f"samples.style_target: must be one of samples.style_names, got {sc.style_target!r}")
    from mmpref.metrics.scorers import SCORERS

    for name in sc.scorers:
        if name not in SCORERS:
            raise ConfigError(f"samples.scorers: unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    for name in sc.scorer_models:
        if name not in sc.scorers:
            raise ConfigError(f"samples.scorer_models: {name!r} is not one of samples.scorers ({sc.scorers})")
    for name, model in sc.scorer_models.items():
        if not isinstance(model, str) or not model:
            raise ConfigError(f"samples.scorer_models.{name}: expected a hub id, folder or checkpoint file, "
                              f"got {model!r}")  # fmt: skip
    if isinstance(cfg.eval_split, float) and not 0 <= cfg.eval_split < 1:
        raise ConfigError(f"eval_split: must be a split name or a share in [0, 1), got {cfg.eval_split!r}")
    if cfg.max_steps is not None and cfg.num_epochs is not None:
        raise ConfigError("num_epochs: set max_steps or num_epochs, not both")
    for key in ("max_steps", "num_epochs"):
        if _get(cfg, key) is not None and not _get(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)!r}")
    from accelerate.utils import LoggerType

    trackers = [t.value for t in LoggerType]
    for name in cfg.report_to:
        if name != "none" and name not in trackers:
            raise ConfigError(f"report_to: {name!r} is not a tracker Accelerate knows; one or more of "
                              f"{', '.join(trackers)}, or none")  # fmt: skip
    if cfg.push_to_hub and not cfg.hub_model_id:
        raise ConfigError("hub_model_id: push_to_hub needs the repository to upload to (ORG/NAME)")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError("max_prompt_length: must be smaller than max_length")
    if cfg.lora is not None:
        for key in ("r", "alpha"):
            if not getattr(cfg.lora, key) > 0:
                raise ConfigError(f"lora.{key}: must be > 0, got {getattr(cfg.lora, key)!r}")
        if not 0 <= cfg.lora.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout!r}")
        if cfg.lora.target_modules is not None and not cfg.lora.target_modules:
            raise ConfigError("lora.target_modules: needs at least one module name (or null: the modality's default)")
    from transformers import SchedulerType

    schedulers = [t.value for t in SchedulerType]
    if cfg.lr_scheduler not in schedulers:
        raise ConfigError(f"lr_scheduler: must be one of {', '.join(schedulers)}, got {cfg.lr_scheduler!r}")
    return cfg


DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".txt")  # names that are local files, not hub ids


@contextmanager
def custom_code_guard(path: str | Path, key: str = "trust_remote_code"):
    """Turn transformers' refusal to run a model folder's own Python code into a ConfigError.

    ``trust_remote_code`` is false unless a config says otherwise: a folder whose ``config.json`` maps
    its classes to bundled ``.py`` files (``auto_map``) then fails to load, and nothing of it runs.
    """
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(
            f"{key}: {path} contains custom code (auto_map in its config.json) and loading it would run that "
            "code; read it first, then set trust_remote_code: true only if you trust it"
        ) from exc


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"{item}: overrides take the form dotted.key=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{key.strip()}: the value {raw!r} is not valid YAML ({exc.problem}); quote it"
        ) from exc


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each ``dotted.key=value`` in the nested mapping ``data`` (in place) and return it."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """A YAML file's top-level mapping (empty file: {}), or a ConfigError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config: {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config, apply ``dotted.key=value`` overrides (values parsed as YAML), validate."""
    data = read_yaml(path) if path is not None else {}
    return validate(_build(TrainConfig, apply_overrides(data, overrides)))


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
