"""rDPO end to end: self-critique synth (stub teacher), reward scoring, the reward-aware loss, win rate."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForCausalLM

from mmpref.cli import main
from mmpref.losses import LogRatios, Objective, dpo_loss
from mmpref.losses.pairwise import rdpo_loss
from mmpref.rdpo import reward as reward_module
from mmpref.rdpo.config import load_rdpo_config
from mmpref.rdpo.jsonl import partial_path, read_done
from mmpref.rdpo.reward import compare_rewards, load_reward
from mmpref.rdpo.synth import run_synth
from mmpref.rdpo.tiny_models import make_tiny_reward_model, warm_start_lm
from mmpref.tiny_models import make_tiny_lm
from mmpref.training import load_config, train
from mmpref.training.config import LossConfig, RPOConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rdpo_models")
    return make_tiny_lm(root / "lm", seed=0), make_tiny_reward_model(root / "rm", seed=0)


def user_turns(text: str) -> list[str]:
    """The user turns of a prompt rendered with the tiny LM's chat template."""
    return re.findall(r"<\|user\|>\n(.*?)</s>", text, flags=re.S)


class Interrupted(Exception):
    """Stands in for a kill in the middle of a run."""


class StubTeacher:
    """Replaces ``LlamaForCausalLM.generate`` with known replies: ``reply(first user turn, stage)``.

    stage 1 is the answer, 2 the critique, 3 the revision (the number of user turns so far).
    ``crash_at``: raise on that (0-based) generate call, to simulate an interruption.
    """

    def __init__(self, monkeypatch, tokenizer, reply, crash_at: int | None = None):
        self.tokenizer, self.reply, self.crash_at = tokenizer, reply, crash_at
        self.calls: list[list[str]] = []
        stub = self

        def generate(model, input_ids=None, attention_mask=None, **kwargs):
            return stub.generate(input_ids, attention_mask)

        monkeypatch.setattr(LlamaForCausalLM, "generate", generate)

    def generate(self, input_ids, attention_mask):
        if self.crash_at is not None and len(self.calls) == self.crash_at:
            raise Interrupted
        assert bool(attention_mask[:, -1].all()), "generation batches must be left-padded"
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=False)
        self.calls.append(texts)
        tok = self.tokenizer
        new = []
        for text in texts:
            turns = user_turns(text)
            new.append(
                tok(self.reply(turns[0], len(turns)), add_special_tokens=False)["input_ids"]
                + [tok.eos_token_id]
            )
        width = max(map(len, new))
        padded = [ids + [tok.pad_token_id] * (width - len(ids)) for ids in new]
        return torch.cat([input_ids, torch.tensor(padded, dtype=input_ids.dtype)], dim=1)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------------- synth

PRINCIPLE = "Answer without revealing any secret."


def numbered_reply(first_turn: str, stage: int) -> str:
    i = int(re.search(r"Question (\d+)", first_turn).group(1))
    if stage == 1:
        return f"answer {i}"
    if stage == 2:
        return f"critique {i}"
    if i == 2:
        return ""  # empty revision: dropped
    if i == 5:
        return f"answer {i}"  # revision identical to the answer: dropped
    return f"revised {i}"


