"""Configs of ``mmpref synth``, ``mmpref score`` and ``mmpref eval-reward`` (docs/design.md §8).

Same style as :mod:`mmpref.training.config`: every key is a dataclass field, YAML files plus
``dotted.key=value`` overrides, and :class:`ConfigError` naming the key for anything wrong.

A YAML file holds either one command's keys at the top level, or sections ``synth:``,
``score:`` and ``eval:`` so one file (e.g. ``configs/rdpo/safety.yaml``) drives all three
commands; each command then reads its own section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpref.training.config import DTYPES as TORCH_DTYPES
from mmpref.training.config import ConfigError, _build, apply_overrides, read_yaml

SECTIONS = ("synth", "score", "eval")
PROMPT_FORMATS = ("chat", "text")
DTYPES = tuple(TORCH_DTYPES)
RULE_PREFIX = "rule:"

DEFAULT_CRITIQUE = (
    "Point out concretely where your previous answer falls short of this principle: {principle}"
)
DEFAULT_REVISION = (
    "Now rewrite your previous answer, using the critique, so that it fully follows this principle: "
    "{principle}. Reply with the rewritten answer only."
)


# the rule rewards (mmpref.rdpo.reward.RuleReward), by name: what each one counts
RULES = {
    "polite": "number of distinct politeness markers present minus number of distinct rude markers present",
    "keyword": "number of distinct rule.keywords present minus number of distinct rule.forbidden present",
}


@dataclass
class GenerationConfig:
    """Sampling for ``model.generate`` (left-padded batches)."""

    max_new_tokens: int = 256
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0  # every batch is seeded from this, so a rerun samples the same text
    batch_size: int = 8


@dataclass
class RuleConfig:
    """Word lists of the ``rule:keyword`` reward (``rule:polite`` has fixed lists)."""

    keywords: list[str] = field(default_factory=list)  # +1 for each distinct one present
    forbidden: list[str] = field(default_factory=list)  # −1 for each distinct one present


@dataclass
class SynthConfig:
    teacher: str = ""  # local causal-LM folder
    prompts: list[str] = field(default_factory=list)  # inline prompts
    prompts_file: str | None = (
        None  # .txt (one prompt a line) or .jsonl/.json/.parquet with `prompt` (+ `id`)
    )
    output: str = "runs/rdpo/synth.jsonl"  # dropped rows go to <stem>.dropped.jsonl beside it
    principle: str = ""  # what the critique checks and the revision follows: {principle}
    system_prompt: str | None = None  # teacher's system turn (not stored in the dataset)
    prompt_templates: list[str] = field(default_factory=lambda: ["{prompt}"])  # prompt i uses template i % n
    critique_template: str = DEFAULT_CRITIQUE  # placeholders: {principle} {prompt} {answer}
    revision_template: str = DEFAULT_REVISION  # placeholders: {principle} {prompt} {answer} {critique}
    prompt_format: str = "chat"  # dataset `prompt`: chat = [{"role": "user", ...}], text = plain string
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    torch_dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class ScoreConfig:
    input: str = ""  # paired dataset: .jsonl/.json/.parquet or a save_to_disk folder
    output: str | None = None  # JSON Lines; default <input stem>.scored.jsonl
    reward: str = ""  # local AutoModelForSequenceClassification folder (num_labels=1) or rule:NAME
    rule: RuleConfig = field(default_factory=RuleConfig)
    batch_size: int = 8
    max_length: int = 1024  # reward-model tokens per (prompt, response); the prompt's start is cut first
    on_bad_rows: str = "error"  # error | skip: rows training would refuse (empty text, chosen == rejected)
    device: str = "auto"
    torch_dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class EvalRewardConfig:
    policy: str = ""  # the trained student folder (e.g. output_dir/final)
    reference: str = ""  # the model it started from
    prompts: list[str] = field(default_factory=list)  # held-out prompts
    prompts_file: str | None = None
    reward: str = ""  # as in score
    rewards: list[str] = field(default_factory=list)  # more judges beside `reward` (reward models or rule:NAME)
    rule: RuleConfig = field(default_factory=RuleConfig)
    samples_per_prompt: int = 1
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=128))
    prompt_format: str = "chat"  # how string prompts reach both models (chat template or raw text)
    max_length: int = 1024  # reward-model tokens; with `preferences`, also the tokens of a row (as in training)
    preferences: str | None = None  # held-out paired file (prompt, chosen, rejected): implicit reward accuracy
    max_prompt_length: int = 256  # with `preferences`: prompt tokens of a row, as mmpref train's key
    bootstrap_samples: int = 1000  # resamples of the prompts for the confidence interval
    confidence: float = 0.95
    output: str = "runs/rdpo/eval_reward.json"
    device: str = "auto"
    torch_dtype: str = "float32"
    trust_remote_code: bool = False


# ------------------------------------------------------------------------------------------ loading


def read_section(path: str | Path | None, section: str, overrides: list[str] = ()) -> dict:
    """The mapping for one command: the file's ``section:`` if it has sections, else the whole file."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path)
        if any(k in SECTIONS for k in data):
            unknown = sorted(set(data) - set(SECTIONS))
            if unknown:
                raise ConfigError(f"{unknown[0]}: unknown key; a sectioned file holds {', '.join(SECTIONS)}")
            if section not in data:
                raise ConfigError(f"{section}: missing section in {path}")
            data = data[section] or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{section}: must be a mapping of keys")
    return apply_overrides(dict(data), overrides)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}, got {value!r}")


