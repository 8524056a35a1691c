"""Data sources through ``datasets``: hub ids (offline, from a laid-out hub cache), every local form, files as
other tools write them, TRL's formats (implicit prompts included), Pick-a-Pic rows and image paths."""

from __future__ import annotations

import codecs
import csv
import io
import json
import shutil
from pathlib import Path

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmpref.data import DataError, load_rows, prepare_text_dataset
from mmpref.data.images import prepare_image_dataset
from mmpref.data.splits import config_sources
from mmpref.data.text_formats import extract_prompt
from mmpref.tiny_models import make_tiny_lm
from mmpref.training import load_config, train
from tests.hub_cache import use_hub_cache, write_hub_repo

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."} for i in range(4)
]
TEST_ROWS = [{"prompt": f"Held out {i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(2)]


def chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


CHAT_ROWS = [{"chosen": chat(f"Tell me about topic {i}.", f"Topic {i} is lovely."),
              "rejected": chat(f"Tell me about topic {i}.", "Go away.")} for i in range(8)]  # fmt: skip
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.jsonl
  - split: test
    path: data/test-*.jsonl
- config_name: small
  data_files:
  - split: train
    path: small/*.jsonl
---
# Preference pairs
"""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def png(color: str, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """A fresh ``datasets`` cache (hub rows, caches of in-memory rows), never the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    return tmp_path / "hf" / "datasets"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under ``HF_HOME``, offline (``datasets`` reads the flag at import, so it is patched)."""
    cache = use_hub_cache(monkeypatch, tmp_path / "hf")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def hub_repo(
    cache: Path, tmp_path: Path, repo_id: str, files: dict[str, str | bytes], revision: str = "main"
) -> str:
    """``files`` (path -> content) as the dataset repo ``repo_id`` at ``revision``; returns the commit."""
    folder = tmp_path / "repos" / repo_id / revision
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return write_hub_repo(cache, repo_id, folder, repo_type="dataset", revision=revision)


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ------------------------------------------------------------------------------------------ hub ids


def test_hub_id_loads_offline_from_the_hub_cache(hub, tmp_path):
    old = hub_repo(hub, tmp_path, "org/prefs", {"data/train-00000.jsonl": jsonl(ROWS[:1])}, revision="v1")
    commit = hub_repo(hub, tmp_path, "org/prefs", {
        "README.md": README, "data/train-00000.jsonl": jsonl(ROWS), "data/test-00000.jsonl": jsonl(TEST_ROWS),
        "small/part.jsonl": jsonl(ROWS[:2])})  # fmt: skip
    result = prepare_text_dataset("org/prefs")
    assert result.dataset.to_list() == ROWS and str(result.source) == "org/prefs (split 'train')"
    assert result.cache_dir == Path(datasets.config.HF_DATASETS_CACHE) / "mmpref"
    assert prepare_text_dataset("org/prefs", split="test").dataset.to_list() == TEST_ROWS
    assert prepare_text_dataset("org/prefs", config_name="small").dataset.to_list() == ROWS[:2]
    assert load_rows("org/prefs", revision=commit).to_list() == ROWS
    assert load_rows("org/prefs", revision="v1").to_list() == ROWS[:1]  # a tag's snapshot
    assert load_rows(f"org/prefs@{old}").to_list() == ROWS[:1]
    with pytest.raises(DataError, match=r"org/prefs \(split 'validation'\): .*validation"):
        load_rows("org/prefs", split="validation")
    with pytest.raises(DataError, match="org/prefs.*'nope' not found"):
        load_rows("org/prefs", config_name="nope")


def test_hub_id_missing_offline_names_the_id_and_the_fix(hub):
    with pytest.raises(DataError) as err:
        prepare_text_dataset("nobody/absent")
    msg = str(err.value)
    assert msg.startswith("nobody/absent: not in the local Hugging Face cache") and "HF_HUB_OFFLINE=1" in msg
    assert "hf download nobody/absent --repo-type dataset" in msg and "give a local path" in msg
    with pytest.raises(DataError, match="nobody/absent@v2: not in the local Hugging Face cache"):
        prepare_image_dataset("nobody/absent", revision="v2")


def test_hub_image_dataset_offline_with_config_and_split(hub, tmp_path):
    pickapic = datasets.Dataset.from_dict({  # as yuvalkirstain/pickapic_v2 stores it: binary jpg_0 / jpg_1
        "caption": ["red or blue", "green or white", "a tie"], "jpg_0": [png("red"), png("green"), png("red")],
        "jpg_1": [png("blue"), png("white"), png("black")], "label_0": [1.0, 0.0, 0.5]})  # fmt: skip
    by_path = datasets.Dataset.from_list(
        [{"caption": "by path", "jpg_0": "images/a.png", "jpg_1": "images/b.png", "label_0": 0}]
    )
    parquet = {}
    for name, ds in (("data/train-00000.parquet", pickapic), ("data/test-00000.parquet", pickapic),
                     ("small/rows.parquet", by_path)):  # fmt: skip
        buf = io.BytesIO()
        ds.to_parquet(buf)
        parquet[name] = buf.getvalue()
    readme = README.replace(".jsonl", ".parquet")
    hub_repo(hub, tmp_path, "org/pics", {"README.md": readme, **parquet, "images/a.png": png("red"),
                                         "images/b.png": png("blue")})  # fmt: skip
    ds = prepare_image_dataset("org/pics", split="test")
    assert (len(ds), ds.ties, ds.skipped) == (2, 1, 0)
    assert ds.pairs[0].chosen == png("red") and ds.pairs[1].chosen == png("white")  # label_0 = 0: jpg_1 wins
    for confine in (False, True):  # paths start at the cached snapshot, whose files link into blobs/
        by_path = prepare_image_dataset("org/pics", config_name="small", confine_image_paths=confine)
        (pair,) = by_path.pairs
        assert pair.chosen.read_bytes() == png("blue") and pair.chosen.is_relative_to(hub.resolve())
    assert by_path.cache_dir == Path(datasets.config.HF_DATASETS_CACHE) / "mmpref"


# ---------------------------------------------------------------------------------- local sources


def test_csv_arrow_glob_shards_and_saved_folders(tmp_path):
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)
    saved = datasets.Dataset.from_list(ROWS)
    saved.save_to_disk(str(tmp_path / "saved"))
    shutil.copy(next((tmp_path / "saved").glob("*.arrow")), tmp_path / "d.arrow")
    (tmp_path / "parts").mkdir()
    for i in range(2):
        datasets.Dataset.from_list(ROWS[2 * i : 2 * i + 2]).to_parquet(
            str(tmp_path / "parts" / f"p{i}.parquet")
        )
        write_jsonl(tmp_path / "shards" / f"rows-{i}.jsonl", ROWS[2 * i : 2 * i + 2])
    write_jsonl(tmp_path / "splits" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "splits" / "test.jsonl", TEST_ROWS)
    datasets.DatasetDict({"train": saved, "test": datasets.Dataset.from_list(TEST_ROWS)}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    for source in ("d.csv", "d.arrow", "parts/*.parquet", "shards", "saved", "splits", "saved_dict"):
        result = prepare_text_dataset(tmp_path / source)
        assert result.dataset.to_list() == ROWS, source
        assert result.source == tmp_path / source
    for source in ("splits", "saved_dict"):
        assert load_rows(tmp_path / source, split="test").to_list() == TEST_ROWS
    assert prepare_text_dataset(tmp_path / "shards").cache_dir == tmp_path / "shards" / ".mmpref_cache"
    assert prepare_text_dataset(tmp_path / "d.csv").cache_dir == tmp_path / ".mmpref_cache"
    with pytest.raises(DataError, match=r"d\.csv: no split 'test'; it has train"):
        load_rows(tmp_path / "d.csv", split="test")
    with pytest.raises(DataError, match="the pattern matches no files"):
        load_rows(tmp_path / "parts" / "*.jsonl")


def test_bom_and_crlf_files_read_as_the_clean_files(tmp_path):
    rows = [*ROWS, {"prompt": "Two\nlines?", "chosen": 'Yes, "quoted", with commas.', "rejected": "No."}]
    clean = {"d.jsonl": jsonl(rows), "d.json": json.dumps(rows, indent=2) + "\n"}
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    clean["d.csv"] = buf.getvalue()
    for name, text in clean.items():
        (tmp_path / "clean").mkdir(exist_ok=True)
        (tmp_path / "clean" / name).write_text(text, newline="")
        (tmp_path / "windows").mkdir(exist_ok=True)  # every line end CRLF, a byte-order mark first
        (tmp_path / "windows" / name).write_bytes(codecs.BOM_UTF8 + text.replace("\n", "\r\n").encode())
        expected = load_rows(tmp_path / "clean" / name).to_list()
        assert expected == rows, name
        assert load_rows(tmp_path / "windows" / name).to_list() == expected, name


def test_bad_json_lines_and_types_are_named_in_any_source(tmp_path):
    write_jsonl(tmp_path / "shards" / "a.jsonl", ROWS)
    (tmp_path / "shards" / "b.jsonl").write_bytes(
        codecs.BOM_UTF8 + b'{"prompt": "p", "chosen": "c", "rejected": "r"}\r\n{"prompt": \r\n'
    )
    with pytest.raises(DataError, match=r"shards/b\.jsonl: line 2 is not valid JSON"):
        load_rows(tmp_path / "shards")
    msgs = [{"role": "assistant", "content": "fine"}]
    mixed = [{"prompt": "p", "chosen": msgs, "rejected": msgs},
             {"prompt": "q", "chosen": [{"role": "assistant", "content": 5}], "rejected": msgs}]  # fmt: skip
    write_jsonl(tmp_path / "parts" / "x.jsonl", mixed)
    expected = (
        r"column 'chosen\[\].content' mixes types: row 0 \(line 1\) holds a str, row 1 \(line 2\) a number"
    )
    with pytest.raises(DataError, match=expected):
        load_rows(tmp_path / "parts" / "*.jsonl")
    with pytest.raises(
        DataError, match=r"column 'chosen\[\].content' mixes types: row 0 holds a str, row 1 a number"
    ):
        load_rows(mixed)  # a list of dicts: no lines, the rows alone


# ------------------------------------------------------------------------------------- TRL formats


MESSAGES = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": "b"}]  # fmt: skip
TEXTS = st.text("ab ", min_size=1, max_size=8)  # few letters and spaces: long common prefixes, spaces at ends
CONVERSATIONS = st.lists(st.sampled_from(MESSAGES), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(chosen=st.one_of(TEXTS, CONVERSATIONS), data=st.data())
def test_extract_prompt_is_trls(chosen, data):
    from trl.data_utils import extract_prompt as trl_extract_prompt

    other = data.draw(TEXTS if isinstance(chosen, str) else CONVERSATIONS)
    expected = trl_extract_prompt({"chosen": chosen, "rejected": other})
    assert extract_prompt(chosen, other) == (expected["prompt"], expected["chosen"], expected["rejected"])


def test_implicit_prompts_conversational_and_strings_match_trl(tmp_path):
    from trl.data_utils import maybe_extract_prompt

    strings = [{"chosen": f"Question {i}: how? Like this.", "rejected": f"Question {i}: how? Not at all."}
               for i in range(3)]  # fmt: skip
    h4_style = [
        {"prompt": r["chosen"][0]["content"], **r} for r in CHAT_ROWS[:3]
    ]  # a string prompt beside chats
    for name, rows in (("chat", CHAT_ROWS), ("strings", strings), ("h4", h4_style)):
        result = prepare_text_dataset(write_jsonl(tmp_path / f"{name}.jsonl", rows))
        assert result.implicit_prompt and result.format == "paired", name
        got = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in result.dataset.to_list()]
        assert got == [maybe_extract_prompt(r) for r in rows], name
    assert got[0]["prompt"] == [CHAT_ROWS[0]["chosen"][0]] and got[0]["chosen"] == [CHAT_ROWS[0]["chosen"][1]]
    text = prepare_text_dataset(tmp_path / "strings.jsonl").dataset[0]
    assert (text["prompt"], text["chosen"]) == (
        "Question 0: how?",
        " Like this.",
    )  # the space goes to the responses
    bad = [
        *strings,
        {"chosen": "Yes.", "rejected": "No."},
        {"chosen": chat("q", "a"), "rejected": chat("p", "b")},
    ]
    with pytest.raises(
        DataError, match=r"row 3: no prompt: 'chosen' and 'rejected' do not start with a common prompt"
    ):
        prepare_text_dataset(write_jsonl(tmp_path / "bad.jsonl", bad[:4]))
    with pytest.raises(DataError, match=r"row 3: no prompt"):
        prepare_text_dataset([*CHAT_ROWS[:3], bad[4]])


def test_explicit_conversational_rows_with_assistant_only_responses(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{i}?"}],
             "chosen": [{"role": "assistant", "content": f"A{i}."}],
             "rejected": [{"role": "assistant", "content": "No."}]} for i in range(3)]  # fmt: skip
    result = prepare_text_dataset(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert not result.implicit_prompt and result.dataset.to_list() == rows


def test_unpaired_rows_standard_and_conversational(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}?"}],
             "completion": [{"role": "assistant", "content": "A."}], "label": i % 2 == 0} for i in range(4)]  # fmt: skip
    result = prepare_text_dataset(write_jsonl(tmp_path / "kto.jsonl", rows))
    assert result.format == "unpaired" and result.dataset["label"][:] == [True, False, True, False]
    plain = [{"prompt": "p", "completion": "c", "label": 1}, {"prompt": "p", "completion": "c", "label": 3}]
    datasets.Dataset.from_list(plain).to_csv(str(tmp_path / "kto.csv"), index=False)
    with pytest.raises(DataError, match=r"(?s)kto\.csv: 1 of 2 rows are bad.*row 1: 'label' must be a bool"):
        prepare_text_dataset(tmp_path / "kto.csv")


# -------------------------------------------------------------------------------------- Pick-a-Pic


def test_pickapic_rows_with_image_features_from_parquet_and_a_saved_dataset(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "yellow").save(tmp_path / "img" / "y.png")
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Image(), "label_0": datasets.Value("float64")})  # fmt: skip
    columns = {"caption": ["red or blue", "yellow or green", "a tie"],  # the second image: a path, not bytes
               "jpg_0": [{"bytes": png("red"), "path": None}, str(tmp_path / "img" / "y.png"), png("red")],
               "jpg_1": [png("blue"), png("green"), png("black")], "label_0": [1.0, 0.0, 0.5]}  # fmt: skip
    ds = datasets.Dataset.from_dict(columns, features=features)
    ds.to_parquet(str(tmp_path / "pics.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "pics.parquet", tmp_path / "saved"):
        result = prepare_image_dataset(source)
        assert (len(result), result.ties, result.skipped) == (2, 1, 0), source
        first, second = result.pairs
        assert (first.chosen, first.rejected) == (png("red"), png("blue"))
        assert second.chosen == png("green")  # label_0 = 0: jpg_1 is chosen
        rejected = second.rejected if isinstance(second.rejected, bytes) else second.rejected.read_bytes()
        assert rejected == (tmp_path / "img" / "y.png").read_bytes()


# ------------------------------------------------------------------------------------- image paths


@pytest.fixture
def image_tree(tmp_path) -> tuple[Path, Path]:
    """(images folder, data folder): two siblings, so the images lie outside the dataset's folder."""
    images, data = tmp_path / "images", tmp_path / "data"
    images.mkdir()
    data.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "a.png")
    Image.new("RGB", (8, 8), "blue").save(images / "b.png")
    return images, data


def image_rows(folder: Path, a: str, b: str) -> Path:
    return write_jsonl(
        folder / "rows.jsonl", [{"caption": "red over blue", "jpg_0": a, "jpg_1": b, "label_0": 1}]
    )


def test_image_paths_absolute_relative_and_under_image_root(image_tree):
    images, data = image_tree
    expected = ((images / "a.png").resolve(), (images / "b.png").resolve())
    for a, b, root in ((str(images / "a.png"), str(images / "b.png"), None),  # absolute, outside the data folder
                       ("../images/a.png", "../images/b.png", None),  # relative to the data file's folder
                       ("a.png", "b.png", images)):  # relative to image_root  # fmt: skip
        (pair,) = prepare_image_dataset(image_rows(data, a, b), image_root=root).pairs
        assert (pair.chosen, pair.rejected) == expected, (a, root)
    with pytest.raises(DataError, match=r"row 0 \(0-based\): 'jpg_0' no such file"):  # found when read
        prepare_image_dataset(image_rows(data, "a.png", "b.png")).load(0)  # relative to the data folder by default
    with pytest.raises(DataError, match="image_root: no such folder"):
        prepare_image_dataset(image_rows(data, "a.png", "b.png"), image_root=data / "missing")


def test_confine_image_paths_keeps_paths_inside_the_folder(image_tree):
    images, data = image_tree
    with pytest.raises(DataError) as err:  # found when the row is read
        prepare_image_dataset(
            image_rows(data, str(images / "a.png"), "../images/b.png"), confine_image_paths=True
        ).load(0)
    assert "row 0 (0-based): 'jpg_0' path" in str(err.value) and "points outside the dataset folder" in str(err.value)
    assert "'jpg_1' path '../images/b.png' points outside" in str(err.value)
    (pair,) = prepare_image_dataset(image_rows(data, "a.png", str(images / "b.png")), image_root=images,
                                    confine_image_paths=True).pairs  # fmt: skip
    assert pair.rejected == (images / "b.png").resolve()  # absolute, but inside image_root


# ------------------------------------------------------------------------------ in memory, eval split


def test_in_memory_dataset_and_list_of_dicts_are_validated(tmp_path):
    rows = [*ROWS, {**ROWS[0], "chosen": "  "}]
    with pytest.raises(
        DataError, match=r"(?s)the list of 5 rows: 1 of 5 rows are bad.*row 4: empty 'chosen'"
    ):
        prepare_text_dataset(rows)
    with pytest.raises(
        DataError, match=r"(?s)the in-memory dataset: 1 of 5 rows are bad.*row 4: empty 'chosen'"
    ):
        prepare_text_dataset(datasets.Dataset.from_list(rows).with_format("torch"))
    result = prepare_text_dataset(datasets.Dataset.from_list(rows), on_bad_rows="skip")
    assert (
        result.dataset.to_list() == ROWS and list(result.row_numbers) == [0, 1, 2, 3] and result.skipped == 1
    )
    with pytest.raises(DataError, match="row 1 is a str, expected a dict"):
        prepare_text_dataset([ROWS[0], "not a row"])
    pics = [{"caption": "c", "jpg_0": png("red"), "jpg_1": png("blue"), "label_0": 0}]
    assert prepare_image_dataset(pics).pairs[0].chosen == png("blue")


def test_eval_split_names_a_split(tmp_path):
    from accelerate import Accelerator

    from mmpref.training.build import build_task

    data = tmp_path / "splits"
    write_jsonl(data / "train.jsonl", ROWS)
    write_jsonl(data / "test.jsonl", TEST_ROWS)
    base = [f"model={make_tiny_lm(tmp_path / 'lm')}", f"dataset={data}", f"output_dir={tmp_path / 'run'}",
            "report_to=none", "max_length=64", "max_prompt_length=32"]  # fmt: skip
    cfg = load_config(None, [*base, "eval_split=test", "dataset_config=default"])
    (train_data, _), evaluation = config_sources(cfg)
    assert train_data == str(data) and evaluation == (str(data), {"config_name": "default", "split": "test",
                                                                   "revision": None})  # fmt: skip
    task = build_task(cfg, Accelerator(cpu=True))
    assert (len(task.train), len(task.eval)) == (len(ROWS), len(TEST_ROWS))
    other = write_jsonl(tmp_path / "other" / "eval.jsonl", TEST_ROWS[:1])
    cfg = load_config(None, [*base, f"eval_dataset={other}", "eval_split=0.5", "dataset_config=default"])
    assert config_sources(cfg)[1] == (str(other), {"config_name": None, "split": "train", "revision": None})
    assert config_sources(load_config(None, [*base, "eval_split=0.5"]))[1] is None  # a held-out share instead
    rows = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(TEST_ROWS)}
    )
    task = build_task(load_config(None, [*base, "eval_split=test"]), Accelerator(cpu=True), {"train_dataset": rows})
    assert (len(task.train), len(task.eval)) == (len(ROWS), len(TEST_ROWS))  # in memory, the same splits


# ------------------------------------------------------------------------------------- end to end


def test_train_on_a_hub_dataset_of_implicit_conversational_prompts(hub, tmp_path):
    hub_repo(hub, tmp_path, "org/chat-prefs", {"README.md": README, "data/train-00000.jsonl": jsonl(CHAT_ROWS),
                                               "data/test-00000.jsonl": jsonl(CHAT_ROWS[:2])})  # fmt: skip
    cfg = load_config(None, [f"model={make_tiny_lm(tmp_path / 'lm')}", "dataset=org/chat-prefs", "eval_split=test",
                             f"output_dir={tmp_path / 'run'}", "max_steps=2", "batch_size=2", "report_to=none",
                             "max_length=64", "max_prompt_length=32"])  # fmt: skip
    final = train(cfg)
    assert (final / "config.json").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("eval") for m in metrics for k in m)