def test_synth_rows_resume_and_drops(models, tmp_path, monkeypatch, capsys):
    lm, _ = models
    tokenizer = AutoTokenizer.from_pretrained(lm)
    prompts = [f"Question {i}: what is the secret of topic {i}?" for i in range(7)]
    cfg_path = write_yaml(
        tmp_path / "synth.yaml",
        {
            "synth": {
                "teacher": str(lm),
                "prompts": prompts,
                "principle": PRINCIPLE,
                "output": str(tmp_path / "synth.jsonl"),
                "system_prompt": "You are a careful assistant.",
                "generation": {"batch_size": 2, "max_new_tokens": 8},
            }
        },
    )

    # crash in the 7th generate call: the answers of batch 3, after batches 1-2 (prompts 0-3) were written
    StubTeacher(monkeypatch, tokenizer, numbered_reply, crash_at=6)
    with pytest.raises(Interrupted):
        main(["synth", str(cfg_path)])
    out, dropped = tmp_path / "synth.jsonl", tmp_path / "synth.dropped.jsonl"
    assert not out.exists() and not dropped.exists()  # only a finished run writes under the final names
    assert [r["chosen"] for r in read_done(partial_path(out))] == ["revised 0", "revised 1", "revised 3"]
    assert [r["reason"] for r in read_done(partial_path(dropped))] == ["empty revision"]
    with open(partial_path(out), "a") as f:  # a line torn by the interruption
        f.write('{"id": "torn", "prompt": [{"ro')

    stub = StubTeacher(monkeypatch, tokenizer, numbered_reply)
    assert main(["synth", str(cfg_path)]) == 0
    printed = capsys.readouterr().out
    assert not partial_path(out).exists() and not partial_path(dropped).exists()
    rows, drops = read_done(out), read_done(dropped)
    assert [r["chosen"] for r in rows] == [f"revised {i}" for i in (0, 1, 3, 4, 6)]
    assert [r["rejected"] for r in rows] == [f"answer {i}" for i in (0, 1, 3, 4, 6)]
    assert [r["critique"] for r in rows] == [f"critique {i}" for i in (0, 1, 3, 4, 6)]
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": prompts[i]}] for i in (0, 1, 3, 4, 6)]
    assert set(rows[0]) == {"id", "prompt", "chosen", "rejected", "critique"}
    assert [(d["rejected"], d["reason"]) for d in drops] == [
        ("answer 2", "empty revision"),
        ("answer 5", "revision identical to the answer"),
    ]
    ids = [r["id"] for r in rows + drops]
    assert len(ids) == len(set(ids)) == 7
    assert "2 new rows written" in printed and "dropped 1 rows" in printed and drops[1]["id"] in printed
    # only prompts 4-6 were generated on restart: 2 batches x 3 stages
    assert len(stub.calls) == 6
    # the revision request carries the conversation: system prompt, answer, critique, principle
    revision_input = stub.calls[2][0]
    assert "You are a careful assistant." in revision_input
    assert "answer 4" in revision_input and "critique 4" in revision_input and PRINCIPLE in revision_input
    assert len(user_turns(revision_input)) == 3

    # a third run has nothing left to do and loads no model
    stub = StubTeacher(monkeypatch, tokenizer, numbered_reply)
    report = run_synth(load_rdpo_config("synth", cfg_path), progress=False)
    assert (report.skipped, report.written, stub.calls) == (7, 0, [])


def test_synth_templates_text_format_and_ids(models, tmp_path, monkeypatch):
    lm, _ = models
    tokenizer = AutoTokenizer.from_pretrained(lm)
    StubTeacher(monkeypatch, tokenizer, numbered_reply)
    (tmp_path / "prompts.txt").write_text("Question 0: one?\n\nQuestion 1: two?\nQuestion 0: one?\n")
    cfg = load_rdpo_config(
        "synth",
        None,
        [
            f"teacher={lm}",
            f"prompts_file={tmp_path / 'prompts.txt'}",
            "principle=be kind",
            f"output={tmp_path / 'out.jsonl'}",
            "prompt_format=text",
            'prompt_templates=["Persona A says: {prompt}", "Persona B says: {prompt}"]',
        ],
    )
    run_synth(cfg, progress=False)
    rows = read_done(tmp_path / "out.jsonl")
    assert [r["prompt"] for r in rows] == [
        "Persona A says: Question 0: one?",
        "Persona B says: Question 1: two?",
        "Persona A says: Question 0: one?",
    ]
    assert rows[2]["id"] == rows[0]["id"] + "-2"  # a repeated prompt keeps its own stable id


# ------------------------------------------------------------------------------------------- loss


def test_rdpo_loss_limits_and_gradient():
    z = torch.linspace(-3, 3, 7)
    beta = 0.5
    h = z / beta
    # p = 1 is DPO
    ones = torch.ones_like(h)
    torch.testing.assert_close(
        dpo_loss(h, torch.zeros_like(h), beta=beta, loss_type="rdpo", label_probs=ones).per_pair,
        dpo_loss(h, torch.zeros_like(h), beta=beta, loss_type="sigmoid").per_pair,
    )
    # d/dz [−p log σ(z) − (1−p) log σ(−z)] = σ(z) − p: zero at z = 0 when p = 0.5
    for p in (0.5, 0.2, 0.9):
        zz = z.clone().requires_grad_(True)
        rdpo_loss(zz, 1.0, torch.full_like(zz, p)).sum().backward()
        torch.testing.assert_close(zz.grad, torch.sigmoid(z) - p)
    zero = torch.zeros(3, requires_grad=True)
    rdpo_loss(zero, 1.0, torch.full((3,), 0.5)).sum().backward()
    assert torch.equal(zero.grad, torch.zeros(3))


