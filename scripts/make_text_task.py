"""Write the bundled learnable text-preference task to ``data/text_rules/``.

The rule: every prompt asks for advice about one of five topics (cooking, sports, music, space,
gardening), in 15-40 words that name the topic's field, an activity and three of its nouns. The
chosen answer is short (9-17 words), polite and stays on topic: a polite opener, the topic's
lead-in ("In the kitchen," / "On the field," / ...), then advice about two of the prompt's own
nouns with one of the topic's verbs. The rejected answer breaks the rule in one of two ways:

* ``off_topic`` (70%): an equally polite answer in another topic's words (lead-in, nouns, verb),
  so only the prompt tells chosen from rejected: a model must condition on the prompt;
* ``rude`` (30%): a dismissive reply that mentions a prompt noun, a fixed bad pattern.

The lead-in sits right after the opener, where the context is the prompt alone; that is what
makes the topic rule learnable by a 2-layer model in a few hundred pairs.
Prompts fall in five clusters, so RPO's prompt-similarity weighting (docs/design.md §6) has real structure
to use: a cooking prompt's rejected answer is most informative next to another cooking prompt.
Phrasing varies through templates, openers and noun choices; eval prompts never occur in train.
Scores (for ODPO-style losses) are drawn from disjoint ranges: chosen 7-10, off_topic 3-5, rude 0-2.
A tiny Llama-style LM (hidden 64, 2 layers, untied, ~900-token byte-level BPE, ~0.19M parameters)
learns it with DPO (beta 0.1, AdamW lr 1e-3, batch 8) on CPU: held-out reward accuracy 0.5 before,
0.94-0.99 after 150 steps over five seeds.

Files (deterministic for a given --seed):
  train.jsonl, eval.jsonl   paired: prompt, chosen, rejected, score_chosen, score_rejected, topic, rejected_kind
  unpaired_train.jsonl      train.jsonl split into prompt, completion, label rows, shuffled

Usage: python scripts/make_text_task.py [--out data/text_rules] [--seed 0] [--train 400] [--eval 100]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOPICS = {
    "cooking": {
        "field": ["cooking", "baking", "home cooking"],
        "activity": ["cooking dinner", "baking bread", "making soup", "trying new recipes"],
        "nouns": ["dough", "oven", "sauce", "garlic", "onion", "pan", "butter", "flour"],
        "verbs": ["stir", "season", "simmer", "taste"],
        "lead": "in the kitchen",
    },
    "sports": {
        "field": ["soccer", "running", "tennis"],
        "activity": ["training for a match", "playing soccer", "running every morning", "practicing tennis"],
        "nouns": ["ball", "coach", "team", "goal", "stamina", "sprint", "referee", "warmup"],
        "verbs": ["stretch", "practice", "pace", "train"],
        "lead": "on the field",
    },
    "music": {
        "field": ["music", "guitar playing", "piano lessons"],
        "activity": ["practicing guitar", "learning piano", "writing songs", "playing in a band"],
        "nouns": ["guitar", "chord", "melody", "rhythm", "piano", "drum", "tempo", "lyrics"],
        "verbs": ["tune", "rehearse", "listen to", "repeat"],
        "lead": "when you play",
    },
    "space": {
        "field": ["astronomy", "stargazing", "space science"],
        "activity": [
            "watching the night sky",
            "reading about rockets",
            "using my telescope",
            "tracking satellites",
        ],
        "nouns": ["planet", "orbit", "rocket", "telescope", "moon", "galaxy", "comet", "gravity"],
        "verbs": ["observe", "track", "measure", "map"],
        "lead": "under the night sky",
    },
    "gardening": {
        "field": ["gardening", "growing vegetables", "plant care"],
        "activity": ["growing tomatoes", "planting seeds", "working in my garden", "keeping house plants"],
        "nouns": ["soil", "seeds", "compost", "tomato", "roots", "leaves", "mulch", "weeds"],
        "verbs": ["water", "prune", "plant", "feed"],
        "lead": "in the garden",
    },
}

OPENERS = ["", "Hi there.", "Quick question.", "Hello!", "Sorry to bother you.", "Hey,", "I need some help."]
CLOSINGS = ["", " Thanks a lot.", " I appreciate any help.", " Please keep it simple."]
PROMPTS = [
    "I have been {activity} lately and in {field} I keep having trouble with the {n1}. "
    "Should I worry more about the {n2} or about the {n3}?",
    "My friend and I were {activity} last weekend and we argued about the {n1} in {field}. "
    "How should we handle the {n2} and the {n3}?",
    "I am fairly new to {field} and everyone keeps talking about the {n1}, the {n2} and the {n3}. "
    "Can you give me one simple tip to get started?",
    "Whenever I am {activity}, the {n1} never seems right for {field}, though I checked the {n2} and {n3}. "
    "What am I doing wrong here?",
    "Could you explain how the {n1} affects the {n2} in {field}? "
    "I have been {activity} for a month and the {n3} still confuses me.",
    "I read that the {n1} is the most important part of {field}, but my {n2} keeps going wrong "
    "and I am not sure about the {n3} either. Any advice?",
    "Any {field} tips on the {n1} when {activity}? My {n2} and {n3} never work out.",
    "What should a beginner in {field} know about the {n1}, the {n2} and the {n3}?",
]
POLITE = ["Good question!", "Happy to help.", "Sure.", "Of course.", "Nice plan.", "Glad you asked."]
ADVICE = [
    "focus on the {a} first, then {verb} the {b} gently.",
    "keep the {a} steady and {verb} the {b} often.",
    "start with the {a}, then {verb} the {b} each day.",
    "{verb} the {a} slowly and the {b} will follow.",
    "check the {a} and {verb} the {b} before anything else.",
    "keep the {a} simple and {verb} the {b} with care.",
]
RUDE = [
    "Whatever. I do not care about your {a}, figure it out yourself.",
    "Ugh, stop asking me about the {a} and go away.",
    "No idea, the {a} is your problem, not mine. Leave me alone.",
    "Honestly that {a} question is boring, ask someone else.",
]
SCORE = {"chosen": (7.0, 10.0), "off_topic": (3.0, 5.0), "rude": (0.0, 2.0)}
OFF_TOPIC_SHARE = 0.7


def answer(rng: random.Random, t: dict, advice: str, a: str, b: str) -> str:
    """A polite, concise answer in topic ``t``'s words: opener, the topic's lead-in, then the advice."""
    return f"{rng.choice(POLITE)} {t['lead'].capitalize()}, {advice.format(a=a, b=b, verb=rng.choice(t['verbs']))}"


def make_pair(rng: random.Random, topic: str) -> dict:
    """One (prompt, chosen, rejected) triple for ``topic``; every choice comes from ``rng``."""
    t = TOPICS[topic]
    n1, n2, n3 = rng.sample(t["nouns"], 3)
    body = rng.choice(PROMPTS).format(
        activity=rng.choice(t["activity"]), field=rng.choice(t["field"]), n1=n1, n2=n2, n3=n3
    )
    prompt = f"{rng.choice(OPENERS)} {body}{rng.choice(CLOSINGS)}".strip()
    a, b = rng.sample([n1, n2, n3], 2)
    advice = rng.choice(ADVICE)
    chosen = answer(rng, t, advice, a, b)
    if rng.random() < OFF_TOPIC_SHARE:
        kind, other = "off_topic", TOPICS[rng.choice([k for k in TOPICS if k != topic])]
        # another advice template, so chosen and rejected differ in wording as well as in topic words
        rejected = answer(
            rng, other, rng.choice([x for x in ADVICE if x != advice]), *rng.sample(other["nouns"], 2)
        )
    else:
        kind, rejected = "rude", rng.choice(RUDE).format(a=a)
    score = {k: round(rng.uniform(*v) * 2) / 2 for k, v in SCORE.items()}
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": score["chosen"],
        "score_rejected": score[kind],
        "topic": topic,
        "rejected_kind": kind,
    }


def make_split(rng: random.Random, n: int, seen: set[str]) -> list[dict]:
    """``n`` pairs with prompts not in ``seen`` (which it extends), topics in round-robin order."""
    rows, topics = [], list(TOPICS)
    while len(rows) < n:
        row = make_pair(rng, topics[len(rows) % len(topics)])
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def unpaired(rows: list[dict], rng: random.Random) -> list[dict]:
    """KTO-style rows: each pair becomes a desirable and an undesirable completion, shuffled."""
    out = [
        {"prompt": r["prompt"], "completion": r[key], "label": key == "chosen", "topic": r["topic"]}
        for r in rows
        for key in ("chosen", "rejected")
    ]
    rng.shuffle(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "text_rules"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--eval", type=int, default=100)
    args = parser.parse_args(argv)

    rng, seen = random.Random(args.seed), set()
    train = make_split(rng, args.train, seen)
    evaluation = make_split(rng, args.eval, seen)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", evaluation)
    write_jsonl(args.out / "unpaired_train.jsonl", unpaired(train, rng))
    print(f"wrote {len(train)} train, {len(evaluation)} eval, {2 * len(train)} unpaired rows to {args.out}")


if __name__ == "__main__":
    main()
