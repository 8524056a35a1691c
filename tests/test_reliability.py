"""Crash safety and numerical guards.

Real ``mmpref train`` processes are killed with SIGKILL at seeded-random moments and resumed, or
stopped with SIGTERM; the resumed run must end bit-identical to an uninterrupted one (final weights
and every logged metric). Corrupt and half-written checkpoints are skipped on resume. NaN losses and
gradients are injected into the tiny LM's rows to check stop / skip / max_skipped_steps.
"""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from mmpref.cli import EXIT_INTERRUPTED, EXIT_NONFINITE, main
from mmpref.losses import Objective
from mmpref.tiny_models import make_tiny_lm
from mmpref.training import ConfigError, NonFiniteLossError, TrainingInterrupted, load_config, train
from mmpref.training import loop as loop_module
from mmpref.training.checkpoint import CheckpointError, check_weights_only, find_checkpoint, verify_checkpoint
from mmpref.training.text_task import TextTask

# Steps cross epoch boundaries (27 train rows → 6 batches of 4), checkpoints fall inside log windows
# (log_every 2, save_every 3) and an eval runs every 8 steps: all of it must survive a kill.
KILL_RUN = ["max_steps=30", "save_every=3", "log_every=2", "eval_every=8", "eval_split=0.25", "keep_checkpoints=2",
            "warmup_steps=3", "lr_scheduler=linear"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
VOLATILE = ("second", "time", "memory")  # metric names that may measure the machine, not the model


def write_rows(path: Path, n: int = 36) -> Path:
    animals = ["cat", "dog", "owl", "fox", "eel", "yak"]
    with open(path, "w") as f:
        for i in range(n):
            a, b = animals[i % 6], animals[(i * 5 + 1) % 6]
            row = {"prompt": f"Which animal is number {i}, the {a} or the {b}?", "chosen": f"The {a}, {i}.",
                   "rejected": f"Maybe a {b} or so."}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return make_tiny_lm(root / "lm", seed=0), write_rows(root / "train.jsonl")


def base_overrides(tiny, out: Path) -> list[str]:
    model, data = tiny
    return [f"model={model}", f"dataset={data}", f"output_dir={out}", "batch_size=4", "learning_rate=1e-3",
            "report_to=none", "max_length=64", "max_prompt_length=32", "log_every=1"]  # fmt: skip


def config(tiny, out: Path, *overrides: str):
    return load_config(None, [*base_overrides(tiny, out), "max_steps=5", *overrides])


def metrics(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(w in k for w in VOLATILE)} for r in records]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# --- real processes: SIGKILL and SIGTERM --------------------------------------------------------------


def cli(tiny, out: Path, *extra: str) -> list[str]:
    empty = out.parent / "empty.yaml"
    empty.write_text("{}\n")
    return [
        sys.executable,
        "-m",
        "mmpref.cli",
        "train",
        str(empty),
        *base_overrides(tiny, out),
        *KILL_RUN,
        *extra,
    ]


def last_logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=-1)