def test_rdpo_from_scores_through_the_objective():
    """p = σ((s_w − s_l)/τ_r) from the score columns, as the training loop computes it."""
    lw, ll = torch.tensor([0.3, -0.2, 0.1]), torch.tensor([0.1, 0.4, 0.1])
    scores = torch.tensor([[30.0, 0.0], [2.0, 1.0], [1.0, 1.0]])
    rows = LogRatios(logratios=torch.stack([lw, ll], 1), row_index=torch.arange(3), scores=scores)
    for tau in (1.0, 2.0):
        out = Objective.from_config(LossConfig(type="rdpo", beta=0.1, reward_temperature=tau), RPOConfig())(rows)
        p = torch.sigmoid((scores[:, 0] - scores[:, 1]) / tau)
        z = 0.1 * (lw - ll)
        torch.testing.assert_close(out.per_pair, -p * F.logsigmoid(z) - (1 - p) * F.logsigmoid(-z))
    dpo = Objective.from_config(LossConfig(type="sigmoid", beta=0.1), RPOConfig())(rows)
    assert out.per_pair[0].item() == pytest.approx(dpo.per_pair[0].item(), abs=1e-6)  # margin 30: p ≈ 1


def test_negative_reward_margin_flips_the_update():
    """A pair the reward model disagrees with (s_w ≪ s_l) pushes the margin down; DPO pushes it up."""
    margins = {}
    for loss_type in ("rdpo", "sigmoid"):
        logratios = torch.tensor([[0.2, -0.1]], requires_grad=True)
        opt = torch.optim.SGD([logratios], lr=1.0)
        rows = LogRatios(logratios=logratios, row_index=torch.arange(1), scores=torch.tensor([[-6.0, 6.0]]))
        Objective.from_config(LossConfig(type=loss_type, beta=1.0), RPOConfig())(rows).loss.backward()
        opt.step()
        margins[loss_type] = (logratios[0, 0] - logratios[0, 1]).item()
    assert margins["rdpo"] < 0.3 < margins["sigmoid"]


# ------------------------------------------------------------------------------------------ score


def pairs(path: Path, n: int = 5) -> Path:
    rows = [
        {
            "id": f"r{i}",
            "prompt": [{"role": "user", "content": f"Tell me about topic {i}."}],
            "chosen": "Thank you for asking, happy to help!" + " really" * i,
            "rejected": "Whatever, that is a stupid question.",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_with_reward_model_resumes(models, tmp_path, monkeypatch):
    _, rm = models
    data = pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "scored.jsonl"
    assert (
        main(
            [
                "score",
                str(write_yaml(tmp_path / "s.yaml", {"input": str(data), "reward": str(rm)})),
                "batch_size=2",
                f"output={out}",
            ]
        )
        == 0
    )
    first = read_done(out)
    assert [r["id"] for r in first] == [f"r{i}" for i in range(5)]
    # batched, padded scores equal one-at-a-time forwards of the chat-templated text
    tok = AutoTokenizer.from_pretrained(rm)
    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    for row in first:
        for side in ("chosen", "rejected"):
            text = tok.apply_chat_template(
                row["prompt"] + [{"role": "assistant", "content": row[side]}], tokenize=False
            )
            with torch.no_grad():
                ref = model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
            assert row[f"score_{side}"] == pytest.approx(ref, abs=1e-5)

    # interrupted after two rows (plus a torn third line): the rerun scores exactly the other three
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:25])
    scored = []
    original = reward_module.ModelReward.score

    def spy(self, prompts, responses):
        scored.extend(responses)
        return original(self, prompts, responses)

    monkeypatch.setattr(reward_module.ModelReward, "score", spy)
    assert main(["score", str(tmp_path / "s.yaml"), "batch_size=2", f"output={out}"]) == 0
    assert len(scored) == 2 * 3
    again = read_done(out)
    assert [r["id"] for r in again] == [f"r{i}" for i in range(5)]
    for a, b in zip(first, again):
        assert b["score_chosen"] == pytest.approx(a["score_chosen"], abs=1e-5)
    scored.clear()
    assert main(["score", str(tmp_path / "s.yaml"), "batch_size=2", f"output={out}"]) == 0
    assert scored == []  # everything already scored: no reward model is even loaded


def test_rule_rewards(tmp_path):
    polite = load_reward("rule:polite")
    assert polite.score_text("Thank you! Happy to help, please ask.") == 3  # thank you, happy to help, please
    assert polite.score_text("Whatever, this is stupid. Go   away.") == -3
    assert polite.score_text("thanks thanks thanks THANKS") == 1  # distinct markers, case-insensitive
    assert polite.score_text("You\u2019re welcome; the pleased thankful cat") == 1  # whole words only
    data = pairs(tmp_path / "pairs.jsonl", n=3)
    cfg = write_yaml(
        tmp_path / "s.yaml",
        {
            "input": str(data),
            "reward": "rule:keyword",
            "rule": {"keywords": ["happy to help", "really"], "forbidden": ["stupid"]},
        },
    )
    assert main(["score", str(cfg)]) == 0
    rows = read_done(tmp_path / "pairs.scored.jsonl")
    assert [(r["score_chosen"], r["score_rejected"]) for r in rows] == [(1.0, -1.0), (2.0, -1.0), (2.0, -1.0)]


