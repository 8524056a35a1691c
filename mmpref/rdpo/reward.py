"""Rewards for rDPO: an external reward model or a rule, ``mmpref score`` and ``mmpref eval-reward``.

A reward maps (prompt, response) pairs to one float each. Two kinds (docs/design.md §8):

* a local ``AutoModelForSequenceClassification`` folder with ``num_labels=1``: the input is the
  reward model's chat template over [user prompt, assistant response] when it has one, else
  ``"<prompt>\\n\\n<response>"``; the score is the single logit.
* ``rule:NAME``: a deterministic word count, so the whole pipeline shows its effect on CPU
  with tiny random models (see :data:`RULES`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from mmpref.data import DataError, load_rows, prompt_text, validate_rows
from mmpref.data.text import bad_rows_error
from mmpref.hub import split_revision
from mmpref.metrics.stats import win_outcomes
from mmpref.metrics.stats import win_rate as stats_win_rate
from mmpref.rdpo.config import RULE_PREFIX, EvalRewardConfig, RuleConfig, ScoreConfig
from mmpref.rdpo.generation import (
    TORCH_DTYPES,
    Generator,
    Messages,
    Prompt,
    chunks,
    derive_seed,
    load_prompts,
    resolve_device,
    text_id,
)
from mmpref.rdpo.jsonl import PartialAppender, read_done, resume_rows
from mmpref.training.config import ConfigError, custom_code_guard

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- rules

POLITE_MARKERS = (
    "please",
    "thank you",
    "thanks",
    "sorry",
    "glad",
    "happy to help",
    "you're welcome",
    "appreciate",
    "kindly",
    "of course",
)
RUDE_MARKERS = (
    "stupid",
    "idiot",
    "dumb",
    "shut up",
    "whatever",
    "boring",
    "useless",
    "ridiculous",
    "waste of time",
    "go away",
)

RULES = {
    "polite": "number of distinct politeness markers present minus number of distinct rude markers present",
    "keyword": "number of distinct rule.keywords present minus number of distinct rule.forbidden present",
}


def _pattern(phrase: str) -> re.Pattern:
    """Whole-word, case-insensitive match of a phrase; any run of spaces between its words."""
    words = [re.escape(w) for w in phrase.lower().split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


class RuleReward:
    """score = #distinct ``plus`` phrases present − #distinct ``minus`` phrases present.

    Counting each phrase once (not every occurrence) keeps a student from gaming the rule by
    repeating one word. Curly apostrophes count as straight ones. The prompt is not used.
    """

    def __init__(self, name: str, plus: Sequence[str], minus: Sequence[str]):
        self.name = name
        self.plus = [_pattern(p) for p in plus if p.strip()]
        self.minus = [_pattern(p) for p in minus if p.strip()]

    def score_text(self, response: str) -> float:
        text = response.replace("\u2019", "'")
        return float(
            sum(bool(p.search(text)) for p in self.plus) - sum(bool(p.search(text)) for p in self.minus)
        )

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        return [self.score_text(r) for r in responses]

    def close(self) -> None:
        pass


class ModelReward:
    """A sequence-classification reward model (one logit) from a local folder, scored in batches."""

    def __init__(
        self,
        path: str,
        *,
        batch_size: int = 8,
        max_length: int = 1024,
        device: str = "auto",
        torch_dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name, self.batch_size, self.max_length = path, batch_size, max_length
        self.device = resolve_device(device)
        name, revision = split_revision(str(path))  # a hub id may pin a revision: ORG/NAME@rev
        with custom_code_guard(path):
            self.tokenizer = AutoTokenizer.from_pretrained(
                name, revision=revision, trust_remote_code=trust_remote_code
            )
            self.model = AutoModelForSequenceClassification.from_pretrained(
                name, revision=revision, dtype=TORCH_DTYPES[torch_dtype], trust_remote_code=trust_remote_code
            )
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # over-long inputs lose the start of the prompt
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.num_labels != 1:
            raise ConfigError(
                f"reward: {path} has num_labels={self.model.config.num_labels}; "
                "a reward model must output one score (num_labels=1)"
            )
        if self.model.config.pad_token_id is None:  # needed to find each row's last token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.templated = bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt: str | Messages, response: str) -> str:
        if not self.templated:
            return f"{prompt_text(prompt)}\n\n{response}"
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return self.tokenizer.apply_chat_template(
            turns + [{"role": "assistant", "content": response}], tokenize=False
        )

    @torch.no_grad()
    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        texts = [self.render(p, r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for batch in chunks(texts, self.batch_size):
            enc = self.tokenizer(
                batch,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=not self.templated,
            )
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
            scores += logits[:, 0].float().cpu().tolist()
        return scores

    def close(self) -> None:
        del self.model


class Reward(Protocol):
    name: str

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]: ...

    def close(self) -> None: ...


def load_reward(spec: str, rule: RuleConfig | None = None, **model_kwargs: Any) -> Reward:
    """``rule:polite`` / ``rule:keyword`` (with ``rule``'s lists) or a reward-model folder."""
    if spec.startswith(RULE_PREFIX):
        name = spec[len(RULE_PREFIX) :]
        if name == "polite":
            return RuleReward(spec, POLITE_MARKERS, RUDE_MARKERS)
        if name == "keyword":
            rule = rule or RuleConfig()
            return RuleReward(spec, rule.keywords, rule.forbidden)
        raise ConfigError(f"reward: unknown rule {name!r}; choose one of {', '.join(RULES)}")
    return ModelReward(spec, **model_kwargs)


# ------------------------------------------------------------------------------------------ score


@dataclass
class ScoreReport:
    output: Path
    total: int
    skipped: int  # already scored by an earlier run
    scored: int
    agree: int  # rows (all of output) where the reward prefers chosen: s_w > s_l
    mean_margin: float  # mean s_w − s_l over all of output

    def summary(self) -> str:
        n = self.skipped + self.scored
        return (
            f"score: {self.scored} rows scored, {self.skipped} already scored, output {self.output}\n"
            f"score: reward prefers chosen in {self.agree}/{n} rows; mean margin s_w − s_l = "
            f"{self.mean_margin:.4g}"
        )


def default_score_output(input_path: str | Path) -> Path:
    p = Path(input_path)
    return p.with_name(f"{p.stem if p.is_file() else p.name}.scored.jsonl")


def _rows_with_ids(path: str, on_bad_rows: str = "error") -> list[dict[str, Any]]:
    ds = load_rows(path)
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: score needs paired rows; missing columns {', '.join(missing)}")
    bad = validate_rows(ds.select_columns(["prompt", "chosen", "rejected"]), "paired")
    if bad and on_bad_rows == "error":  # rows training would refuse are not scored either
        raise bad_rows_error(Path(path), bad, ds.num_rows)
    if bad:
        logger.warning("%s: not scoring %d bad rows (on_bad_rows=skip); first: %s", path, len(bad), bad[0])
        ds = ds.select(sorted(set(range(ds.num_rows)) - {b.row for b in bad}), keep_in_memory=True)
    rows = ds.to_list()
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row.get("id") is None:  # a content hash, so a rerun finds the same id
            row["id"] = text_id([row["prompt"], row["chosen"], row["rejected"]])
        row["id"] = str(row["id"])
        if row["id"] in seen:
            raise DataError(f"{path}: row {i}: id {row['id']!r} appears more than once")
        seen.add(row["id"])
    return rows


def run_score(cfg: ScoreConfig, *, progress: bool = True) -> ScoreReport:
    """Add ``score_chosen`` / ``score_rejected`` to every row not yet in the output file."""
    rows = _rows_with_ids(cfg.input, cfg.on_bad_rows)
    output = Path(cfg.output) if cfg.output else default_score_output(cfg.input)
    done = {str(r["id"]) for r in resume_rows(output)}
    todo = [r for r in rows if r["id"] not in done]
    scored = 0
    out = PartialAppender(output)  # <output>.partial, renamed to output once every row is scored
    if todo:
        reward = load_reward(
            cfg.reward,
            cfg.rule,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            device=cfg.device,
            torch_dtype=cfg.torch_dtype,
            trust_remote_code=cfg.trust_remote_code,
        )
        bar = tqdm(
            total=len(rows), initial=len(rows) - len(todo), desc="score", unit="row", disable=not progress
        )
        with out, bar:
            for batch in chunks(todo, cfg.batch_size):
                prompts = [r["prompt"] for r in batch]
                values = reward.score(
                    prompts * 2, [r["chosen"] for r in batch] + [r["rejected"] for r in batch]
                )
                for r, s_w, s_l in zip(batch, values[: len(batch)], values[len(batch) :]):
                    out.write({**r, "score_chosen": s_w, "score_rejected": s_l})
                bar.update(len(batch))
            scored = out.count
        reward.close()
    out.commit()
    margins = [r["score_chosen"] - r["score_rejected"] for r in read_done(output)]
    return ScoreReport(
        output,
        total=len(rows),
        skipped=len(rows) - len(todo),
        scored=scored,
        agree=sum(m > 0 for m in margins),
        mean_margin=float(np.mean(margins)) if margins else float("nan"),
    )


# ------------------------------------------------------------------------------------ eval-reward


def sample_answers(
    model_path: str, prompts: list[Prompt], cfg: EvalRewardConfig, *, desc: str, progress: bool = True
) -> list[list[str]]:
    """``samples_per_prompt`` answers per prompt; the seed of a call depends only on the sample
    index and the batch position, so the student and the reference sample with the same seeds.

    Prompts are tokenized as ``mmpref train`` tokenizes them (no special tokens added beyond
    what the chat template writes), so the student sees the prompt format it was trained on.
    """
    gen = Generator(
        model_path, device=cfg.device, torch_dtype=cfg.torch_dtype, trust_remote_code=cfg.trust_remote_code
    )
    if cfg.prompt_format == "chat" and not gen.has_chat_template:
        raise ConfigError(
            f"prompt_format: 'chat' but {model_path} has no chat template; use prompt_format=text"
        )
    answers: list[list[str]] = [[] for _ in prompts]
    bs = cfg.generation.batch_size
    bar = tqdm(total=len(prompts) * cfg.samples_per_prompt, desc=desc, unit="answer", disable=not progress)
    with bar:
        for k in range(cfg.samples_per_prompt):
            for start in range(0, len(prompts), bs):
                batch = prompts[start : start + bs]
                texts = [_render(gen, p.text, cfg.prompt_format) for p in batch]
                seed = derive_seed(cfg.generation.seed, k, start)
                for i, answer in enumerate(
                    gen.generate(texts, cfg.generation, seed=seed, add_special_tokens=False)
                ):
                    answers[start + i].append(answer)
                bar.update(len(batch))
    gen.close()
    return answers


def _render(gen: Generator, prompt: str | Messages, prompt_format: str) -> str:
    """chat: the model's chat template (a string prompt is one user turn); text: the raw prompt."""
    if prompt_format == "text":
        return prompt_text(prompt)
    return gen.render_chat([{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt))


@dataclass
class WinRate:
    prompts: int
    samples_per_prompt: int
    wins: int
    ties: int
    losses: int
    win_rate: float  # ties count 0.5
    ci_low: float
    ci_high: float
    confidence: float
    mean_reward_policy: float
    mean_reward_reference: float

    def table(self, cfg: EvalRewardConfig) -> str:
        pct = f"{self.confidence:.0%}"
        rows = [
            ("policy", cfg.policy),
            ("reference", cfg.reference),
            ("reward", cfg.reward),
            ("comparisons", f"{self.prompts} prompts x {self.samples_per_prompt} samples"),
            ("mean reward policy", f"{self.mean_reward_policy:.4g}"),
            ("mean reward reference", f"{self.mean_reward_reference:.4g}"),
            ("wins / ties / losses", f"{self.wins} / {self.ties} / {self.losses}"),
            ("win rate (ties 0.5)", f"{self.win_rate:.3f}"),
            (f"{pct} bootstrap CI", f"[{self.ci_low:.3f}, {self.ci_high:.3f}]"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def win_rate(
    policy_rewards: np.ndarray,
    reference_rewards: np.ndarray,
    *,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> WinRate:
    """Rewards are (prompts, samples) arrays; sample k of both sides shares a seed and a prompt.

    Outcomes and interval are :func:`mmpref.metrics.stats.win_rate`'s: 1 / ½ / 0 per pair, the bootstrap
    resampling prompts (each prompt's mean outcome over its samples).
    """
    outcome = win_outcomes(torch.as_tensor(policy_rewards), torch.as_tensor(reference_rewards)).numpy()
    result = stats_win_rate(
        policy_rewards, reference_rewards, n_resamples=bootstrap_samples, confidence=confidence, seed=seed
    )
    return WinRate(
        prompts=outcome.shape[0],
        samples_per_prompt=outcome.shape[1],
        wins=int((outcome == 1).sum()),
        ties=int((outcome == 0.5).sum()),
        losses=int((outcome == 0).sum()),
        win_rate=result.value,
        ci_low=result.ci_low,
        ci_high=result.ci_high,
        confidence=confidence,
        mean_reward_policy=float(policy_rewards.mean()),
        mean_reward_reference=float(reference_rewards.mean()),
    )


def run_eval_reward(cfg: EvalRewardConfig, *, progress: bool = True) -> WinRate:
    """Sample from the student and the reference with the same seeds, judge with the reward, write JSON."""
    prompts = load_prompts(cfg.prompts, cfg.prompts_file)
    policy = sample_answers(cfg.policy, prompts, cfg, desc="policy", progress=progress)
    reference = sample_answers(cfg.reference, prompts, cfg, desc="reference", progress=progress)
    reward = load_reward(
        cfg.reward,
        cfg.rule,
        batch_size=cfg.generation.batch_size,
        max_length=cfg.max_length,
        device=cfg.device,
        torch_dtype=cfg.torch_dtype,
        trust_remote_code=cfg.trust_remote_code,
    )
    k = cfg.samples_per_prompt
    flat_prompts = [p.text for p in prompts for _ in range(k)]
    r_pol = np.array(reward.score(flat_prompts, [a for answers in policy for a in answers])).reshape(-1, k)
    r_ref = np.array(reward.score(flat_prompts, [a for answers in reference for a in answers])).reshape(-1, k)
    reward.close()
    result = win_rate(
        r_pol,
        r_ref,
        bootstrap_samples=cfg.bootstrap_samples,
        confidence=cfg.confidence,
        seed=cfg.generation.seed,
    )
    records = [
        {
            "id": p.id,
            "prompt": p.text,
            "policy": policy[i],
            "reference": reference[i],
            "policy_rewards": r_pol[i].tolist(),
            "reference_rewards": r_ref[i].tolist(),
        }
        for i, p in enumerate(prompts)
    ]
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(
        json.dumps(
            {"summary": asdict(result), "config": asdict(cfg), "prompts": records},
            indent=2,
            ensure_ascii=False,
        )
    )
    tmp.replace(out)
    return result
