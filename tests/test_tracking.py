"""Trackers (tensorboard and wandb, offline), progress bars of the long phases, and the CLI's logging / --quiet."""

import json
import struct
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train_text import write_rows

from mmpref.cli import main
from mmpref.data.image_task import make_image_style_task
from mmpref.tiny_models import make_tiny_clip, make_tiny_lm, make_tiny_sd15
from mmpref.training import load_config, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    train_file, eval_file = make_image_style_task(root / "task", n_train=4, n_eval=2, seed=1, n_style_refs=2)
    return {
        "lm": make_tiny_lm(root / "lm", seed=0),
        "text": write_rows(root / "train.jsonl", n=16),
        "sd15": make_tiny_sd15(root / "sd15", seed=0),
        "clip": make_tiny_clip(root / "clip", seed=0),
        "train": train_file,
        "eval": eval_file,
    }


def text_args(tiny, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return [f"model={tiny['lm']}", f"dataset={data or tiny['text']}", f"output_dir={out}", "max_steps=2", "batch_size=4",
            "log_every=1", "max_length=64", "max_prompt_length=32", *extra]  # fmt: skip


def wandb_run(root: Path) -> Path:
    (run,) = root.glob("offline-run-*")
    return run


def wandb_history(run: Path) -> list[dict]:
    """The history rows of an offline run, read from its .wandb file (a LevelDB-style log of wandb's own
    protobuf records: 7-byte file header, 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run.glob("run-*.wandb")
    data, block, pos, pending, rows = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
    return rows


def tensorboard_events(out: Path) -> EventAccumulator:
    (events,) = (out / "mmpref").glob("events.out.tfevents.*")  # the run's own writer, not hparams'
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_text_run_logs_the_same_metrics_to_tensorboard_and_wandb(tiny, tmp_path, wandb_dir):
    out = tmp_path / "run"
    cfg = load_config(None, text_args(tiny, out, "report_to=tensorboard,wandb"))
    assert cfg.report_to == ["tensorboard", "wandb"]
    train(cfg)
    rows = [r for r in wandb_history(wandb_run(wandb_dir)) if "loss" in r]
    assert [r["_step"] for r in rows] == [1, 2]
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in jsonl if "loss" in r}
    for row in rows:
        for key in ("loss", "lr", "rewards/accuracies", "rewards/margins", "grad_norm"):
            assert row[key] == pytest.approx(logged[row["_step"]][key], rel=1e-6), key
    scalars = tensorboard_events(out)
    assert [e.step for e in scalars.Scalars("loss")] == [1, 2]
    assert scalars.Scalars("loss")[-1].value == pytest.approx(logged[2]["loss"], rel=1e-6)


def test_sample_grids_go_to_every_tracker_that_takes_images(tiny, tmp_path, wandb_dir, capsys):
    out = tmp_path / "run"
    cfg = load_config(None, [
        f"model={tiny['sd15']}", f"dataset={tiny['train']}", f"eval_dataset={tiny['eval']}", f"output_dir={out}",
        "report_to=tensorboard,wandb", "diffusion.resolution=64", "max_steps=2", "batch_size=2", "log_every=1",
        "samples.prompts=a red circle on a blue background", "samples.num_inference_steps=1",
        "loss.type=rpo", f"rpo.clip_model=local-dir:{tiny['clip']}",
    ])  # fmt: skip
    train(cfg)
    run = wandb_run(wandb_dir)
    images = sorted((run / "files" / "media" / "images").glob("samples_*.png"))
    assert len(images) == 2  # step 0 and the final evaluation
    logged = [r for r in wandb_history(run) if "samples/_type" in r]  # nested keys come back joined by /
    assert [r["_step"] for r in logged] == [0, 2]
    assert sorted(run / "files" / f for r in logged for f in r["samples/filenames"]) == images
    grids = tensorboard_events(out).Images("samples")
    assert [g.step for g in grids] == [0, 2] and grids[0].width > 64
    # the phases showed their bars (latents and CLIP embeddings are cached lazily, inside the steps)
    err = capsys.readouterr().err
    for desc in ("train:",):
        assert desc in err, desc


def test_unknown_tracker_is_a_config_error_naming_the_key(tiny, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("report_to: [tensorboard, nosuchtracker]\n")
    assert main(["train", str(tmp_path / "run.yaml"), *text_args(tiny, tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "report_to" in err and "'nosuchtracker'" in err and "wandb" in err
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_hides_info_lines_and_progress_bars(tiny, tmp_path, capsys, where):
    (tmp_path / "run.yaml").write_text("report_to: [none]\n")
    data = write_rows(tmp_path / "rows.jsonl", n=16)  # beside it, a prompt-embedding cache of its own
    args = [
        "train",
        str(tmp_path / "run.yaml"),
        *text_args(tiny, tmp_path / "loud", "loss.type=rpo", data=data),
    ]
    assert main(args) == 0
    loud = capsys.readouterr().err
    assert "INFO mmpref.training.text_task: reference log-probs of 16 train rows" in loud
    for bar in ("tokenize train: 100%", "reference train: 100%", "train: 100%", "Batches: 100%"):
        assert bar in loud, bar  # Batches: the sentence-transformers encoding of the RPO prompt embeddings

    args = ["train", str(tmp_path / "run.yaml"), *text_args(tiny, tmp_path / "quiet", "loss.type=rpo")]
    assert main(["--quiet", *args] if where == "before" else [*args, "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert "INFO" not in quiet.err and "%|" not in quiet.err and "it/s" not in quiet.err, quiet.err
    assert "final model:" in quiet.out
    assert (tmp_path / "quiet" / "final").is_dir()

    assert main(args) == 0  # quiet ended with its command: bars and info lines are back
    assert "train: 100%" in capsys.readouterr().err


def test_make_tiny_pretraining_shows_its_bars(tiny, tmp_path, capsys):
    assert main(["make-tiny", "sd15", str(tmp_path / "sd"), "--pretrain-on", str(tiny["train"]),
                 "--unet-steps", "2", "--vae-steps", "1"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "pretrain VAE: 100%" in err and "pretrain UNet: 100%" in err
    assert main(["--quiet", "make-tiny", "sd15", str(tmp_path / "sd2"), "--pretrain-on", str(tiny["train"]),
                 "--unet-steps", "2"]) == 0  # fmt: skip
    assert "pretrain UNet" not in capsys.readouterr().err
