"""Bad input at every entry point: one clear message naming the row / key / file, exit code 2, no partial output.

The committed corpus is ``tests/data/bad/`` (tiny JSON Lines and YAML files); binary and big cases
(truncated Parquet, broken, empty and decompression-bomb images) are generated here in ``tmp_path``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmpref.cli import main
from mmpref.data import DataError, prepare_text_dataset, validate_rows
from mmpref.data.images import MAX_IMAGE_PIXELS, image_row_problems, prepare_image_dataset
from mmpref.data.text_checks import visible
from mmpref.data.validation import row_problems
from mmpref.tiny_models import make_tiny_clip, make_tiny_lm

REPO = Path(__file__).resolve().parent.parent
BAD = REPO / "tests" / "data" / "bad"
GOOD_ROWS = [
    {"prompt": f"Question {i}: how do I bake bread number {i}?", "chosen": f"Knead it {i} times.",
     "rejected": f"Go away {i}."}
    for i in range(8)
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("bad_lm") / "lm", seed=0)


@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_data") / "good.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD_ROWS))
    return path


def train_argv(config: Path | None, lm: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """``mmpref train`` on the tiny LM; ``config=None`` uses an empty config file beside ``out``."""
    if config is None:
        config = out.parent / "empty.yaml"
        config.write_text("{}\n")
    return ["train", str(config), f"model={lm}", f"dataset={data}", f"output_dir={out}", "max_steps=1",
            "batch_size=2", "report_to=none", "max_length=64", "max_prompt_length=32", *extra]  # fmt: skip


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_no_model_output(out: Path) -> None:
    """Nothing a later run or a user could take for a finished run."""
    assert not (out / "final").exists() and not (out / ".tmp-final").exists()
    assert not (out / "summary.json").exists()


def png_bytes(color: str = "red", size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid 1x1 PNG whose header claims ``width x height``: tiny on disk, gigabytes if decoded."""
    data = bytearray(png_bytes(size=1))
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), then width, height
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13]))
    data[ihdr + 8 + 13 : ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


# ------------------------------------------------------------------------------------ text datasets

TEXT_CASES = {  # corpus file -> what the message must say (the row / line and the problem)
    "missing_columns.jsonl": "missing columns: chosen, rejected for paired data",
    "wrong_type.jsonl": "row 0: 'chosen' must be a string or a list of chat messages, got int",
    "mixed_types.jsonl": "column 'chosen' mixes types: row 0 (line 1) holds a str, row 2 (line 3) a number",
    "empty_string.jsonl": "row 2: empty 'rejected'",
    "chosen_equals_rejected.jsonl": "row 2: 'chosen' and 'rejected' are identical",
    "differ_only_invisibly.jsonl": "row 2: 'chosen' and 'rejected' are identical",
    "invisible_only.jsonl": "row 2: empty 'chosen'",
    "nan_score.jsonl": "row 2: 'score_chosen' is nan",
    "inf_score.jsonl": "row 2: 'score_rejected' is -inf",
    "label_outside.jsonl": "row 2: 'label' must be a bool (or 0/1), got 2",
    "invalid_json_line.jsonl": "line 3 is not valid JSON",
    "invalid_utf8.jsonl": "line 3 is not valid UTF-8 (byte 0xe9); save the file as UTF-8",
    "lone_surrogate.jsonl": "line 3: 'chosen' holds a lone surrogate U+D83D",
}
HOW_TO_FIX = {"row": "Fix them, or set `on_bad_rows: skip`"}
# unpaired rows: a loss that trains on them, so the rows themselves are checked (the plan refuses sigmoid on them)
TEXT_CASE_ARGS = {"label_outside.jsonl": ("loss.type=rpo", "rpo.mode=unpaired")}


def test_corpus_has_a_case_for_every_file():
    corpus = (p.name for p in (BAD / "text").glob("*") if p.name != ".mmpref_cache")  # Arrow copies
    assert sorted([*TEXT_CASES, "unicode_valid.jsonl"]) == sorted(corpus)


@pytest.mark.parametrize("name", sorted(TEXT_CASES))
def test_bad_text_dataset_stops_train_with_exit_2(name, lm, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(train_argv(None, lm, BAD / "text" / name, out, *TEXT_CASE_ARGS.get(name, ())), capsys)
    assert code == 2, err
    assert "mmpref train: error: " in err and str(BAD / "text" / name) in err  # names the file
    assert TEXT_CASES[name] in err, err
    if TEXT_CASES[name].startswith("row "):
        assert HOW_TO_FIX["row"] in err
    assert_no_model_output(out)


def test_unicode_edge_cases_are_valid_text(tmp_path):
    """Emoji (ZWJ sequences, flags), right-to-left scripts, combining marks and CJK are ordinary text."""
    ds = prepare_text_dataset(BAD / "text" / "unicode_valid.jsonl")
    assert ds.dataset.num_rows == 4 and ds.skipped == 0
    # NFC: a decomposed é equals the composed one; invisible characters do not count
    assert visible("e\u0301") == "\u00e9" and visible("\u200b a\u200d \ufeff") == "a"
    assert visible("👨\u200d👩") == "👨👩"


def test_truncated_parquet_names_the_file(lm, good_data, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD_ROWS), whole)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    code, err = run_cli(train_argv(None, lm, cut, tmp_path / "run"), capsys)
    assert code == 2 and f"{cut}: not a readable Parquet file" in err, err
    assert_no_model_output(tmp_path / "run")


def test_long_texts_are_truncated_and_train(lm, tmp_path, capsys):
    """Texts far beyond max_length are valid: tokenization truncates them and training runs."""
    from transformers import AutoTokenizer

    from mmpref.adapters.causal_lm import tokenize_row

    long = " ".join(f"word{i}" for i in range(3000))
    tok = AutoTokenizer.from_pretrained(lm)
    row = tokenize_row(tok, 0, "Q? " + long, [long + " yes", long + " no"], max_length=64, max_prompt_length=32)
    assert len(row.prompt) == 32
    assert all(0 < len(r) <= 64 - len(row.prompt) for r in row.responses)  # cut like TRL: EOS may go
    rows = [{"prompt": long, "chosen": long + " good", "rejected": "bad " + long}, *GOOD_ROWS[:3]]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code, err = run_cli(train_argv(None, lm, data, out, "eval_split=0"), capsys)
    assert code == 0, err
    assert (out / "final" / "config.json").is_file() and not (out / ".tmp-final").exists()


# ------------------------------------------------------------------------------------------ configs

CONFIG_CASES = {  # corpus file -> the key and the problem
    "unknown_key.yaml": "loss.betta: unknown key; valid keys here:",
    "wrong_type.yaml": "seed: expected int, got str 'ten'",
    "negative_beta.yaml": "loss.beta: must be > 0, got -0.1",
    "nan_learning_rate.yaml": "learning_rate: must be a finite number, got nan",
    "invalid_yaml.yaml": "is not valid YAML at line 3, column 10",
    "section_not_a_mapping.yaml": "loss: expected a mapping of LossConfig keys",
    "bad_scheduler.yaml": "lr_scheduler: must be one of linear, cosine",
    "lora_rank_zero.yaml": "lora.r: must be > 0, got 0",
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_config_exit_2_before_anything_is_written(name, lm, good_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(train_argv(BAD / "configs" / name, lm, good_data, out), capsys)
    assert code == 2 and CONFIG_CASES[name] in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ('model=""', "model: required"),
        ("model={tmp}/no_such_model", "model: no such folder"),
        ("model={tmp}/not_a_model", "model: {tmp}/not_a_model is a folder but not a transformers model"),
        ("model={tmp}/a_file", "is a file; expected a transformers model"),
        ("model=nobody/not-cached-model", "not in the local Hugging Face cache"),
        ("dataset={tmp}/none.jsonl", "dataset: no such file"),
        ("output_dir={tmp}/a_file/run", "output_dir: cannot write to"),
        ("output_dir={tmp}/a_file", "output_dir: cannot write to"),
        ("loss.beta=[0.1", "loss.beta: the value '[0.1' is not valid YAML"),
        ("loss.beta=.inf", "loss.beta: must be a finite number"),
    ],
)
def test_bad_paths_and_overrides_exit_2(override, message, lm, good_data, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "weights.bin").write_bytes(b"")
    out = tmp_path / "run"
    argv = [*train_argv(None, lm, good_data, out), override.format(tmp=tmp_path)]
    code, err = run_cli(argv, capsys)
    assert code == 2 and message.format(tmp=tmp_path) in err, err
    assert not out.exists()  # the preflight writes nothing


def test_too_few_rows_for_one_batch_is_a_config_error(lm, tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(GOOD_ROWS[0]) + "\n")
    code, err = run_cli(train_argv(None, lm, data, tmp_path / "run", "batch_size=4"), capsys)
    assert code == 2 and "dataset: 1 rows give fewer than 1 batches of 4" in err, err
    assert_no_model_output(tmp_path / "run")


def test_real_process_exit_code_is_2(lm, good_data, tmp_path):
    """One real subprocess: the console entry point's exit status, not just main()'s return value."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = train_argv(BAD / "configs" / "negative_beta.yaml", lm, good_data, tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "mmpref.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "mmpref train: error: loss.beta: must be > 0, got -0.1"
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------- images


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes("red"))
    (root / "b.png").write_bytes(png_bytes("blue"))
    (root / "zero.png").write_bytes(b"")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "bomb.png").write_bytes(bomb_png(10_000, 10_000))  # above mmpref's limit, below PIL's error
    (root / "huge.png").write_bytes(bomb_png(50_000, 50_000))  # PIL itself refuses to open it
    (tmp_path / "outside.png").write_bytes(png_bytes("green"))
    return root


def image_rows_file(folder: Path, bad_row: dict) -> Path:
    ok = {"caption": "a red circle", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1}
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (ok, {**ok, **bad_row})))
    return path


IMAGE_CASES = {
    "zero_byte": ({"jpg_1": "zero.png"}, "row 1: 'jpg_1' is an empty file"),
    "undecodable": ({"jpg_0": "broken.png"}, "row 1: 'jpg_0' does not decode as an image"),
    "bomb": ({"jpg_0": "bomb.png"}, f"row 1: 'jpg_0' is 10000x10000 pixels, more than the {MAX_IMAGE_PIXELS}"),
    "huge_bomb": ({"jpg_0": "huge.png"}, "row 1: 'jpg_0' does not decode as an image (DecompressionBombError"),
    "parent_escape": ({"jpg_0": "../../etc/passwd"}, "row 1: 'jpg_0' path '../../etc/passwd' points outside"),
    "sibling_escape": ({"jpg_1": "../outside.png"}, "row 1: 'jpg_1' path '../outside.png' points outside"),
    "absolute_outside": ({"jpg_0": "/etc/passwd"}, "row 1: 'jpg_0' path '/etc/passwd' points outside"),
    "label_outside": ({"label_0": 0.3}, "row 1: 'label_0' must be 1, 0 or 0.5, got 0.3"),
    "label_nan": ({"label_0": float("nan")}, "row 1: 'label_0' must be 1, 0 or 0.5, got nan"),
    "empty_caption": ({"caption": "\u200b "}, "row 1: empty 'caption'"),
    "caption_type": ({"caption": 5}, None),  # mixed JSON types: named by line instead
    "same_image": ({"jpg_1": "a.png"}, "row 1: 'jpg_0' and 'jpg_1' are the same image"),
}
CONFINED = {"parent_escape", "sibling_escape", "absolute_outside"}  # bad only with confine_image_paths


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_image_rows_are_named(case, image_dir):
    change, message = IMAGE_CASES[case]
    with pytest.raises(DataError) as info:  # labels and captions when opened, images when read
        rows = prepare_image_dataset(image_rows_file(image_dir, change), confine_image_paths=case in CONFINED)
        for i in range(len(rows)):
            rows.load(i)
    text = str(info.value)
    if message is None:
        assert "column 'caption' mixes types" in text and "(line 2)" in text
    else:
        assert ("row 1: " in text or "row 1 (0-based): " in text) and message.split(": ", 1)[1] in text, text
        assert "set `on_bad_rows: skip`" in text
    assert "root:" not in text  # never the content of a file outside the dataset


def test_absolute_path_inside_the_dataset_folder_is_fine(image_dir):
    ds = prepare_image_dataset(image_rows_file(image_dir, {"jpg_0": str(image_dir / "a.png"),
                                                           "jpg_1": str(image_dir / "b.png")}))  # fmt: skip
    assert len(ds) == 2 and ds.pairs[1].chosen == (image_dir / "a.png").resolve()


def test_symlink_out_of_the_dataset_folder_is_refused(image_dir, tmp_path):
    (image_dir / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(DataError, match="'link.png' points outside the dataset folder"):
        prepare_image_dataset(image_rows_file(image_dir, {"jpg_0": "link.png"}), confine_image_paths=True).load(1)


# ------------------------------------------------------------------------------------- synth, score


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def test_synth_bad_prompts_file_exit_2_and_no_output(lm, tmp_path, capsys):
    out = tmp_path / "synth.jsonl"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "one"}\n{"prompt": "two"\n')
    cfg = write_yaml(tmp_path / "s.yaml", {"teacher": str(lm), "prompts_file": str(prompts), "principle": "p",
                                           "output": str(out)})  # fmt: skip
    code, err = run_cli(["synth", cfg], capsys)
    assert code == 2 and f"{prompts}: line 2 is not valid JSON" in err, err
    prompts_txt = tmp_path / "prompts.txt"
    prompts_txt.write_bytes(b"caf\xe9\n")
    code, err = run_cli(["synth", cfg, f"prompts_file={prompts_txt}"], capsys)
    assert code == 2 and "not UTF-8 text" in err, err
    code, err = run_cli(["synth", cfg, "prompts_file=null", 'prompts=["ok", "  "]'], capsys)
    assert code == 2 and "prompt 1 (inline prompts first, then the file) is empty" in err, err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_score_bad_rows_exit_2_and_no_output(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p", "chosen": "thanks, happy to help", "rejected": "go away"},
            {"prompt": "q", "chosen": "same", "rejected": "same"}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scored.jsonl"
    cfg = write_yaml(tmp_path / "s.yaml", {"input": str(data), "reward": "rule:polite", "output": str(out)})
    code, err = run_cli(["score", cfg], capsys)
    assert code == 2 and f"{data}: 1 of 2 rows are bad" in err and "row 1: 'chosen' and 'rejected'" in err
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert run_cli(["score", cfg, "on_bad_rows=skip"], capsys)[0] == 0
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["p"]
    code, err = run_cli(["score", cfg, f"input={BAD / 'text' / 'invalid_json_line.jsonl'}"], capsys)
    assert code == 2 and "line 3 is not valid JSON" in err


def test_interrupted_score_leaves_only_a_partial_file(tmp_path, capsys, monkeypatch):
    """A crash mid-run never leaves a file under the output name; the rerun resumes and renames."""
    from mmpref.rdpo import reward as reward_module

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "p", "chosen": f"thanks {i}",
                                        "rejected": f"no {i}"}) + "\n" for i in range(4)))  # fmt: skip
    out = tmp_path / "scored.jsonl"
    cfg = write_yaml(tmp_path / "s.yaml", {"input": str(data), "reward": "rule:polite", "output": str(out),
                                           "batch_size": 2})  # fmt: skip
    calls = []
    original = reward_module.RuleReward.score

    def crash_on_second_batch(self, prompts, responses):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, prompts, responses)

    monkeypatch.setattr(reward_module.RuleReward, "score", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        main(["score", str(cfg)])
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and len(partial.read_text().splitlines()) == 2
    monkeypatch.undo()
    assert main(["score", str(cfg)]) == 0
    assert not partial.exists() and [json.loads(x)["id"] for x in out.read_text().splitlines()] == [
        f"r{i}" for i in range(4)
    ]


# -------------------------------------------------------------------------------------- style-score


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("bad_clip"), seed=0)


@pytest.mark.parametrize("case", ["zero_byte", "undecodable", "bomb", "prompts_not_utf8", "missing_refs"])
def test_style_score_bad_input_exit_2_and_no_report(case, clip_dir, tmp_path, capsys):
    gen, refs = tmp_path / "generated", tmp_path / "refs"
    gen.mkdir()
    refs.mkdir()
    for i, color in enumerate(("red", "blue")):
        (gen / f"g{i}.png").write_bytes(png_bytes(color))
        (refs / f"r{i}.png").write_bytes(png_bytes(color, size=12))
    out = tmp_path / "report.json"
    argv = ["style-score", "--generated", gen, "--style-refs", refs, "--clip-model", f"local-dir:{clip_dir}",
            "--out", out, "--no-cache", "--on-bad-images", "error", "--n-resamples", "20"]  # fmt: skip
    expected = {"zero_byte": "g9.png", "undecodable": "g9.png", "bomb": "10000x10000 pixels",
                "prompts_not_utf8": "not UTF-8 text", "missing_refs": "image folder not found"}[case]  # fmt: skip
    if case == "zero_byte":
        (gen / "g9.png").write_bytes(b"")
    elif case == "undecodable":
        (gen / "g9.png").write_bytes(b"GIF89a garbage")
    elif case == "bomb":
        (gen / "g9.png").write_bytes(bomb_png(10_000, 10_000))
    elif case == "prompts_not_utf8":
        (tmp_path / "p.txt").write_bytes(b"a red \xff\nblue\n")
        argv += ["--prompts", tmp_path / "p.txt"]
    else:
        argv[argv.index("--style-refs") + 1] = tmp_path / "nope"
    code, err = run_cli(argv, capsys)
    assert code == 2 and "mmpref style-score: error:" in err and expected in err, err
    assert not out.exists() and not any(tmp_path.glob("*_sheet.png"))


def test_sample_command_bad_input_if_present(tmp_path, capsys):
    from mmpref.cli import build_parser

    choices = next(a for a in build_parser()._actions if a.dest == "command").choices
    if "sample" not in choices:
        pytest.skip("no sample command")
    try:
        code = main(["sample", str(tmp_path / "missing.yaml")])
    except SystemExit as exit_:  # argparse's own usage errors exit 2 as well
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ validator properties

TEXT_VALUES = st.one_of(
    st.none(), st.text(max_size=12), st.integers(), st.floats(), st.booleans(),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                    "content": st.text(max_size=8)}), max_size=3),
    st.lists(st.one_of(st.integers(), st.text(max_size=3), st.dictionaries(st.text(max_size=3), st.integers())),
             max_size=3),
)  # fmt: skip
ROWS = st.fixed_dictionaries(
    {},
    optional={"prompt": TEXT_VALUES, "chosen": TEXT_VALUES, "rejected": TEXT_VALUES, "completion": TEXT_VALUES,
              "label": st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.floats(), st.text(max_size=2)),
              "score_chosen": st.one_of(st.none(), st.floats(), st.integers(), st.text(max_size=2)),
              "score_rejected": st.one_of(st.none(), st.floats(), st.integers(), st.text(max_size=2))},
)  # fmt: skip
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(row=ROWS, fmt=st.sampled_from(["paired", "unpaired"]), scored=st.booleans())
def test_row_problems_is_total_and_accepted_rows_are_usable(row, fmt, scored):
    scores = ("score_chosen", "score_rejected") if scored and fmt == "paired" else ()
    problems = row_problems(row, fmt, scores)  # never raises, whatever the values
    assert all(isinstance(p, str) and p for p in problems)
    if problems:
        return
    texts = ("prompt", "chosen", "rejected") if fmt == "paired" else ("prompt", "completion")
    for name in texts:  # accepted: every text field is non-empty, visible, valid Unicode
        value = row[name]
        contents = [value] if isinstance(value, str) else [m["content"] for m in value]
        assert any(visible(c) for c in contents)
        for c in contents:
            c.encode("utf-8")
    if fmt == "paired":
        assert row["chosen"] != row["rejected"]
    else:
        assert row["label"] in (0, 1)


@FAST
@given(row=ROWS, fmt=st.sampled_from(["paired", "unpaired"]))
def test_missing_or_empty_field_is_always_a_problem(row, fmt):
    texts = ("prompt", "chosen", "rejected") if fmt == "paired" else ("prompt", "completion")
    for name in texts:
        for empty in (None, "", "  \n", "\u200b\ufeff", []):
            problems = row_problems({**row, name: empty}, fmt)
            assert any(repr(name) in p for p in problems), (name, empty, problems)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10), st.text(max_size=10)), min_size=1,
                   max_size=6),
    blank=st.integers(0, 5),
    field=st.sampled_from(["prompt", "chosen", "rejected"]),
)  # fmt: skip
def test_validate_rows_names_every_bad_row_by_number(texts, blank, field):
    rows = [{"prompt": p or "q", "chosen": "a" + c, "rejected": "b" + r} for p, c, r in texts]
    blank %= len(rows)
    rows[blank][field] = " "
    bad = validate_rows(datasets.Dataset.from_list(rows), "paired")
    assert blank in {b.row for b in bad}
    assert any(str(b).startswith(f"row {blank}: ") and f"empty {field!r}" in str(b) for b in bad)
    for b in bad:  # every reported row really is bad
        assert row_problems(rows[b.row], "paired")


IMAGE_VALUES = st.one_of(
    st.none(), st.binary(max_size=16), st.text(max_size=12), st.integers(), st.floats(),
    st.sampled_from(["a.png", "b.png", "../a.png", "/etc/passwd", "a.png/..", ".", "..", "zero.png", "\x00"]),
    st.fixed_dictionaries({"bytes": st.one_of(st.none(), st.binary(max_size=8)),
                           "path": st.one_of(st.none(), st.sampled_from(["a.png", "../x", "b.png"]))}),
)  # fmt: skip


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])  # fmt: skip
@given(caption=TEXT_VALUES, jpg_0=IMAGE_VALUES, jpg_1=IMAGE_VALUES,
       label=st.one_of(st.none(), st.sampled_from([0, 1, 0.5, 1.0]), st.floats(), st.integers(), st.text(max_size=2)))  # fmt: skip
def test_image_row_problems_is_total_and_accepted_rows_are_usable(image_dir, caption, jpg_0, jpg_1, label):
    problems, refs, blobs = image_row_problems(caption, jpg_0, jpg_1, label, image_dir, confine_to=image_dir)
    assert all(isinstance(p, str) and p for p in problems)
    if problems:
        return
    assert isinstance(caption, str) and visible(caption) and label in (0, 0.5, 1)
    assert blobs[0] != blobs[1]
    root = image_dir.resolve()
    for ref in refs:  # confined, a path reference is a file inside the dataset folder
        assert isinstance(ref, bytes) or (Path(ref).is_file() and Path(ref).is_relative_to(root))


def test_sample_with_an_empty_prompts_file_exits_2(tmp_path, capsys):
    from mmpref.cli import main

    (tmp_path / "p.txt").write_text("# only a comment\n")
    assert main(["sample", str(tmp_path), "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "p.txt: no prompts" in capsys.readouterr().err
