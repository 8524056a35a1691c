"""Optimizer steps per second on text: mmpref DPO / RPO vs TRL's DPOTrainer vs a plain padded loop.

docs/design.md §15: one process, the contenders alternating in rounds (each round: ``--warmup`` untimed
steps, then ``--steps`` timed ones), both sides configured fairly at the shapes users train at:
a Llama-style model (hidden 256, 4 layers, 4 heads, untied 32k head), prompts of 64–384 tokens,
responses of 16–128 (chosen and rejected drawn independently), batch 4, fp32, no gradient
checkpointing, reference log-probs precomputed (untimed) on every side.

Contenders (each starts from the same saved weights and sees the same rows in the same order;
a round restarts every contender at the first batch):

1. ``mmpref-dpo``: mmpref's own objects: ``TextTask`` (tokenization, shared-prompt collate,
   precomputed reference), ``LogRatios`` / ``Objective`` with loss type sigmoid; the step is
   the body of ``mmpref.training.loop.train`` with ``precompute_ref: true`` (see ``_mmpref_step``).
2. ``mmpref-rpo``: the same with ``loss.type=rpo``, ``rpo.mode=paired``; prompt embeddings are
   random unit vectors of width 384 (what all-MiniLM-L6-v2 gives) set on the task's split.
3. ``trl-dpo``: ``trl.DPOTrainer`` with ``precompute_ref_log_probs=True`` (see ``trl_runner`` for
   each setting); timed between its ``on_step_end`` callbacks, so the time covers the whole
   step as the Trainer runs it (data loading, forward/backward, clipping, AdamW, scheduler).
4. ``padded``: the floor TRL was measured against in docs/design.md §15: [prompt+chosen; prompt+rejected]
   as one right-padded batch, full logits, log_softmax, masked sum, same loss and optimizer.

Every timed step includes building its batch from pre-tokenized rows, as every trainer does.
Run from the repository root:

    python benchmarks/text_step.py            # docs/design.md §15 shapes, several minutes on 2 CPU cores
    python benchmarks/text_step.py --quick    # tiny shapes, a smoke run in seconds
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

CONTENDERS = ("mmpref-dpo", "mmpref-rpo", "trl-dpo", "padded")
LEARNING_RATE = 1e-6
BETA = 0.1
EMBEDDING_WIDTH = 384
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

# (warmup, steps) -> seconds of each of the `steps` timed steps
Runner = Callable[[int, int], list[float]]


@dataclass
class Shapes:
    batch_size: int = 4
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    vocab: int = 32000
    prompt_min: int = 64
    prompt_max: int = 384
    response_min: int = 16  # tokens, the closing EOS included
    response_max: int = 128
    words: int = 1000  # tokenizer vocabulary (one word = one token); the model's vocabulary is `vocab`
    tied: bool = False  # tie_word_embeddings: the LM head is the input embedding matrix

    @property
    def intermediate(self) -> int:  # Llama's 8/3·hidden, rounded to a multiple of 16 (688 at 256)
        return -(-8 * self.hidden // 3 // 16) * 16

    @property
    def max_length(self) -> int:  # long enough that no side truncates anything
        return self.prompt_max + self.response_max


QUICK = Shapes(batch_size=2, hidden=64, layers=2, heads=2, vocab=2000, prompt_min=8, prompt_max=24,
               response_min=4, response_max=12, words=200)  # fmt: skip
# today's long answers: a Qwen2.5-sized tied vocabulary, answers longer than the prompts
LONG = Shapes(batch_size=2, hidden=256, layers=2, heads=4, vocab=151_936, prompt_min=256, prompt_max=512,
              response_min=512, response_max=1024, words=151_936 - 3, tied=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------- setup


def build_model_folder(folder: Path, shapes: Shapes, seed: int) -> None:
    """A random Llama-style model plus a word-level tokenizer (every word one token), saved together."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {UNK: 0, PAD: 1, EOS: 2, **{f"w{i}": i + 3 for i in range(shapes.words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, pad_token=PAD, eos_token=EOS,
                                        model_max_length=shapes.max_length)  # fmt: skip
    config = LlamaConfig(
        vocab_size=shapes.vocab,
        hidden_size=shapes.hidden,
        intermediate_size=shapes.intermediate,
        num_hidden_layers=shapes.layers,
        num_attention_heads=shapes.heads,
        num_key_value_heads=shapes.heads,
        max_position_embeddings=max(1024, 2 * shapes.max_length),
        tie_word_embeddings=shapes.tied,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_rows(n: int, shapes: Shapes, seed: int) -> list[dict[str, str]]:
    """Paired rows with exact token counts; each response ends with the EOS token (counted in its length).

    Responses start with a space so that TRL's ``prompt + chosen`` string splits at the same word
    boundary that mmpref's separate prompt / response tokenization sees.
    """
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(shapes.words)}" for _ in range(k))

    def response() -> str:
        return f" {words(rng.randint(shapes.response_min, shapes.response_max) - 1)} {EOS}"

    return [
        {"prompt": words(rng.randint(shapes.prompt_min, shapes.prompt_max)), "chosen": response(),
         "rejected": response()}
        for _ in range(n)
    ]  # fmt: skip


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def time_loop(step: Callable[[], None], warmup: int, steps: int) -> list[float]:
    """Run ``warmup`` then ``steps`` calls of ``step``; the seconds each of the last ``steps`` took."""
    for _ in range(warmup):
        step()
    stamps = [time.perf_counter()]
    for _ in range(steps):
        step()
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _dpo_sigmoid(chosen: Tensor, rejected: Tensor) -> Tensor:
    return -F.logsigmoid(BETA * (chosen - rejected)).mean()