# --------------------------------------------------------------------------------- config errors


def test_config_errors_name_the_key(models, tmp_path, capsys):
    lm, _ = models
    cases = [
        (
            [
                "synth",
                write_yaml(
                    tmp_path / "a.yaml",
                    {"synth": {"teacher": str(lm), "prompts": ["x"], "principle": "p", "temperatur": 1}},
                ),
            ],
            "temperatur",
        ),
        (
            ["synth", write_yaml(tmp_path / "b.yaml", {"teacher": str(tmp_path / "nope"), "prompts": ["x"]})],
            "teacher",
        ),
        (
            [
                "synth",
                write_yaml(tmp_path / "c.yaml", {"teacher": str(lm), "prompts": ["x"], "principle": ""}),
            ],
            "principle",
        ),
        (
            [
                "score",
                write_yaml(
                    tmp_path / "d.yaml",
                    {"input": str(pairs(tmp_path / "p.jsonl")), "reward": str(tmp_path / "no_rm")},
                ),
            ],
            "reward",
        ),
        (
            [
                "score",
                write_yaml(tmp_path / "e.yaml", {"input": str(tmp_path / "p.jsonl"), "reward": "rule:nice"}),
            ],
            "reward",
        ),
        (
            [
                "eval-reward",
                write_yaml(
                    tmp_path / "f.yaml",
                    {
                        "eval": {
                            "policy": str(lm),
                            "reference": str(lm),
                            "prompts": ["x"],
                            "reward": "rule:polite",
                            "generation": {"top_p": 2},
                        }
                    },
                ),
            ],
            "generation.top_p",
        ),
        (["eval-reward", write_yaml(tmp_path / "g.yaml", {"score": {}, "banana": 1})], "banana"),
    ]
    for argv, key in cases:
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {key}" in err, err


# ------------------------------------------------------------------------------------ eval-reward


def test_compare_rewards_ties_and_bootstrap():
    policy = np.array([[2.0, 1.0], [0.0, 0.0], [1.0, 3.0]])
    reference = np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    r = compare_rewards(policy, reference, bootstrap_samples=2000, seed=0)
    assert (r.wins, r.ties, r.losses) == (2, 3, 1)
    assert r.win_rate == pytest.approx((2 + 0.5 * 3) / 6)
    assert r.ci_low <= r.win_rate <= r.ci_high and 0 <= r.ci_low < r.ci_high <= 1


def test_eval_reward_same_model_is_a_tie(models, tmp_path, capsys):
    lm, _ = models
    cfg = write_yaml(
        tmp_path / "e.yaml",
        {
            "eval": {
                "policy": str(lm),
                "reference": str(lm),
                "prompts": ["Hi there!", "How do I bake bread?", "Why is it blue?"],
                "reward": "rule:keyword",
                "rule": {"keywords": ["e"]},
                "samples_per_prompt": 2,
                "generation": {"max_new_tokens": 6, "batch_size": 2, "temperature": 1.0},
                "output": str(tmp_path / "w.json"),
            }
        },
    )
    assert main(["eval-reward", str(cfg)]) == 0
    assert "win rate (ties 0.5)    0.500" in capsys.readouterr().out
    result = json.loads((tmp_path / "w.json").read_text())
    assert result["summary"]["ties"] == 6
    for record in result["prompts"]:  # same seeds, same model: the very same samples
        assert record["policy"] == record["reference"] and len(record["policy"]) == 2
    assert len({a for r in result["prompts"] for a in r["policy"]}) > 1  # and they are sampled, not constant


# ------------------------------------------------------------------------- pipeline end to end

TOPICS = [
    "bread",
    "planets",
    "guitar",
    "soccer",
    "tomatoes",
    "trains",
    "chess",
    "rain",
    "coffee",
    "painting",
    "running",
    "the moon",
    "cats",
    "pasta",
    "jazz",
    "swimming",
    "math",
    "birds",
    "tennis",
    "soup",
]
ASKS = [
    "Can you help me with {t}?",
    "Tell me something about {t}.",
    "I have a question about {t}.",
    "What should I know about {t}?",
]