def run_and_signal(args: list[str], out: Path, at_step: int, sig: int, delay: float) -> tuple[int, str, str]:
    """Start ``mmpref train``; once it has logged ``at_step``, wait ``delay`` seconds and send ``sig``."""
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while last_logged_step(out) < at_step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory) -> Path:
    """The uninterrupted run, in a process of its own like the interrupted ones."""
    out = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(cli(tiny, out), env=ENV, check=True, capture_output=True, timeout=300)
    return out


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tiny, straight, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(1234)
    done, kills = 3, []  # a checkpoint exists from step 3 on
    for _ in range(3):
        at_step = min(rng.randint(done + 2, done + 8), 26)
        resume = ["--resume"] if kills else []
        rc, stdout, stderr = run_and_signal(cli(tiny, out, *resume), out, at_step, signal.SIGKILL,
                                            delay=rng.uniform(0, 0.05))  # fmt: skip
        assert rc == -signal.SIGKILL, stderr[-2000:]
        done = last_logged_step(out)
        tmp_left = sorted(p.name for p in (out / "checkpoints").glob(".tmp-*"))
        resumed_at = [line for line in stdout.splitlines() if line.startswith("resumed from")]
        kills.append((done, tmp_left, resumed_at))
    finish = subprocess.run(
        [*cli(tiny, out), "--resume"], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert finish.returncode == 0, finish.stderr[-2000:]
    final_resume = [line for line in finish.stdout.splitlines() if line.startswith("resumed from")]
    print("kills (last logged step, leftover .tmp folders, resume line):", kills, "then", final_resume)
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert_same_weights(straight / "final", out / "final")
    # every step logged once, with the same values: no duplicates, no gaps, no partial windows
    assert metrics(out) == metrics(straight)


def test_sigterm_saves_a_checkpoint_exits_75_and_resumes_exactly(tiny, straight, tmp_path):
    out = tmp_path / "run"
    rc, _, stderr = run_and_signal(cli(tiny, out), out, at_step=7, sig=signal.SIGTERM, delay=0.01)
    assert rc == EXIT_INTERRUPTED, stderr[-2000:]
    assert "SIGTERM received: stopped after step" in stderr and "continue with --resume" in stderr
    step = int(stderr.split("stopped after step ")[1].split(",")[0])
    assert 7 <= step < 30
    checkpoint = out / "checkpoints" / f"step-{step:08d}"
    assert verify_checkpoint(checkpoint) == []
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == step
    assert not (out / "final").exists()
    finish = subprocess.run(
        [*cli(tiny, out), "--resume"], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert f"at step {step}" in finish.stdout
    assert_same_weights(straight / "final", out / "final")
    assert metrics(out) == metrics(straight)


# --- in-process: SIGINT, corrupt checkpoints, pickles -------------------------------------------------


def on_training_call(monkeypatch, calls: dict[int, callable]) -> list[list[int]]:
    """Run ``calls[k](rows)`` (it may change ``rows``) on the k-th training forward, counted from 1.

    Returns the dataset rows of each training forward so far."""
    original = TextTask.rows
    seen: list[list[int]] = []

    def rows(self, model, batch):
        out = original(self, model, batch)
        if torch.is_grad_enabled():  # training, not evaluation
            seen.append(batch["row_index"].tolist())
            if len(seen) in calls:
                calls[len(seen)](out)
        return out

    monkeypatch.setattr(TextTask, "rows", rows)
    return seen


def test_sigint_stops_at_the_step_boundary_and_resume_is_exact(tiny, tmp_path, monkeypatch):
    straight = train(config(tiny, tmp_path / "straight", "max_steps=6"))
    on_training_call(monkeypatch, {3: lambda rows: os.kill(os.getpid(), signal.SIGINT)})
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config(tiny, tmp_path / "run", "max_steps=6"))
    assert stopped.value.signal_name == "SIGINT" and stopped.value.step == 3
    assert stopped.value.checkpoint == tmp_path / "run" / "checkpoints" / "step-00000003"
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # put back as they were
    monkeypatch.undo()
    resumed = train(config(tiny, tmp_path / "run", "max_steps=6"), resume="latest")
    assert_same_weights(straight, resumed)
    assert metrics(tmp_path / "run") == metrics(tmp_path / "straight")


def test_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(tiny, tmp_path, caplog):
    out = tmp_path / "run"
    overrides = ("max_steps=6", "save_every=2", "keep_checkpoints=3")
    straight = load_file(train(config(tiny, out, *overrides)) / "model.safetensors")
    straight_metrics = metrics(out)
    newest = out / "checkpoints" / "step-00000006"
    optimizer_file = newest / "optimizer.bin"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:1000])  # a torn write
    leftover = out / "checkpoints" / ".tmp-step-00000008"  # a save that a kill interrupted
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    with pytest.raises(CheckpointError, match="optimizer.bin has 1000 bytes"):
        find_checkpoint(out, str(newest))  # named explicitly: refused, not replaced
    with caplog.at_level(logging.WARNING, logger="mmpref"):
        final = train(config(tiny, out, *overrides), resume="latest")
    assert f"skipping checkpoint {newest}: optimizer.bin has 1000 bytes" in caplog.text
    assert "removing" in caplog.text and not leftover.exists()
    resumed = load_file(final / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert metrics(out) == straight_metrics  # steps 5 and 6 logged again, once, with the same values
    assert verify_checkpoint(newest) == []  # rewritten by the resumed run
    # a flipped byte (same size) is caught by the sha256
    older = out / "checkpoints" / "step-00000004" / "model.safetensors"
    data = bytearray(older.read_bytes())
    data[-1] ^= 0xFF
    older.write_bytes(bytes(data))
    assert verify_checkpoint(older.parent) == ["model.safetensors differs from its sha256 in the manifest"]


class NotATensor:
    pass


def test_pickled_objects_beyond_tensors_are_refused(tmp_path):
    torch.save({"last_epoch": 3, "lr_lambdas": [None]}, tmp_path / "custom_checkpoint_0.pkl")
    check_weights_only(tmp_path)  # a scheduler state: plain containers, loads with weights_only=True
    torch.save({"last_epoch": 3, "payload": NotATensor()}, tmp_path / "custom_checkpoint_0.pkl")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        check_weights_only(tmp_path)


# --- numerical guards ----------------------------------------------------------------------------------


def nan_loss(rows):  # as a model overflowing on one row would give
    rows.logratios = rows.logratios * torch.tensor([[1.0, 1.0], [float("nan"), 1.0], [1.0, 1.0], [1.0, 1.0]])


def nan_grad(rows):
    rows.logratios.register_hook(lambda grad: grad * float("nan"))


def test_nonfinite_loss_stops_naming_step_and_rows(tiny, tmp_path, monkeypatch, capsys):
    seen = on_training_call(monkeypatch, {3: nan_loss})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    assert main(["train", str(cfg), *base_overrides(tiny, tmp_path / "run"), "max_steps=5"]) == EXIT_NONFINITE
    err = capsys.readouterr().err
    bad_row = seen[2][1]
    assert (
        f"step 3: non-finite log-probs of dataset rows [{bad_row}] in micro-batch 0; dataset rows {seen[2]}"
        in err
    )
    assert len(seen) == 3 and not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_nonfinite_gradient_stops_naming_step_and_rows(tiny, tmp_path, monkeypatch, max_grad_norm):
    seen = on_training_call(monkeypatch, {2: nan_grad})
    with pytest.raises(NonFiniteLossError, match=r"step 2: non-finite gradient \(norm nan\)") as error:
        train(config(tiny, tmp_path / "run", f"max_grad_norm={max_grad_norm}"))
    assert f"dataset rows {seen[1]}" in str(error.value)


def test_skip_mode_skips_the_step_and_reports_the_count(tiny, tmp_path, monkeypatch):
    on_training_call(monkeypatch, {2: nan_loss, 4: nan_grad})
    out = tmp_path / "run"
    final = train(config(tiny, out, "nonfinite=skip", "max_skipped_steps=2", "save_every=5"))
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 2
    logged = [m for m in metrics(out) if "lr" in m]
    assert [m["skipped_steps"] for m in logged] == [0, 1, 1, 2, 2]
    # a skipped step's losses stay out of the curves; its line carries only lr and the count
    assert [m["step"] for m in logged if "loss" in m] == [1, 3, 5]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in logged if "loss" in m)
    assert all(torch.isfinite(w).all() for w in load_file(final / "model.safetensors").values())
    # 5 steps, 2 skipped: AdamW and the schedule each stepped 3 times
    checkpoint = out / "checkpoints" / "step-00000005"
    optimizer_state = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    assert {int(s["step"]) for s in optimizer_state["state"].values()} == {3}
    assert torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)["last_epoch"] == 3