# ---------------------------------------------------------------------------------------------- mmpref


def mmpref_runner(model_dir: Path, data_file: Path, out_dir: Path, shapes: Shapes, loss: str, total_steps: int,
                  seed: int) -> tuple[Runner, list]:  # fmt: skip
    """mmpref's training step as ``mmpref train`` runs it (``mmpref.training.loop.train``, precompute_ref).

    Driven through mmpref's own objects: ``TextTask`` (``build_task`` runs its stages: it tokenizes and
    precomputes the reference log-probs, untimed), ``task.collate_train`` through an Accelerate data loader,
    ``task.rows``, the run's ``Objective``. What the loop does per step besides (NaN check, metric
    sums, token count, clipping, AdamW, scheduler, zero_grad) is copied from its body below,
    minus the logging / eval / checkpoint branches, which are off in this configuration.
    """
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    from mmpref.losses import Objective
    from mmpref.training.build import build_task
    from mmpref.training.config import LossConfig, RPOConfig, TrainConfig
    from mmpref.training.loop import build_optimizer

    # The task is built with the sigmoid loss: with loss.type=rpo it would embed the prompts with
    # the sentence embedder; here random unit vectors stand in (only their shape matters for time).
    cfg = TrainConfig(model=str(model_dir), dataset=str(data_file), output_dir=str(out_dir),
                      loss=LossConfig(type="sigmoid", beta=BETA), precompute_ref=True, max_steps=total_steps,
                      batch_size=shapes.batch_size, eval_batch_size=shapes.batch_size,
                      learning_rate=LEARNING_RATE, max_grad_norm=1.0, max_length=shapes.max_length,
                      max_prompt_length=shapes.prompt_max, report_to="none", seed=seed)  # fmt: skip
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    task = build_task(cfg, accelerator)  # a TextTask
    loss_cfg, rpo_cfg = cfg.loss, cfg.rpo
    if loss == "rpo":
        gen = torch.Generator().manual_seed(seed)
        task.train.embeddings = F.normalize(
            torch.randn(len(task.train), EMBEDDING_WIDTH, generator=gen), dim=-1
        )
        loss_cfg, rpo_cfg = LossConfig(type="rpo", beta=BETA), RPOConfig(mode="paired", base_loss="sigmoid")
    objective = Objective.from_config(loss_cfg, rpo_cfg)  # built once, as the run's plan does

    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)  # torch.optim.AdamW (cfg.optimizer = "adamw")
    # A horizon far beyond the run, so that lr never decays to 0 across rounds.
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=10**9
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    sums: dict[str, float] = {}
    state = {"units": 0}

    def step(batch: dict[str, Tensor]) -> None:  # the loop body, gradient_accumulation_steps = 1
        with accelerator.autocast():
            rows = task.rows(model, batch)
            out = objective(rows)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"non-finite loss {out.loss.item()}")
        accelerator.backward(out.loss)
        for k, v in {"loss": out.loss.detach(), **out.metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        state["units"] += task.count_units(batch)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def run(warmup: int, steps: int) -> list[float]:
        # Dataset order (TRL is set to sequential sampling too), not the loop's seeded shuffle.
        loader = DataLoader(list(range(len(task.train))), batch_size=cfg.batch_size, shuffle=False,
                            collate_fn=task.collate_train, drop_last=True)  # fmt: skip
        batches = iter(accelerator.prepare_data_loader(loader))
        return time_loop(lambda: step(next(batches)), warmup, steps)

    return run, task.train.rows


# ---------------------------------------------------------------------------------------------- TRL


def trl_runner(model_dir: Path, rows: list[dict[str, str]], out_dir: Path, shapes: Shapes, total_steps: int,
               seed: int) -> tuple[Runner, list]:  # fmt: skip
    """TRL's DPOTrainer, configured like the mmpref side; every non-default setting is explained."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepClock(TrainerCallback):
        """perf_counter at the end of every optimizer step (after AdamW, scheduler and zero_grad)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    args = DPOConfig(
        output_dir=str(out_dir),
        seed=seed,
        max_steps=total_steps,  # one round: warmup + timed steps, one pass over the rows
        per_device_train_batch_size=shapes.batch_size,
        precompute_ref_log_probs=True,  # as mmpref's precompute_ref: true
        precompute_ref_batch_size=shapes.batch_size,
        loss_type=["sigmoid"],
        beta=BETA,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",  # TRL's default; mmpref's loop also steps a linear schedule
        warmup_steps=0,
        weight_decay=0.0,
        # TRL's default on torch ≥ 2.8 is adamw_torch_fused; mmpref's loop uses torch.optim.AdamW with
        # default settings (the single-tensor for-loop update on CPU). Same optimizer on both sides.
        optim="adamw_torch",
        max_grad_norm=1.0,
        # TRL defaults bf16=True and gradient_checkpointing=True: both ~10× slower on CPU and not what
        # mmpref runs (fp32, no checkpointing), so off (docs/design.md §15).
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        # The same rows in the same order as the other contenders (Trainer's default shuffles).
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        # The sequences are at most prompt_max + response_max long: no truncation on either side.
        # TRL has no max_prompt_length any more; truncation_mode stays at its default keep_start.
        max_length=shapes.max_length,
        # padding_free (defaults False; TRL 1.16 warns it is unavailable and falls back to padding)
        # and pad_to_multiple_of ("auto": no padding off Neuron) keep their defaults. On CPU the
        # fused LM head scores every position (compact mode is Triton-only): TRL's own choice. The
        # fused head itself (trl.trainer.utils.add_fused_lm_head) is always on in 1.16: no setting.
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints the end-of-train summary dict
    tokenized = [(r["prompt_ids"], [r["chosen_ids"], r["rejected_ids"]]) for r in trainer.train_dataset]

    def run(warmup: int, steps: int) -> list[float]:
        if warmup < 1:
            raise ValueError("TRL is timed from the end of the last warm-up step: --warmup must be >= 1")
        if warmup + steps != total_steps:
            raise ValueError("trl_runner was built for a different number of steps")
        clock.stamps.clear()
        trainer.train()
        stamps = clock.stamps[warmup - 1 : warmup + steps]
        return [b - a for a, b in zip(stamps, stamps[1:])]

    return run, tokenized


# ---------------------------------------------------------------------------------------------- padded floor


def padded_runner(model_dir: Path, tokenized: list[tuple[list[int], list[list[int]]]], shapes: Shapes,
                  pad_id: int) -> Runner:  # fmt: skip
    """The plain loop: [prompt+chosen; prompt+rejected] right-padded, full logits, log_softmax, masked sum."""
    from transformers import AutoModelForCausalLM, get_scheduler

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    b = shapes.batch_size

    def batch_of(i: int) -> dict[str, Tensor]:
        rows = tokenized[i * b : (i + 1) * b]
        seqs = [(p, resp[k]) for k in (0, 1) for p, resp in rows]  # chosen rows first, then rejected
        length = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), length), dtype=torch.long)
        resp_mask = torch.zeros((len(seqs), length), dtype=torch.bool)
        for j, (p, r) in enumerate(seqs):
            ids[j, : len(p) + len(r)] = torch.tensor(p + r)
            attn[j, : len(p) + len(r)] = 1
            resp_mask[j, len(p) : len(p) + len(r)] = True
        return {"input_ids": ids, "attention_mask": attn, "response_mask": resp_mask}

    def logps(batch: dict[str, Tensor]) -> Tensor:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        token_logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_logps = token_logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return (token_logps * batch["response_mask"][:, 1:]).sum(-1)

    n_batches = len(tokenized) // b
    with torch.no_grad():
        model.eval()
        ref = [logps(batch_of(i)) for i in range(n_batches)]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10**9)
    cursor = {"i": 0}

    def step() -> None:
        i = cursor["i"]
        cursor["i"] += 1
        lp = logps(batch_of(i)) - ref[i]
        loss = _dpo_sigmoid(lp[:b], lp[b:])
        loss.backward()
        float(loss.detach())  # a loop logs its loss: one sync, as the other contenders
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def run(warmup: int, steps: int) -> list[float]:
        cursor["i"] = 0
        return time_loop(step, warmup, steps)

    return run