def _folder(key: str, value: str, what: str) -> None:
    """``value`` names a transformers model: a hub id (``ORG/NAME[@rev]``) or a folder (:mod:`mmpref.hub`)."""
    from mmpref.hub import resolve_model

    resolve_model(key, value, what=what)


def _device(key: str, value: str) -> None:
    if value not in ("auto", "cpu", "mps") and not value.startswith("cuda"):
        raise ConfigError(f"{key}: must be auto, cpu, mps, cuda or cuda:N, got {value!r}")


def _generation(gen: GenerationConfig) -> None:
    for key in ("max_new_tokens", "batch_size", "temperature"):
        if not getattr(gen, key) > 0:
            raise ConfigError(f"generation.{key}: must be > 0, got {getattr(gen, key)!r}")
    if not 0 < gen.top_p <= 1:
        raise ConfigError(f"generation.top_p: must be in (0, 1], got {gen.top_p!r}")


def _prompts(prompts: list[str], prompts_file: str | None) -> None:
    if not prompts and not prompts_file:
        raise ConfigError("prompts: give prompts inline (prompts: [...]) or a prompts_file")
    if prompts_file and not Path(prompts_file).exists():
        raise ConfigError(f"prompts_file: no such file {prompts_file}")


def _reward(key: str, value: str, rule: RuleConfig) -> None:
    if not value:
        raise ConfigError(
            f"{key}: required (a local reward-model folder or rule:NAME, NAME in {', '.join(RULES)})"
        )
    if value.startswith(RULE_PREFIX):
        name = value[len(RULE_PREFIX) :]
        if name not in RULES:
            choices = ", ".join(RULE_PREFIX + r for r in RULES)
            raise ConfigError(f"{key}: unknown rule {name!r}; choose one of {choices} (or a model folder)")
        if name == "keyword" and not (rule.keywords or rule.forbidden):
            raise ConfigError("rule.keywords: rule:keyword needs rule.keywords and/or rule.forbidden")
        return
    _folder(key, value, "a reward model saved for AutoModelForSequenceClassification, or rule:NAME")


def _common(cfg: Any) -> None:
    _device("device", cfg.device)
    _choice("torch_dtype", cfg.torch_dtype, DTYPES)


def validate_synth(cfg: SynthConfig) -> SynthConfig:
    _folder("teacher", cfg.teacher, "the teacher: a causal LM")
    _prompts(cfg.prompts, cfg.prompts_file)
    if not cfg.prompt_templates:
        raise ConfigError("prompt_templates: needs at least one template, e.g. ['{prompt}']")
    for i, t in enumerate(cfg.prompt_templates):
        if "{prompt}" not in t:
            raise ConfigError(f"prompt_templates[{i}]: must contain the placeholder {{prompt}}")
    uses_principle = "{principle}" in cfg.critique_template + cfg.revision_template
    if uses_principle and not cfg.principle.strip():
        raise ConfigError("principle: required, the critique/revision templates use {principle}")
    for key in ("critique_template", "revision_template"):
        if not getattr(cfg, key).strip():
            raise ConfigError(f"{key}: must not be empty")
    if not cfg.output:
        raise ConfigError("output: required (a .jsonl path)")
    _choice("prompt_format", cfg.prompt_format, PROMPT_FORMATS)
    _generation(cfg.generation)
    _common(cfg)
    return cfg


def validate_score(cfg: ScoreConfig) -> ScoreConfig:
    if not cfg.input:
        raise ConfigError("input: required (the paired dataset to score, e.g. the synth output)")
    if not Path(cfg.input).exists():
        raise ConfigError(f"input: no such file or folder {cfg.input}")
    _reward("reward", cfg.reward, cfg.rule)
    if cfg.output is not None and Path(cfg.output).resolve() == Path(cfg.input).resolve():
        raise ConfigError("output: must differ from input (scores are appended to a new file)")
    for key in ("batch_size", "max_length"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {getattr(cfg, key)!r}")
    _choice("on_bad_rows", cfg.on_bad_rows, ("error", "skip"))
    _common(cfg)
    return cfg


def validate_eval(cfg: EvalRewardConfig) -> EvalRewardConfig:
    _folder("policy", cfg.policy, "the trained student")
    _folder("reference", cfg.reference, "the model the student started from")
    _prompts(cfg.prompts, cfg.prompts_file)
    if cfg.reward or not cfg.rewards:
        _reward("reward", cfg.reward, cfg.rule)
    for i, spec in enumerate(cfg.rewards):
        _reward(f"rewards[{i}]", spec, cfg.rule)
    for key in ("samples_per_prompt", "bootstrap_samples", "max_length", "max_prompt_length"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {getattr(cfg, key)!r}")
    if cfg.preferences is not None and not Path(cfg.preferences).exists():
        raise ConfigError(f"preferences: no such file or folder {cfg.preferences}")
    if cfg.preferences is not None and cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError("max_prompt_length: must be smaller than max_length")
    if not 0 < cfg.confidence < 1:
        raise ConfigError(f"confidence: must be in (0, 1), got {cfg.confidence!r}")
    _choice("prompt_format", cfg.prompt_format, PROMPT_FORMATS)
    _generation(cfg.generation)
    _common(cfg)
    return cfg


_KINDS = {
    "synth": (SynthConfig, validate_synth),
    "score": (ScoreConfig, validate_score),
    "eval": (EvalRewardConfig, validate_eval),
}


def load_rdpo_config(section: str, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Build and check the config of one command: ``section`` is synth, score or eval."""
    cls, validate = _KINDS[section]
    return validate(_build(cls, read_section(path, section, list(overrides))))
