"""Image data at scale: rows read where they are, images checked when first read, caches filled as
training reads them (exact across kills and resumes), cache keys that follow edits without rereading data."""

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmpref import hub
from mmpref.cli import main
from mmpref.data.image_task import make_image_style_task
from mmpref.data.images import prepare_image_dataset
from mmpref.data.splits import epoch_order
from mmpref.tiny_models import make_tiny_sd15
from mmpref.training.checkpoint import find_checkpoint, verify_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_data")
    train_file, _ = make_image_style_task(root / "task", n_train=8, n_eval=4, seed=1)
    return {"sd15": make_tiny_sd15(root / "sd15", seed=0), "task": train_file.parent}


def data_copy(tiny, where: Path) -> Path:
    """A copy of the task's data: a cache folder of its own (caches live beside the data)."""
    shutil.copytree(tiny["task"], where, ignore=shutil.ignore_patterns(".mmpref_cache"))
    return where / "train.jsonl"


def args(tiny, data: Path, out: Path, *extra: str) -> list[str]:
    empty = out.parent / "empty.yaml"
    empty.write_text("{}\n")
    return [str(empty), f"model={tiny['sd15']}", f"dataset={data}", f"output_dir={out}", "report_to=none",
            "diffusion.resolution=64", "loss.beta=5000", "batch_size=2", "eval_batch_size=4", "max_steps=8",
            "save_every=2", "log_every=1", "learning_rate=1e-4", "lr_scheduler=constant", "max_length=64",
            "max_prompt_length=32", "diffusion.random_flip=true", "diffusion.prompt_dropout=0.5", *extra]  # fmt: skip


def row_drawn_in_batch(batch: int) -> int:
    """The source row the first training epoch draws first in its batch ``batch`` (8 rows, batches of 2, seed 0)."""
    return epoch_order(8, 0, 0)[2 * batch]