# ---------------------------------------------------------------------------------------------- report


def layout_stats(tokenized: list[tuple[list[int], list[list[int]]]], b: int) -> dict[str, float]:
    """Mean per step: positions through the model and through the LM head, for each layout."""
    padded_pos, shared_pos, head_pos = [], [], []
    for i in range(len(tokenized) // b):
        rows = tokenized[i * b : (i + 1) * b]
        padded_pos.append(2 * b * max(len(p) + len(r) for p, rs in rows for r in rs))
        shared_pos.append(b * max(len(p) + sum(map(len, rs)) for p, rs in rows))
        head_pos.append(sum(len(r) for _, rs in rows for r in rs))
    real = sum(len(p) + len(r) for p, rs in tokenized for r in rs) / (len(tokenized) // b)
    return {
        "padded_positions": statistics.mean(padded_pos),  # TRL and padded loop: all go through the head
        "shared_prompt_positions": statistics.mean(shared_pos),
        "response_head_positions": statistics.mean(head_pos),  # mmpref's LM-head rows
        "real_tokens_two_sequences": real,
    }


def environment(load_start: float) -> dict[str, str | int | float]:
    import accelerate
    import transformers
    import trl

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count() or 0,
        "machine": platform.machine(),
        "device": "cpu",
        "loadavg_1min_start": round(load_start, 2),
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
    }


def ratios_of(step_s: dict[str, float]) -> dict[str, float]:
    return {
        "mmpref-dpo / trl-dpo (speed)": step_s["trl-dpo"] / step_s["mmpref-dpo"],
        "mmpref-dpo / padded (speed)": step_s["padded"] / step_s["mmpref-dpo"],
        "trl-dpo / padded (speed)": step_s["padded"] / step_s["trl-dpo"],
        "mmpref-rpo / mmpref-dpo (step time)": step_s["mmpref-rpo"] / step_s["mmpref-dpo"],
    }


def report(times: dict[str, list[list[float]]], shapes: Shapes, env: dict, layout: dict) -> dict:
    """Print the table and ratios; ``times[name][round][j]`` is the j-th timed step of a round.

    Headline: the median round (all contenders run the same batches in every round, so round
    totals compare directly). Beside it, "least disturbed": for each batch the fastest of its
    rounds, summed. On a shared machine other processes only ever slow a step down, so this is
    the estimate least affected by them; when the two disagree, the machine was busy.
    """
    steps = len(times[CONTENDERS[0]][0])
    median = {name: statistics.median(sum(r) for r in t) / steps for name, t in times.items()}
    best = {name: sum(min(col) for col in zip(*t)) / steps for name, t in times.items()}
    ratios, best_ratios = ratios_of(median), ratios_of(best)
    print()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"shapes: {asdict(shapes)} (intermediate {shapes.intermediate})")
    print("per step (mean): " + ", ".join(f"{k}={v:.0f}" for k, v in layout.items()))
    print()
    rounds = " ".join(f"{'r' + str(i + 1):>7}" for i in range(len(times[CONTENDERS[0]])))
    header = f"{'contender':<12} {'steps/s':>8} {'s/step':>7} {'least-dist':>10}   {rounds}"
    print(header + "   (steps/s: median round; least-disturbed; each round)")
    print("-" * len(header))
    for name, t in times.items():
        per_round = " ".join(f"{steps / sum(r):7.3f}" for r in t)
        print(f"{name:<12} {1 / median[name]:8.3f} {median[name]:7.3f} {1 / best[name]:10.3f}   {per_round}")
    print()
    print(f"{'ratio':<38} {'median':>7} {'least-dist':>10}")
    for k, v in ratios.items():
        print(f"{k:<38} {v:7.3f} {best_ratios[k]:10.3f}")
    return {"environment": env, "shapes": asdict(shapes), "layout_per_step": layout, "step_seconds": times,
            "seconds_per_step": median, "least_disturbed_seconds_per_step": best,
            "steps_per_second": {k: 1 / v for k, v in median.items()}, "ratios": ratios,
            "least_disturbed_ratios": best_ratios}  # fmt: skip


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Shapes]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 8; quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per round (default 2; quick 1)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="rounds over the contenders (default 3; quick 2)"
    )
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run in seconds")
    ap.add_argument("--long", action="store_true",
                    help="long answers: tied 151,936 vocabulary, prompts 256-512, answers 512-1,024, batch 2")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice; 1 with --quick, where tiny ops gain nothing "
                         "from a second thread and suffer most from a busy machine)")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    shapes = Shapes(**asdict(QUICK)) if args.quick else Shapes(**asdict(LONG)) if args.long else Shapes()
    for flag, field in (
        ("batch_size", "batch_size"),
        ("hidden", "hidden"),
        ("layers", "layers"),
        ("vocab", "vocab"),
    ):
        if getattr(args, flag) is not None:
            setattr(shapes, field, getattr(args, flag))
    shapes.words = min(shapes.words, shapes.vocab - 3)
    defaults = (2, 1, 2) if args.quick else (8, 2, 3)
    for name, default in zip(("steps", "warmup", "rounds"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        ap.error("--warmup, --steps and --rounds must be >= 1")
    return args, shapes


def main(argv: list[str] | None = None) -> dict:
    args, shapes = parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    torch.manual_seed(args.seed)

    total = args.warmup + args.steps
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mmpref-bench-") as tmp:
        root = Path(tmp)
        model_dir, data_file = root / "model", root / "train.jsonl"
        build_model_folder(model_dir, shapes, args.seed)
        rows = make_rows(total * shapes.batch_size, shapes, args.seed)
        write_jsonl(rows, data_file)

        print(f"setting up (reference log-probs precomputed, untimed) in {root} ...", flush=True)
        dpo, mm_rows = mmpref_runner(
            model_dir, data_file, root / "mmpref", shapes, "sigmoid", total, args.seed
        )
        rpo, _ = mmpref_runner(model_dir, data_file, root / "mmpref", shapes, "rpo", total, args.seed)
        trl, trl_rows = trl_runner(model_dir, rows, root / "trl", shapes, total, args.seed)
        tokenized = [(r.prompt, r.responses) for r in mm_rows]
        if tokenized != trl_rows:  # both sides must train on identical token ids
            raise AssertionError("mmpref and TRL tokenized the rows differently")
        lengths = [(len(p), *map(len, rs)) for p, rs in tokenized]
        if any(not (shapes.prompt_min <= p <= shapes.prompt_max) for p, _, _ in lengths):
            raise AssertionError("prompt lengths out of range")
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
        padded = padded_runner(model_dir, tokenized, shapes, pad_id)
        runners: dict[str, Runner] = {"mmpref-dpo": dpo, "mmpref-rpo": rpo, "trl-dpo": trl, "padded": padded}

        times: dict[str, list[list[float]]] = {name: [] for name in CONTENDERS}
        for r in range(args.rounds):
            for name in CONTENDERS:
                gc.collect()
                times[name].append(runners[name](args.warmup, args.steps))
                rate = args.steps / sum(times[name][-1])
                print(f"round {r + 1}/{args.rounds}  {name:<11} {rate:7.3f} steps/s", flush=True)

        env = environment(load_start)
        result = report(times, shapes, env, layout_stats(tokenized, shapes.batch_size))
        # Before the run the load is others' alone; at its end it includes this process's threads.
        cores, mine = os.cpu_count() or 1, torch.get_num_threads()
        if env["loadavg_1min_start"] > cores - mine + 0.5 or env["loadavg_1min_end"] > cores + 0.5:
            print("\nWARNING: other processes were using the CPU (see the load averages); timings are "
                  "inflated and noisy: trust the least-disturbed column, or rerun on a quiet machine.")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