def test_nonfinite_keys_are_validated(tiny, tmp_path):
    with pytest.raises(ConfigError, match="nonfinite: must be one of stop, skip"):
        config(tiny, tmp_path, "nonfinite=ignore")
    with pytest.raises(ConfigError, match="max_skipped_steps: must be >= 0"):
        config(tiny, tmp_path, "max_skipped_steps=-1")
    with pytest.raises(ConfigError, match="log_every: must be > 0"):  # the loop divides by it
        config(tiny, tmp_path, "log_every=0")


def test_skip_mode_stops_past_max_skipped_steps(tiny, tmp_path, monkeypatch):
    on_training_call(monkeypatch, {2: nan_loss})
    original, calls = Objective.__call__, []

    def loss_goes_inf(self, rows):  # finite inputs, non-finite loss at step 4
        out = original(self, rows)
        calls.append(torch.is_grad_enabled())
        if calls.count(True) == 4:
            out.loss = out.loss * float("inf")
        return out

    monkeypatch.setattr(Objective, "__call__", loss_goes_inf)  # the run's objective, as the loop calls it
    with pytest.raises(NonFiniteLossError, match="step 4: .*2 steps skipped, more than max_skipped_steps=1"):
        train(config(tiny, tmp_path / "run", "nonfinite=skip", "max_skipped_steps=1"))


def test_gradscaler_overflow_is_not_a_nonfinite_error(tiny, tmp_path, monkeypatch):
    """fp16's GradScaler owns overflow: its skipped steps are counted apart and never stop the run.

    The CPU has no fp16 GradScaler in Accelerate, so a real one (scale 1) is attached to a CPU run
    and an inf gradient is injected at step 2: the scaler must skip that step, the guard must not.
    """

    class ScaledAccelerator(Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)

    monkeypatch.setattr(loop_module, "Accelerator", ScaledAccelerator)
    on_training_call(monkeypatch, {2: lambda rows: rows.logratios.register_hook(lambda g: g * float("inf"))})
    out = tmp_path / "run"
    train(config(tiny, out, "max_grad_norm=0", "save_every=4", "max_steps=4"))  # nonfinite: stop
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scaler_skipped_steps"] == 1 and summary["skipped_steps"] == 0
    state = torch.load(out / "checkpoints" / "step-00000004" / "custom_checkpoint_0.pkl", weights_only=True)
    assert state["last_epoch"] == 3  # the schedule waits on the skipped step, as with Accelerate's scheduler
