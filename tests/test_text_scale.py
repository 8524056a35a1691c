"""Text data at scale: tokenization and the reference pass cached in chunks, resumed after a kill.

A kill is simulated by an exception raised from inside the work (``tokenize_row`` or the reference
forward) after some chunks are done; the rerun must give exactly the rows and log-probs of an
uninterrupted run and redo none of the finished chunks. docs/text.md, *Caches and resume*.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from mmpref.data import embeddings as embeddings_mod
from mmpref.data import prepare_text_dataset, prompt_embeddings
from mmpref.data import tokenized as tok
from mmpref.tiny_models import make_tiny_lm
from mmpref.training import load_config
from mmpref.training import text_task as tt
from mmpref.training.build import build_task

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, CHUNK = 120, 16  # 8 chunks, the last one partial
WORDS = ["bread", "oven", "planet", "orbit", "guitar", "melody", "river", "garden", "coffee", "window"]


MODULES = {"tokenize_row": tok, "response_logps": tt}  # where each piece of work is called from
ORIGINALS = {name: getattr(module, name) for name, module in MODULES.items()}


class Kill(Exception):
    """Stands for SIGKILL: raised in the middle of the work, nothing after it runs."""


def write_rows(path: Path, n: int = ROWS, prompts: int = ROWS) -> Path:
    """Conversational rows shaped like UltraFeedback's: a chat prompt (``prompts`` distinct ones), one assistant
    turn per side, scores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            a, b, c = (WORDS[(i * k + k) % len(WORDS)] for k in (1, 3, 7))
            ask = f"Tell me about the {WORDS[i % prompts % len(WORDS)]}, question {i % prompts}."
            row = {"prompt": [{"role": "user", "content": ask}],
                   "chosen": [{"role": "assistant", "content": f"The {a} is next to the {c}. " * (1 + i % 4)}],
                   "rejected": [{"role": "assistant", "content": f"No idea about any {b}."}],
                   "score_chosen": 4.0 + i % 3, "score_rejected": 1.5}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("scale") / "lm", seed=0)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(tok, "TOKEN_CHUNK_ROWS", CHUNK)
    monkeypatch.setattr(tt, "REF_CHUNK_ROWS", CHUNK)


def config(lm: Path, data: Path, out: Path, *overrides: str):
    return load_config(None, [f"model={lm}", f"dataset={data}", f"output_dir={out}", "report_to=none",
                              "max_length=64", "max_prompt_length=32", "eval_batch_size=8", *overrides])  # fmt: skip


def build(lm: Path, data: Path, out: Path, *overrides: str) -> tt.TextTask:
    return build_task(config(lm, data, out, *overrides), Accelerator(cpu=True))