def polite_or_rude_reply(first_turn: str, stage: int) -> str:
    """Rude first answer, polite revision; one prompt in five the 'teacher' fails and swaps them."""
    topic = next(t for t in TOPICS if t in first_turn)
    polite, rude = (
        f"Thank you for asking! I am happy to help with {topic}.",
        f"Whatever. {topic} is boring, go away.",
    )
    failed = sum(map(ord, first_turn)) % 5 == 0
    if stage == 2:
        return f"The answer about {topic} is not polite enough."
    return (polite if failed else rude) if stage == 1 else (rude if failed else polite)


def test_pipeline_trains_rdpo_and_the_student_wins(models, tmp_path, monkeypatch, capsys):
    """prompts → synth (stub teacher) → score (rule:polite) → train (rdpo) → eval-reward.

    The stub teacher fails on ~1 prompt in 5 (its revision is the rude one); the rule reward
    catches those pairs (s_w − s_l = −5, so p ≈ 0.007 and rDPO learns them the right way round).
    The student starts from a warmed-up tiny LM that writes both polite and rude answers (a
    random one writes noise, which no preference loss turns into text in a few steps).
    """
    lm, _ = models
    train_prompts = [a.format(t=t) for t in TOPICS[:16] for a in ASKS[:3]]
    eval_prompts = [a.format(t=t) for t in TOPICS[16:] for a in ASKS]  # held-out topics
    cfg = write_yaml(
        tmp_path / "polite.yaml",
        {
            "synth": {
                "teacher": str(lm),
                "prompts": train_prompts,
                "principle": "Be polite and helpful.",
                "output": str(tmp_path / "synth.jsonl"),
                "generation": {"batch_size": 16},
            },
            "score": {"input": str(tmp_path / "synth.jsonl"), "reward": "rule:polite"},
            "eval": {
                "reference": str(tmp_path / "ref"),
                "prompts": eval_prompts,
                "reward": "rule:polite",
                "samples_per_prompt": 4,
                "generation": {"max_new_tokens": 16, "batch_size": 32, "temperature": 1.0},
                "output": str(tmp_path / "win.json"),
            },
        },
    )
    StubTeacher(monkeypatch, AutoTokenizer.from_pretrained(lm), polite_or_rude_reply)
    assert main(["synth", str(cfg)]) == 0
    monkeypatch.undo()
    assert main(["score", str(cfg)]) == 0
    scored = read_done(tmp_path / "synth.scored.jsonl")
    margins = [r["score_chosen"] - r["score_rejected"] for r in scored]
    assert set(margins) == {-5.0, 5.0} and margins.count(-5.0) == 12  # the teacher's 12 failures of 48

    reference = warm_start_lm(lm, scored, tmp_path / "ref", steps=80, seed=0)
    final = train(
        load_config(
            None,
            [
                f"model={reference}",
                f"dataset={tmp_path / 'synth.scored.jsonl'}",
                f"output_dir={tmp_path / 'run'}",
                "loss.type=rdpo",
                "loss.beta=0.1",
                "max_steps=20",
                "batch_size=8",
                "learning_rate=1e-4",
                "lr_scheduler=constant",
                "report_to=none",
                "max_length=64",
                "max_prompt_length=32",
                "log_every=5",
            ],
        )
    )
    assert main(["eval-reward", str(cfg), f"policy={final}"]) == 0
    print(capsys.readouterr().out)  # the table, for -s runs
    win = json.loads((tmp_path / "win.json").read_text())["summary"]
    # measured (torch 2.14 CPU, 1 thread): 0.75, 95% CI [0.70, 0.80]; 0.65-0.78 over other seeds
    assert win["win_rate"] > 0.6 and win["ci_low"] > 0.5
    assert win["mean_reward_policy"] > win["mean_reward_reference"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.type=odpo"],
        ["loss.type=rpo", "rpo.base_loss=rdpo"],
        ["loss.type=rpo", "rpo.base_loss=rdpo", "rpo.mode=diagonal"],
    ],
)
def test_scored_data_trains_with_odpo_and_rpo(models, tmp_path, overrides):
    lm, _ = models
    data = pairs(tmp_path / "pairs.jsonl", n=8)
    assert (
        main(["score", str(write_yaml(tmp_path / "s.yaml", {"input": str(data), "reward": "rule:polite"}))])
        == 0
    )
    cfg = load_config(
        None,
        [
            f"model={lm}",
            f"dataset={tmp_path / 'pairs.scored.jsonl'}",
            f"output_dir={tmp_path / 'run'}",
            "max_steps=2",
            "batch_size=4",
            "learning_rate=1e-3",
            "report_to=none",
            "max_length=64",
            "max_prompt_length=32",
            "log_every=1",
            *overrides,
        ],
    )
    train(cfg)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in logged if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
