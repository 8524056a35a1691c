"""Files that are not what they should be: a damaged weights file named with the fix, conversational rows without
a chat template refused before any weights load (and the ``chat_template`` key that fixes it), and image paths
that are folders or pipes named as what they are."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from mmpref.cli import main
from mmpref.data.images import image_row_problems
from mmpref.hub import resolve_model, weights_problem
from mmpref.tiny_models import make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT_ROWS = [{"prompt": [{"role": "user", "content": f"What is {i} plus one?"}],
              "chosen": [{"role": "assistant", "content": f"It is {i + 1}."}],
              "rejected": [{"role": "assistant", "content": "No idea."}]} for i in range(4)]  # fmt: skip
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}<assistant>{% endif %}"  # fmt: skip


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("files") / "lm", seed=0)


@pytest.fixture(scope="module")
def chat_rows(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    return path


def train(tmp_path, capsys, model: Path, data: Path, *overrides: str) -> tuple[int, str]:
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    code = main(["train", str(config), f"model={model}", f"dataset={data}", f"output_dir={tmp_path / 'out'}",
                 "max_steps=1", "batch_size=2", "report_to=none", "max_length=64", "max_prompt_length=32", *overrides])  # fmt: skip
    return code, capsys.readouterr().err


def weights_file(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


@pytest.mark.parametrize("damage", ["truncated", "lfs_pointer", "header"])
def test_a_damaged_weights_file_is_named_with_the_fix(lm, chat_rows, tmp_path, capsys, no_weights, damage):
    model = tmp_path / "lm"
    shutil.copytree(lm, model)
    weights = weights_file(model)
    data = weights.read_bytes()
    if damage == "truncated":  # an interrupted download
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "lfs_pointer":  # a clone without git-lfs
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    else:
        weights.write_bytes(data[:8] + b"{not json" + data[17:])
    code, err = train(tmp_path, capsys, model, chat_rows)
    assert code == 2 and f"model: {weights}" in err and "replace it with a complete copy" in err, err
    assert "Traceback" not in err
    assert weights_problem(weights_file(lm)) is None  # the intact file passes the same check


def test_a_damaged_hub_snapshot_names_the_download_command(lm, tmp_path, monkeypatch):
    from hub_cache import use_hub_cache, write_hub_repo  # the cache layout huggingface_hub writes

    cache = use_hub_cache(monkeypatch, tmp_path / "hf")
    write_hub_repo(cache, "acme/tiny-lm", lm)
    snapshot = next(cache.glob("models--acme--tiny-lm/snapshots/*"))
    blob = weights_file(snapshot).resolve()
    blob.write_bytes(blob.read_bytes()[:100])
    from mmpref.errors import ModelFileError

    with pytest.raises(ModelFileError, match="huggingface-cli download acme/tiny-lm --force-download"):
        resolve_model("model", "acme/tiny-lm")


def test_conversations_without_a_chat_template_are_refused_before_weights_load(lm, chat_rows, tmp_path, capsys,
                                                                               no_weights):  # fmt: skip
    base = tmp_path / "base"  # a base model: its tokenizer has no chat template
    shutil.copytree(lm, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    code, err = train(tmp_path, capsys, base, chat_rows)
    assert code == 2 and "chat_template:" in err and "holds conversations" in err and str(base) in err, err


def test_the_chat_template_key_renders_conversations(lm, chat_rows, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(lm, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    code, err = train(tmp_path, capsys, base, chat_rows, f"chat_template={template}")
    assert code == 0, err
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "final")
    assert saved.chat_template == TEMPLATE  # the tokenizer saved with the model renders as it was trained
    code, err = train(tmp_path, capsys, base, chat_rows, f"chat_template={tmp_path / 'missing.jinja'}")
    assert code == 2 and "chat_template: no such template file" in err, err


def test_image_paths_that_are_not_files_are_named_as_what_they_are(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "a_folder.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    def problems(jpg_1: str) -> list[str]:
        return image_row_problems("a red square", "ok.png", jpg_1, 1, tmp_path)[0]

    assert problems("a_folder.png") == [f"'jpg_1' {tmp_path / 'a_folder.png'} is a folder, not a file"]
    assert problems("pipe.png") == [f"'jpg_1' {tmp_path / 'pipe.png'} is a named pipe (FIFO), not a file"]
    assert problems("gone.png") == [f"'jpg_1' no such file {tmp_path / 'gone.png'}"]
