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
from mmpref.data.validation import bad_rows_error
from mmpref.devices import resolve_device
from mmpref.files import atomic_write_text
from mmpref.hub import split_revision
from mmpref.metrics.stats import MetricResult, mean_with_ci, win_outcomes, win_rate
from mmpref.rdpo.config import RULE_PREFIX, RULES, EvalRewardConfig, RuleConfig, ScoreConfig
from mmpref.rdpo.generation import (
    TORCH_DTYPES,
    Generator,
    Messages,
    Prompt,
    chunks,
    derive_seed,
    load_pretrained,
    load_prompts,
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
        from transformers import AutoModelForSequenceClassification

        self.name, self.batch_size, self.max_length = path, batch_size, max_length
        self.device = resolve_device(device)
        self.tokenizer, self.model = load_pretrained(
            AutoModelForSequenceClassification, path, torch_dtype, trust_remote_code
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
class RewardComparison:
    """One reward on policy vs reference answers (:func:`compare_rewards`); ``win_rate`` counts ties ½."""

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

    def table(self, cfg: EvalRewardConfig, reward: str | None = None) -> str:
        pct = f"{self.confidence:.0%}"
        rows = [
            ("policy", cfg.policy),
            ("reference", cfg.reference),
            ("reward", reward or cfg.reward),
            ("comparisons", f"{self.prompts} prompts x {self.samples_per_prompt} samples"),
            ("mean reward policy", f"{self.mean_reward_policy:.4g}"),
            ("mean reward reference", f"{self.mean_reward_reference:.4g}"),
            ("wins / ties / losses", f"{self.wins} / {self.ties} / {self.losses}"),
            ("win rate (ties 0.5)", f"{self.win_rate:.3f}"),
            (f"{pct} bootstrap CI", f"[{self.ci_low:.3f}, {self.ci_high:.3f}]"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def compare_rewards(
    policy_rewards: np.ndarray,
    reference_rewards: np.ndarray,
    *,
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> RewardComparison:
    """The policy's rewards against the reference's: wins / ties / losses, the win rate with its interval, and
    each side's mean reward. Rewards are (prompts, samples) arrays; sample k of both sides shares a seed and a
    prompt.

    Outcomes and interval are :func:`mmpref.metrics.stats.win_rate`'s: 1 / ½ / 0 per pair, the bootstrap
    resampling prompts (each prompt's mean outcome over its samples).
    """
    outcome = win_outcomes(torch.as_tensor(policy_rewards), torch.as_tensor(reference_rewards)).numpy()
    result = win_rate(
        policy_rewards, reference_rewards, n_resamples=bootstrap_samples, confidence=confidence, seed=seed
    )
    return RewardComparison(
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


@dataclass
class TextEvaluation:
    """``mmpref eval text``: one :class:`RewardComparison` per reward, each side's mean answer length in tokens
    (over prompts, with intervals) and, with a preference file, the held-out implicit reward accuracy."""

    rewards: dict[str, RewardComparison]
    lengths: dict[str, MetricResult]
    implicit_accuracy: MetricResult | None = None

    def markdown(self) -> str:
        first = next(iter(self.rewards.values()))
        pct = f"{first.confidence:.0%}"
        lines = [f"| reward | mean policy | mean reference | wins / ties / losses | win rate policy vs reference "
                 f"[{pct} CI] |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, w in self.rewards.items():
            lines.append(f"| `{name}` | {w.mean_reward_policy:.4g} | {w.mean_reward_reference:.4g} | {w.wins} / "
                         f"{w.ties} / {w.losses} | {w.win_rate:.3f} [{w.ci_low:.3f}, {w.ci_high:.3f}] |")  # fmt: skip
        pol, ref = self.lengths["policy"], self.lengths["reference"]
        lines += ["", f"| | policy [{pct} CI] | reference [{pct} CI] |", "|---|---:|---:|",
                  f"| answer length (tokens) | {pol.value:.1f} [{pol.ci_low:.1f}, {pol.ci_high:.1f}] "
                  f"| {ref.value:.1f} [{ref.ci_low:.1f}, {ref.ci_high:.1f}] |"]  # fmt: skip
        if self.implicit_accuracy is not None:
            a = self.implicit_accuracy
            lines += ["", f"implicit reward accuracy (ties 0.5) on {a.n} held-out pairs: {a.value:.3f} "
                      f"[{a.ci_low:.3f}, {a.ci_high:.3f}]"]  # fmt: skip
        return "\n".join(lines)

    def summary(self, cfg: EvalRewardConfig) -> str:
        """Each reward's key/value table (what ``eval-reward`` always printed), then the markdown tables."""
        return "\n\n".join([*(w.table(cfg, name) for name, w in self.rewards.items()), self.markdown()])


def reward_specs(cfg: EvalRewardConfig) -> list[str]:
    """The rewards that judge: ``reward`` then ``rewards``, each once."""
    return list(dict.fromkeys([r for r in [cfg.reward, *cfg.rewards] if r]))


def policy_tokenizer(cfg: EvalRewardConfig):
    """The tokenizer of ``cfg.policy``: it counts answer tokens of both sides and tokenizes preference rows."""
    from transformers import AutoTokenizer

    name, revision = split_revision(str(cfg.policy))
    with custom_code_guard(cfg.policy):
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=cfg.trust_remote_code)


def answer_tokens(tokenizer, answers: list[list[str]]) -> np.ndarray:
    """(prompts, samples) token counts of the answers (``tokenizer(answer)`` without special tokens)."""
    return np.array([[len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in row] for row in answers])


@torch.no_grad()
def implicit_reward_accuracy(cfg: EvalRewardConfig, *, progress: bool = True) -> MetricResult:
    """Held-out implicit reward accuracy of ``policy`` against ``reference`` on ``cfg.preferences``.

    Each row (``prompt``, ``chosen``, ``rejected``) is tokenized as ``mmpref train`` tokenizes it
    (:func:`~mmpref.adapters.causal_lm.tokenize_row` with ``max_length`` / ``max_prompt_length``, the policy's
    tokenizer), ℓ = log π_θ(y|x) − log π_ref(y|x) from summed response log-probs
    (:func:`~mmpref.adapters.causal_lm.response_logps`), and the pair counts ``1[ℓ_w > ℓ_l] + ½ · 1[ℓ_w = ℓ_l]``
    (:func:`mmpref.losses.tie_accuracy`): the ``rewards/accuracies`` of training, without β (a positive scale).
    The interval resamples pairs.
    """
    from transformers import AutoModelForCausalLM

    from mmpref.adapters.causal_lm import collate, response_logps, tokenize_row
    from mmpref.losses import tie_accuracy
    from mmpref.progress import progress as progress_bar

    path = Path(cfg.preferences)
    ds = load_rows(str(path))
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: the implicit accuracy needs paired rows; missing columns {', '.join(missing)}")
    bad = validate_rows(ds.select_columns(["prompt", "chosen", "rejected"]), "paired")
    if bad:
        raise bad_rows_error(path, bad, ds.num_rows)
    tokenizer = policy_tokenizer(cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [tokenize_row(tokenizer, i, r["prompt"], [r["chosen"], r["rejected"]], max_length=cfg.max_length,
                         max_prompt_length=cfg.max_prompt_length) for i, r in enumerate(ds.to_list())]  # fmt: skip
    logratios = None
    for sign, side_name, model_path in ((1.0, "policy", cfg.policy), (-1.0, "reference", cfg.reference)):
        name, revision = split_revision(str(model_path))
        with custom_code_guard(model_path):
            model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=TORCH_DTYPES[cfg.torch_dtype],
                                                         trust_remote_code=cfg.trust_remote_code)  # fmt: skip
        model.to(resolve_device(cfg.device)).eval()
        logps = []
        batches = list(chunks(rows, cfg.generation.batch_size))
        for batch in progress_bar(batches, desc=f"log-probs {side_name}", unit="batch", disable=not progress):
            inputs = {k: v.to(model.device) for k, v in collate(batch, pad).items()}
            logps.append(response_logps(model, inputs)[0].float().cpu())
        side = sign * torch.cat(logps)  # (n, 2): chosen, rejected
        logratios = side if logratios is None else logratios + side
        del model
    accuracy = tie_accuracy(logratios[:, 0] - logratios[:, 1])
    return mean_with_ci("implicit_accuracy", accuracy, n_resamples=cfg.bootstrap_samples,
                        confidence=cfg.confidence, seed=cfg.generation.seed)  # fmt: skip


def run_eval_text(cfg: EvalRewardConfig, *, progress: bool = True) -> TextEvaluation:
    """Sample from the student and the reference with the same seeds, judge both with every reward, count
    answer tokens, optionally measure the implicit reward accuracy; write the JSON report to ``cfg.output``."""
    prompts = load_prompts(cfg.prompts, cfg.prompts_file)
    policy = sample_answers(cfg.policy, prompts, cfg, desc="policy", progress=progress)
    reference = sample_answers(cfg.reference, prompts, cfg, desc="reference", progress=progress)
    k = cfg.samples_per_prompt
    flat_prompts = [p.text for p in prompts for _ in range(k)]
    boot = {"n_resamples": cfg.bootstrap_samples, "confidence": cfg.confidence, "seed": cfg.generation.seed}
    judged: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for spec in reward_specs(cfg):  # one reward model in memory at a time
        reward = load_reward(spec, cfg.rule, batch_size=cfg.generation.batch_size, max_length=cfg.max_length,
                             device=cfg.device, torch_dtype=cfg.torch_dtype,
                             trust_remote_code=cfg.trust_remote_code)  # fmt: skip
        r_pol = np.array(reward.score(flat_prompts, [a for answers in policy for a in answers])).reshape(-1, k)
        r_ref = np.array(reward.score(flat_prompts, [a for answers in reference for a in answers])).reshape(-1, k)
        reward.close()
        judged[spec] = (r_pol, r_ref)
    results = {spec: compare_rewards(r_pol, r_ref, bootstrap_samples=cfg.bootstrap_samples,
                                     confidence=cfg.confidence, seed=cfg.generation.seed)
               for spec, (r_pol, r_ref) in judged.items()}  # fmt: skip
    tokenizer = policy_tokenizer(cfg)
    tokens = {"policy": answer_tokens(tokenizer, policy), "reference": answer_tokens(tokenizer, reference)}
    lengths = {side: mean_with_ci(f"length_{side}", torch.as_tensor(t, dtype=torch.float64).mean(dim=1), **boot)
               for side, t in tokens.items()}  # fmt: skip
    accuracy = implicit_reward_accuracy(cfg, progress=progress) if cfg.preferences else None
    evaluation = TextEvaluation(results, lengths, accuracy)
    first = next(iter(judged))
    records = [
        {
            "id": p.id,
            "prompt": p.text,
            "policy": policy[i],
            "reference": reference[i],
            "policy_rewards": judged[first][0][i].tolist(),
            "reference_rewards": judged[first][1][i].tolist(),
            "rewards": {s: {"policy": pol[i].tolist(), "reference": ref[i].tolist()} for s, (pol, ref) in judged.items()},
            "policy_tokens": tokens["policy"][i].tolist(),
            "reference_tokens": tokens["reference"][i].tolist(),
        }
        for i, p in enumerate(prompts)
    ]
    report = {
        "summary": asdict(results[first]),  # the first reward's, as eval-reward always wrote it
        "rewards": {spec: asdict(w) for spec, w in results.items()},
        "lengths": {side: m.to_dict() for side, m in lengths.items()},
        "implicit_accuracy": accuracy.to_dict() if accuracy is not None else None,
        "config": asdict(cfg),
        "prompts": records,
    }
    out = Path(cfg.output)
    atomic_write_text(out, json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write_text(out.with_suffix(".md"), evaluation.markdown() + "\n")
    return evaluation


def run_eval_reward(cfg: EvalRewardConfig, *, progress: bool = True) -> RewardComparison:
    """The first reward's :class:`RewardComparison` of :func:`run_eval_text` (``mmpref eval-reward``, kept as an
    alias)."""
    return next(iter(run_eval_text(cfg, progress=progress).rewards.values()))
