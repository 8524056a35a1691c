"""The disk: a run's checkpoints and final/ estimated before step 1 (a warning, or exit 2 with
fail_on_low_disk), and a full disk while writing a checkpoint, final/ or a cache as one message and exit 74.

The full disk is real where this process may mount a small tmpfs (root on Linux), and injected at the writers
(ENOSPC, safetensors' I/O error, torch's zip-writer error) everywhere.
"""

import errno
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpref.cli import EXIT_DISK_FULL, main
from mmpref.errors import DiskFullError
from mmpref.files import KeyedCache, is_disk_full
from mmpref.tiny_models import make_tiny_lm
from mmpref.training import disk, load_config, train
from mmpref.training import loop as loop_module
from mmpref.training.checkpoint import verify_checkpoint
from tests.test_reliability import assert_same_weights, base_overrides, metrics, write_rows

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ["max_steps=6", "save_every=2", "keep_checkpoints=1"]
ZIP_WRITER_ERROR = "[enforce fail at inline_container.cc:672] . unexpected pos 517568 vs 517460"
SAFETENSORS_ERROR = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk")
    return make_tiny_lm(root / "lm", seed=0), write_rows(root / "train.jsonl")


def run_cli(tiny, out: Path, *extra: str) -> int:
    empty = out.parent / "empty.yaml"
    empty.write_text("{}\n")
    return main(["train", str(empty), *base_overrides(tiny, out), *RUN, *extra])


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> Path:
    """The uninterrupted run every disk-full run is compared with after its resume."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run_cli(tiny, out) == 0
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def record_needs(monkeypatch) -> list:
    """The run's DiskNeeds, as the loop passes them to check_free_space."""
    seen = []
    original = loop_module.check_free_space

    def recording(cfg, needs, main_process=True):
        seen.append(needs)
        return original(cfg, needs, main_process)

    monkeypatch.setattr(loop_module, "check_free_space", recording)
    return seen


def assert_resumes_like_straight(tiny, out: Path, straight: Path) -> None:
    assert run_cli(tiny, out, "--resume") == 0
    assert_same_weights(straight / "final", out / "final")
    assert metrics(out) == metrics(straight)


def assert_disk_full_message(err: str, out: Path, step: int, safe_step: int) -> None:
    line = err[err.index("mmpref train: error: disk full") :].splitlines()[0]  # after a progress bar's \r
    ckpts = out / "checkpoints"
    assert f"while writing checkpoint {ckpts / f'step-{step:08d}'} (it needs about " in line, line
    assert "free there now)" in line, line
    assert f"the newest complete checkpoint is {ckpts / f'step-{safe_step:08d}'}" in line, line
    assert line.endswith("continue with --resume"), line
    assert "Traceback" not in err
    assert not list(ckpts.glob(".tmp-*")), "the half-written checkpoint stays"
    assert verify_checkpoint(ckpts / f"step-{safe_step:08d}") == []
    assert not (out / "final").exists()


# --- the estimate -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "lora", "rmsprop"])
def test_the_estimate_is_within_a_quarter_of_the_real_folders(tiny, tmp_path, monkeypatch, kind):
    extra = {"full": [], "lora": ["lora.r=8", "lora.merge=true"], "rmsprop": ["optimizer=rmsprop"]}[kind]
    needs = record_needs(monkeypatch)
    out = tmp_path / "run"
    final = train(load_config(None, [*base_overrides(tiny, out), "max_steps=2", "save_every=2", *extra]))
    (estimate,) = needs
    real_checkpoint = folder_bytes(out / "checkpoints" / "step-00000002")
    real_final = folder_bytes(final)
    print(f"{kind}: checkpoint {estimate.checkpoint} estimated, {real_checkpoint} real; "
          f"final {estimate.final} estimated, {real_final} real")  # fmt: skip
    assert abs(estimate.checkpoint - real_checkpoint) <= 0.25 * real_checkpoint
    assert abs(estimate.final - real_final) <= 0.25 * real_final
    assert (estimate.saving, estimate.at_end) == (1, 1)


