"""A seeded tiny reward model for tests and the rDPO demo (the LM builders live in mmpref.tiny_models)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from mmpref.tiny_models import make_tiny_lm


def make_tiny_reward_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``LlamaForSequenceClassification`` (num_labels=1) with :func:`make_tiny_lm`'s tokenizer.

    Same architecture and tokenizer (chat template included) as the tiny LM, random score head.
    Loads with ``AutoModelForSequenceClassification.from_pretrained(out_dir)``; the caller's RNG is untouched.
    """
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        lm = make_tiny_lm(Path(tmp) / "lm", seed=seed)
        tokenizer = AutoTokenizer.from_pretrained(lm)
        config = AutoConfig.from_pretrained(lm, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def warm_start_lm(
    model_dir: str | Path,
    rows: list[dict],
    out_dir: str | Path,
    *,
    steps: int = 80,
    learning_rate: float = 3e-3,
    batch_size: int = 8,
    seed: int = 0,
    max_length: int = 64,
    max_prompt_length: int = 32,
) -> Path:
    """Supervised warm-up of a tiny LM on *both* answers of each (prompt, chosen, rejected) row.

    A random tiny LM writes noise, which no preference loss turns into text within a test's
    budget. After this warm-up it writes both behaviours of the data (e.g. polite and rude
    answers), like the instruction-tuned model rDPO starts from, so preference training has a
    choice to shift. Rows are tokenized exactly as ``mmpref train`` tokenizes them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmpref.adapters.causal_lm import collate, response_logps, tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenized = [
        tokenize_row(
            tokenizer,
            i,
            r["prompt"],
            [r["chosen"], r["rejected"]],
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        for i, r in enumerate(rows)
    ]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
        model.train()
        for _ in range(steps):
            picked = torch.randint(len(tokenized), (batch_size,), generator=generator).tolist()
            logps, counts = response_logps(
                model, collate([tokenized[i] for i in picked], tokenizer.pad_token_id)
            )
            loss = -(logps.sum() / counts.sum())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