def break_image(data: Path, row: int) -> tuple[Path, bytes]:
    record = json.loads(data.read_text().splitlines()[row])
    path = data.parent / record["jpg_0"]
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 3])  # a truncated download
    return path, good


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "unet" / "diffusion_pytorch_model.safetensors"), load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> Path:
    """An uninterrupted run with every image intact, lazy cache, in a process of its own."""
    root = tmp_path_factory.mktemp("straight")
    data = data_copy(tiny, root / "data")
    subprocess.run([sys.executable, "-m", "mmpref.cli", "train", *args(tiny, data, root / "run")], env=ENV,
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    return root / "run"


def test_a_bad_image_found_mid_run_stops_naming_its_row_and_resume_after_the_fix_is_exact(tiny, straight, tmp_path,
                                                                                         capsys):  # fmt: skip
    data = data_copy(tiny, tmp_path / "data")
    row = row_drawn_in_batch(3)  # step 4's, read during step 3 (the loader reads a batch ahead): after step 2's checkpoint
    path, good = break_image(data, row)
    assert main(["train", *args(tiny, data, tmp_path / "run")]) == 2  # the cheap checks passed: found when read
    err = capsys.readouterr().err
    assert f"row {row} (0-based): 'jpg_0' does not decode" in err and "Traceback" not in err
    checkpoint = find_checkpoint(tmp_path / "run", "latest")
    assert checkpoint.name == "step-00000002" and verify_checkpoint(checkpoint) == []  # intact
    path.write_bytes(good)  # fixed
    assert main(["train", *args(tiny, data, tmp_path / "run"), "--resume"]) == 0
    same_weights(straight / "final", tmp_path / "run" / "final")


def test_skip_replaces_a_bad_pair_and_counts_it(tiny, tmp_path):
    data = data_copy(tiny, tmp_path / "data")
    row = row_drawn_in_batch(1)
    break_image(data, row)
    assert main(["train", *args(tiny, data, tmp_path / "run", "on_bad_rows=skip", "max_steps=6")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data/bad_rows_skipped"] == 1
    (found,) = [json.loads(line) for line in (tmp_path / "run" / "bad_rows.jsonl").read_text().splitlines()]
    assert found["row"] == row and "'jpg_0' does not decode" in found["reason"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-2]["data/bad_rows_skipped"] == 1  # in the training logs too


def last_logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=-1)


@pytest.mark.slow
def test_lazy_cache_killed_at_random_moments_resumes_bit_identically(tiny, straight, tmp_path):
    data = data_copy(tiny, tmp_path / "data")
    out = tmp_path / "run"
    rng = random.Random(7)
    command = [sys.executable, "-m", "mmpref.cli", "train", *args(tiny, data, out)]
    for kill in range(2):
        proc = subprocess.Popen(command + (["--resume"] if kill else []), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        at = rng.randint(2, 5) + 2 * kill
        while last_logged_step(out) < at and proc.poll() is None:
            pass
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(command + ["--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    same_weights(straight / "final", out / "final")
    assert not list((data.parent / ".mmpref_cache").rglob(".tmp*"))  # nothing half-written is left to trust


def test_opening_holds_an_index_not_the_images(tmp_path):
    blobs = []
    for k in range(16):
        buf = io.BytesIO()
        Image.effect_noise((64, 64), 40 + k).convert("RGB").save(buf, format="PNG")
        blobs.append(buf.getvalue())
    n = 600
    datasets.Dataset.from_dict({"caption": [f"picture {i}" for i in range(n)],
                                "jpg_0": [blobs[i % 16] for i in range(n)],
                                "jpg_1": [blobs[(i + 1) % 16] for i in range(n)],
                                "label_0": [float(i % 2) for i in range(n)]}).to_parquet(tmp_path / "d.parquet")  # fmt: skip
    image_bytes = sum(len(blobs[i % 16]) + len(blobs[(i + 1) % 16]) for i in range(n))
    tracemalloc.start()
    rows = prepare_image_dataset(tmp_path / "d.parquet")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(rows) == n and rows.rows.nbytes == 8 * n  # 8 bytes a pair
    assert peak < image_bytes / 5, (peak, image_bytes)  # no pass holds the images
    pair = rows.load(4)  # read on demand, ordered by label_0 (0: jpg_1 preferred)
    assert pair.row == 4 and pair.caption == "picture 4"
    assert pair.chosen.tobytes() == Image.open(io.BytesIO(blobs[5])).convert("RGB").tobytes()


def test_cache_keys_follow_edits_without_rereading_unchanged_files(tmp_path, monkeypatch):
    blobs = []
    for color in ("red", "blue", "green"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    path = tmp_path / "d.parquet"

    def write(second):
        datasets.Dataset.from_dict({"caption": ["a", "b"], "jpg_0": [blobs[0], blobs[0]], "jpg_1": [blobs[1], second],
                                    "label_0": [1.0, 0.0]}).to_parquet(path)  # fmt: skip

    write(blobs[1])
    first = prepare_image_dataset(path).identity
    monkeypatch.setattr(hub, "open", lambda *a, **k: pytest.fail("an unchanged file was read again"), raising=False)
    assert prepare_image_dataset(path).identity == first  # remembered by size and times
    monkeypatch.undo()
    write(blobs[2])  # one image edited
    assert prepare_image_dataset(path).identity != first


# ------------------------------------------------------------------------------------------ streaming


def test_a_streamed_hub_dataset_trains_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """``streaming: true`` reads the hub snapshot (offline) as an IterableDataset; a run stopped at step 3 and
    resumed replays the stream to its position and ends where the uninterrupted run ends."""
    from mmpref.training import load_config, train
    from tests.hub_cache import use_hub_cache, write_hub_repo

    repo = data_copy(tiny, tmp_path / "repo").parent  # the rows and their images, as a hub dataset repo holds them
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: train.jsonl\n---\n")  # fmt: skip
    write_hub_repo(use_hub_cache(monkeypatch, tmp_path / "hf"), "org/pairs", repo, repo_type="dataset")

    def overrides(out: Path, steps: int) -> list[str]:
        return [o for o in args(tiny, Path("unused"), out)[1:] if not o.startswith(("dataset=", "max_steps="))] + [
            "dataset=org/pairs", "streaming=true", "diffusion.cache_latents=off", "shuffle_buffer=4",
            f"max_steps={steps}", "save_every=3"]  # fmt: skip

    straight = train(load_config(None, overrides(tmp_path / "straight", 6)))  # 4 batches an epoch: two epochs
    train(load_config(None, overrides(tmp_path / "partial", 3)))  # stops at step 3, its checkpoint saved
    resumed = train(load_config(None, overrides(tmp_path / "partial", 6)), resume="latest")
    same_weights(straight, resumed)


@pytest.mark.parametrize("extra, key", [
    (("diffusion.cache_latents=lazy",), "diffusion.cache_latents"),
    (("diffusion.cache_latents=off", "max_steps=null"), "max_steps"),
    (("diffusion.cache_latents=off", "eval_split=0.2"), "eval_split"),
])  # fmt: skip
def test_streaming_refuses_what_a_stream_cannot_do_before_anything_loads(tiny, tmp_path, capsys, monkeypatch, extra, key):
    import diffusers

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    data = data_copy(tiny, tmp_path / "data")
    assert main(["train", *args(tiny, data, tmp_path / "run", "streaming=true", *extra)]) == 2
    err = capsys.readouterr().err
    assert f"error: {key}:" in err and "stream" in err


def test_streaming_text_refuses_a_precomputed_reference(tmp_path, capsys):
    from mmpref.tiny_models import make_tiny_lm

    lm = make_tiny_lm(tmp_path / "lm", seed=0)
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    empty = tmp_path / "e.yaml"
    empty.write_text("{}\n")
    assert main(["train", str(empty), f"model={lm}", f"dataset={data}", "streaming=true", "max_steps=2",
                 f"output_dir={tmp_path / 'o'}", "report_to=none"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "error: precompute_ref: the reference log-probs of a streamed dataset" in err and "precompute_ref: false" in err


def test_validate_data_lists_every_bad_row_and_cache_encodes_ahead_resumably(tiny, tmp_path, capsys, monkeypatch):
    data = data_copy(tiny, tmp_path / "data")
    break_image(data, 2)
    break_image(data, 6)
    assert main(["validate-data", *args(tiny, data, tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "row 2: 'jpg_0' does not decode" in out and "row 6: 'jpg_0' does not decode" in out
    assert "2 bad rows" in out
    assert main(["cache", *args(tiny, data, tmp_path / "run", "on_bad_rows=skip")]) == 0
    (folder,) = (data.parent / ".mmpref_cache").glob("latents-*")
    stored = [r for c in folder.glob("chunk-*") for r in load_file(c)["row"].tolist()]
    assert sorted(stored) == [0, 1, 3, 4, 5, 7]  # every good row, once
    from diffusers import AutoencoderKL

    monkeypatch.setattr(AutoencoderKL, "encode", lambda *a, **k: pytest.fail("encoded again"))
    assert main(["cache", *args(tiny, data, tmp_path / "run", "on_bad_rows=skip")]) == 0  # all there: skipped


def test_arrows_quick_checks_accept_exactly_what_the_row_by_row_checks_accept():
    from mmpref.data.images import _cheap_checks, _row_problems

    captions = ["ok", " ", "\u200b", "\u00a0", "a\u200bb", "🙂", "\u180e x", "", None, "\t\n", "\x1c", "e\u0301"]
    rows = [{"caption": c, "jpg_0": b"x", "jpg_1": None if k == 3 else b"y", "label_0": label, "score_0": s0,
             "score_1": 1.0}
            for k, c in enumerate(captions) for label in (1.0, 0.0, 0.5, 2.0, None) for s0 in (0.0, 2.0, float("nan"))]  # fmt: skip
    usable, bad, ties = _cheap_checks(datasets.Dataset.from_list(rows), True, True)
    by_row = [_row_problems(r, [r["jpg_0"] is not None, r["jpg_1"] is not None], True, True) for r in rows]
    assert [b.row for b in bad] == [i for i, p in enumerate(by_row) if p]
    assert usable.tolist() == [i for i, p in enumerate(by_row) if not p and rows[i]["label_0"] != 0.5]
    assert ties == sum(1 for i, p in enumerate(by_row) if not p and rows[i]["label_0"] == 0.5)