def counting(monkeypatch, name: str, fail_after: int | None = None) -> list[int]:
    """Replace ``<name>`` where the work calls it by a wrapper counting its calls; call number ``fail_after + 1``
    raises Kill."""
    calls, original = [], ORIGINALS[name]

    def wrapper(*args, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise Kill
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(MODULES[name], name, wrapper)
    return calls


def packed_state(rows: tok.PackedRows) -> tuple:
    return rows._ids.typecode, rows._ids.tobytes(), rows._starts.tobytes(), rows._numbers.tobytes()


def cache_files(data: Path, prefix: str) -> list[Path]:
    return sorted((data.parent / ".mmpref_cache").glob(f"{prefix}-*/*"))


def test_tokenization_resumes_after_a_kill_without_redoing_finished_chunks(lm, tmp_path, monkeypatch):
    no_ref = "precompute_ref=false"
    straight = build(lm, write_rows(tmp_path / "a" / "d.jsonl"), tmp_path / "ra", no_ref).train

    data = write_rows(tmp_path / "b" / "d.jsonl")
    counting(monkeypatch, "tokenize_row", fail_after=3 * CHUNK + 5)  # killed inside the 4th chunk
    with pytest.raises(Kill):
        build(lm, data, tmp_path / "rb", no_ref)
    files = cache_files(data, "tokens")  # whole chunks only, no temp files
    assert len(files) == 3 and all(f.suffix == ".safetensors" for f in files)

    calls = counting(monkeypatch, "tokenize_row")
    resumed = build(lm, data, tmp_path / "rb", no_ref).train
    assert len(calls) == ROWS - 3 * CHUNK  # the finished chunks were read back, not tokenized again
    assert packed_state(resumed.rows) == packed_state(straight.rows)
    assert list(resumed.rows) == list(straight.rows) and resumed.key == straight.key
    torch.testing.assert_close(resumed.scores, straight.scores, rtol=0, atol=0)

    calls.clear()
    again = build(lm, data, tmp_path / "rb", no_ref).train
    assert not calls and packed_state(again.rows) == packed_state(straight.rows)


def test_reference_pass_resumes_after_a_kill_with_identical_log_probs(lm, tmp_path, monkeypatch, capsys):
    straight = build(lm, write_rows(tmp_path / "a" / "d.jsonl"), tmp_path / "ra").train.ref_logps

    data = write_rows(tmp_path / "b" / "d.jsonl")
    counting(monkeypatch, "response_logps", fail_after=2 * 3 + 1)  # 2 batches of 8 a chunk: killed in the 4th
    with pytest.raises(Kill):
        build(lm, data, tmp_path / "rb")
    assert len(cache_files(data, "ref_logps")) == 3
    assert not (tmp_path / "rb" / "cache").exists()  # the run's assembled file only once every row is done

    calls = counting(monkeypatch, "response_logps")
    capsys.readouterr()
    resumed = build(lm, data, tmp_path / "rb").train.ref_logps
    assert len(calls) == 2 * 4 + 1  # chunks 4-7 (two batches each) and the last, partial one
    assert torch.equal(resumed, straight)  # bit-identical
    assert f"{3 * CHUNK}/{ROWS}" in capsys.readouterr().err  # the bar starts with the resumed rows done
    assert len(list((tmp_path / "rb" / "cache").glob("ref_logps-train-*.safetensors"))) == 1


def test_cache_keys_follow_lengths_tokenizer_data_and_numerics(lm, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "d" / "d.jsonl")
    first = build(lm, data, tmp_path / "r1").train
    calls = counting(monkeypatch, "tokenize_row")
    shorter = build(lm, data, tmp_path / "r2", "max_length=48", "precompute_ref=false").train
    assert len(calls) == ROWS and list(shorter.rows) != list(first.rows)  # a new entry, every row tokenized
    assert len({f.parent for f in cache_files(data, "tokens")}) == 2

    calls.clear()
    lines = data.read_text().splitlines()
    lines[CHUNK + 2] = lines[CHUNK + 2].replace("Tell me", "Tell us")  # one row of the second chunk edited
    data.write_text("\n".join(lines) + "\n")
    edited = build(lm, data, tmp_path / "r3", "precompute_ref=false").train
    assert len(calls) == CHUNK  # only the edited row's chunk is tokenized again
    assert edited.rows[CHUNK + 2] != first.rows[CHUNK + 2] and edited.rows[0] == first.rows[0]

    other = tmp_path / "lm2"  # the same model with another chat template: other tokens, a new entry
    shutil.copytree(lm, other)
    template = other / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|", "[").replace("|>", "]"))
    calls.clear()
    build(other, data, tmp_path / "r4", "precompute_ref=false")
    assert len(calls) == ROWS

    ref_calls = counting(monkeypatch, "response_logps")
    build(lm, data, tmp_path / "r5", "eval_batch_size=4")  # other padding, other rounding: recomputed
    assert len(ref_calls) == ROWS // 4


class _Rank:
    """One of two processes, played by a thread: its rank, and a barrier for ``wait_for_everyone``."""

    def __init__(self, accelerator: Accelerator, rank: int, barrier: threading.Barrier):
        self._accelerator, self.process_index, self.num_processes = accelerator, rank, 2
        self.is_main_process = self.is_local_main_process = rank == 0
        self._barrier = barrier

    def wait_for_everyone(self) -> None:
        self._barrier.wait(timeout=120)

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


def test_two_processes_share_the_chunks_and_match_one_process(lm, tmp_path, monkeypatch):
    """Two ranks (threads) on one cache folder: every chunk is computed once, and both get one process's result."""
    single = build(lm, write_rows(tmp_path / "a" / "d.jsonl"), tmp_path / "ra").train
    data = write_rows(tmp_path / "b" / "d.jsonl")
    task = build(lm, data, tmp_path / "rb", "precompute_ref=false")  # for its model and tokenizer
    for folder in (data.parent / ".mmpref_cache").glob("tokens-*"):
        shutil.rmtree(folder)
    dataset = prepare_text_dataset(data)
    barrier, gathered = threading.Barrier(2), [None, None]
    token_calls, ref_calls = counting(monkeypatch, "tokenize_row"), counting(monkeypatch, "response_logps")

    def all_gather(results):  # accelerate's gather_object across the two threads
        rank = int(threading.current_thread().name)
        gathered[rank] = results
        barrier.wait(timeout=120)
        return gathered[0] + gathered[1]

    monkeypatch.setattr(tt, "gather_object", all_gather)
    splits, errors = [None, None], []
    cfg, model = task.cfg, task.model.eval()
    limits = tok.TokenLimits(cfg.max_length, cfg.max_prompt_length, cfg.truncation_mode)

    def run(rank: int) -> None:
        try:
            acc = _Rank(task.accelerator, rank, barrier)
            split = tok.TokenizedSplit.build(dataset, "train", task.tokenizer, limits, acc)
            split.ref_logps = tt.reference_logps(model, split, accelerator=acc, batch_size=cfg.eval_batch_size,
                                                 chunk_size=task.chunk_size,
                                                 pad_token_id=task.tokenizer.pad_token_id, caches=task._reference_caches)  # fmt: skip
            splits[rank] = split
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,), name=str(r)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(token_calls) == ROWS  # each chunk tokenized by one rank only
    assert len(ref_calls) == 2 * (ROWS // CHUNK) + 1  # each reference chunk computed by one rank only
    for split in splits:
        assert packed_state(split.rows) == packed_state(single.rows)
        assert torch.equal(split.ref_logps, single.ref_logps)


class _Embedder:
    """Stands for the sentence embedder: a fixed vector per text."""

    def encode(self, texts, **kwargs):
        return torch.tensor([[len(t), sum(map(ord, t)) % 97, 1.0] for t in texts])


def test_rpo_keeps_one_embedding_per_distinct_prompt(lm, tmp_path, monkeypatch):
    monkeypatch.setattr(embeddings_mod, "_load_embedder", lambda *args: _Embedder())
    data = write_rows(tmp_path / "d" / "d.jsonl", prompts=10)
    split = build(lm, data, tmp_path / "r", "loss.type=rpo", "precompute_ref=false").train
    assert split.embeddings.shape == (10, 3) and split.prompt_index.shape == (ROWS,)
    per_row = prompt_embeddings([json.loads(line)["prompt"] for line in data.read_text().splitlines()])
    assert per_row.shape == (ROWS, 3)
    picked = [0, 11, 25, 119]
    torch.testing.assert_close(split.collate(picked, 0)["embeddings"], per_row[picked], rtol=0, atol=0)


def test_a_streamed_text_dataset_trains_resumes_exactly_and_names_a_bad_row(tmp_path, capsys):
    """``streaming: true``: rows checked and tokenized as the stream gives them; a run stopped at a checkpoint
    and resumed ends bit-identical to an uninterrupted one; a bad row stops the run naming it."""
    from safetensors.torch import load_file

    from mmpref.cli import main
    from mmpref.training import load_config, train

    lm = make_tiny_lm(tmp_path / "lm", seed=0)
    rows = [{"prompt": f"Q{i}: pick a colour", "chosen": f"Blue {i}.", "rejected": f"Nope {i}"} for i in range(24)]
    data, bad = tmp_path / "t.jsonl", tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad.write_text("".join(json.dumps(r) + "\n" for r in [*rows[:3], {**rows[3], "rejected": rows[3]["chosen"]}]))
    common = [f"model={lm}", f"dataset={data}", "report_to=none", "streaming=true", "precompute_ref=false",
              "max_length=64", "max_prompt_length=32", "batch_size=4", "log_every=1", "shuffle_buffer=8",
              "learning_rate=1e-3", "lr_scheduler=constant", "save_every=4"]  # fmt: skip
    straight = train(load_config(None, [*common, f"output_dir={tmp_path / 'a'}", "max_steps=10"]))  # 6 batches an epoch
    train(load_config(None, [*common, f"output_dir={tmp_path / 'b'}", "max_steps=4"]))
    resumed = train(load_config(None, [*common, f"output_dir={tmp_path / 'b'}", "max_steps=10"]), resume="latest")
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    empty = tmp_path / "e.yaml"
    empty.write_text("{}\n")
    assert main(["train", str(empty), *common, f"dataset={bad}", "max_steps=2", "batch_size=2",
                 f"output_dir={tmp_path / 'c'}"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "'chosen' and 'rejected' are identical" in err and "stream in epoch 0" in err