def test_checkpoints_added_counts_the_fullest_moment():
    # keep 2, a save every 10 of 100 steps: 3 at once while saving (the new one before the oldest goes)
    assert disk.checkpoints_added(2, 10, 100) == (3, 2)
    assert disk.checkpoints_added(2, 10, 15) == (1, 1)  # one save only
    assert disk.checkpoints_added(2, 0, 100) == (0, 0)  # no checkpoints
    assert disk.checkpoints_added(2, 10, 100, start_step=50, existing=2) == (1, 0)  # resumed: two are there
    assert disk.checkpoints_added(1, 10, 100, start_step=90, existing=3) == (1, 0)  # more than kept already
    needs = disk.DiskNeeds(checkpoint=10, final=25, saving=3, at_end=2)
    assert needs.total == 45  # two checkpoints and final/ outweigh three checkpoints


def test_optimizer_state_by_optimizer():
    w = torch.zeros(1024, 512)
    adamw, rmsprop = disk.optimizer_state_bytes("adamw", [w]), disk.optimizer_state_bytes("rmsprop", [w])
    adafactor, bnb = disk.optimizer_state_bytes("adafactor", [w]), disk.optimizer_state_bytes("adamw8bit", [w])
    assert 2 * w.nbytes < adamw < 2 * w.nbytes + 4096
    assert w.nbytes < rmsprop < w.nbytes + 4096
    assert adafactor < 0.01 * w.nbytes  # a row and a column factor
    assert 2 * w.numel() < bnb < 0.6 * w.nbytes  # a byte each of two states, per value
    small = torch.zeros(32, 32)  # below bitsandbytes' 4096 values: 32-bit states
    assert disk.optimizer_state_bytes("adamw8bit", [small]) > 2 * small.nbytes


# --- the warning before step 1 -----------------------------------------------------------------------------


def little_free(monkeypatch, out: Path, free: int = 1_000_000) -> None:
    """shutil.disk_usage reports ``free`` bytes for ``out`` and the folders below it (others as they are)."""
    real = shutil.disk_usage

    def usage(path):
        if Path(path).absolute().is_relative_to(out.parent):
            return real(path)._replace(free=free)
        return real(path)

    monkeypatch.setattr(disk.shutil, "disk_usage", usage)


def test_low_disk_warns_before_step_1_and_trains(tiny, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    little_free(monkeypatch, out)
    with caplog.at_level(logging.WARNING, logger="mmpref"):
        assert run_cli(tiny, out) == 0
    (warning,) = [r.getMessage() for r in caplog.records if "the run needs up to" in r.getMessage()]
    assert re.match(rf"output_dir {re.escape(str(out))}: the run needs up to [\d.]+ MiB more at once, 976.6 KiB free "
                    r"there \(a checkpoint takes about [\d.]+ MiB and 2 are added at once while saving, with "
                    r"keep_checkpoints: 1 and save_every: 2; final/ takes about [\d.]+ KiB\); lower keep_checkpoints "
                    r"or raise save_every \(0: no checkpoints\), or choose an output_dir on a larger disk", warning)  # fmt: skip
    assert warning.endswith("training anyway (fail_on_low_disk: true would stop here)")
    assert (out / "final").is_dir()


def test_fail_on_low_disk_exits_2_before_step_1(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    little_free(monkeypatch, out)
    started = []
    monkeypatch.setattr(loop_module._Run, "start_steps", lambda self: started.append(1))
    assert run_cli(tiny, out, "fail_on_low_disk=true") == 2
    err = capsys.readouterr().err
    assert "mmpref train: error: output_dir " in err and "fail_on_low_disk: true stopped the run before step 1" in err
    assert "lower keep_checkpoints or raise save_every" in err
    assert not started and not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


# --- a full disk while writing ------------------------------------------------------------------------------


def fail_second(monkeypatch, target, attribute: str, error: Exception) -> None:
    """``target.attribute`` (a writer taking (obj, path)) writes a few bytes of the second checkpoint's file, then
    raises ``error``: the disk ran full in the middle of it."""
    original, calls = getattr(target, attribute), []

    def writer(obj, path, *args, **kwargs):
        calls.append(path)
        if "step-00000004" not in str(path):
            return original(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"\0" * 517460)
        raise error

    monkeypatch.setattr(target, attribute, writer)


@pytest.mark.parametrize("form", ["ENOSPC", "torch zip writer"])
def test_disk_full_in_a_checkpoint_exits_74_and_resumes(tiny, straight, tmp_path, monkeypatch, capsys, form):
    import accelerate.utils.other as accelerate_save

    if form == "ENOSPC":  # model.safetensors
        fail_second(monkeypatch, accelerate_save, "safe_save_file", OSError(errno.ENOSPC, "No space left on device"))
    else:  # optimizer.bin, through torch.save
        fail_second(monkeypatch, torch, "save", RuntimeError(ZIP_WRITER_ERROR))
    out = tmp_path / "run"
    assert run_cli(tiny, out) == EXIT_DISK_FULL
    assert_disk_full_message(capsys.readouterr().err, out, step=4, safe_step=2)
    assert max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()) == 4
    monkeypatch.undo()  # space freed
    assert_resumes_like_straight(tiny, out, straight)


def test_disk_full_in_final_names_it_and_leaves_no_staging(tiny, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    import mmpref.training.text_task as text_task

    def full(self, model, out_dir, state_dict=None):
        (Path(out_dir) / "model.safetensors").write_bytes(b"\0" * 1000)
        raise SafetensorError(SAFETENSORS_ERROR)

    monkeypatch.setattr(text_task.TextTask, "save", full)
    out = tmp_path / "run"
    assert run_cli(tiny, out) == EXIT_DISK_FULL
    err = capsys.readouterr().err
    assert f"disk full while writing final model {out / 'final'} (it needs about " in err
    assert f"the newest complete checkpoint is {out / 'checkpoints' / 'step-00000006'}" in err
    assert not (out / "final").exists() and not list(out.glob(".tmp-*"))


def test_disk_full_in_a_cache_entry_names_the_cache(tiny, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError(SAFETENSORS_ERROR)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    folder = tmp_path / "cache"
    with pytest.raises(DiskFullError) as error:
        KeyedCache(folder).get("k", lambda: {"x": torch.zeros(10)})
    assert str(error.value) == (f"disk full while writing cache entry {folder / 'k.safetensors'} (it needs about "
                                "40 B); free space and run it again")  # fmt: skip
    assert list(folder.iterdir()) == []  # no temporary file left
    # in a run, on rows cached nowhere yet (the tokenized rows' cache comes first): exit 74, before any checkpoint
    out = tmp_path / "run"
    assert run_cli((tiny[0], write_rows(tmp_path / "fresh.jsonl")), out) == EXIT_DISK_FULL
    err = capsys.readouterr().err
    assert "mmpref train: error: disk full while writing cache entry " in err
    assert "no checkpoint is complete yet: free space and start the run again" in err


def test_any_other_write_of_a_run_names_its_file(tmp_path):
    """What no writer converted (an appended metrics.jsonl line) becomes the run's DiskFullError in train()."""
    raw = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    error = disk.explain_disk_full(raw, tmp_path)
    assert str(error).startswith(f"disk full while writing output {tmp_path / 'metrics.jsonl'} (")
    assert str(error).endswith("free there now); no checkpoint is complete yet: free space and start the run again")


def test_disk_full_forms():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(RuntimeError(ZIP_WRITER_ERROR))
    assert is_disk_full(RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"))
    assert is_disk_full(Exception(SAFETENSORS_ERROR))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise ValueError("while cleaning up") from exc
    except ValueError as chained:
        assert is_disk_full(chained)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError("unexpected pos"))
    assert not is_disk_full(FloatingPointError("step 3: non-finite loss"))


def can_mount_tmpfs(where: Path) -> bool:
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return False
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                          capture_output=True).returncode == 0  # fmt: skip


def test_a_real_full_disk_exits_74_and_resumes_once_space_is_freed(tiny, straight, tmp_path, capsys, caplog):
    """A 4 MiB tmpfs: the step-2 checkpoint (about 2.4 MiB) fits, step 4's beside it does not."""
    mount = tmp_path / "small"
    if not can_mount_tmpfs(mount):
        pytest.skip("mounting a tmpfs needs root on Linux")
    try:
        out = mount / "run"
        with caplog.at_level(logging.WARNING, logger="mmpref"):
            assert run_cli(tiny, out) == EXIT_DISK_FULL
        assert any("the run needs up to" in r.getMessage() for r in caplog.records)  # warned before step 1
        assert_disk_full_message(capsys.readouterr().err, out, step=4, safe_step=2)
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        assert_resumes_like_straight(tiny, out, straight)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
