"""One run per output_dir, and --resume checks what it resumes.

The lock: a second run into a folder whose lock a live process holds stops (exit 2) naming the holder and
writes nothing; a lock file left by a process killed with SIGKILL is taken over with a warning; the lock is
held through the run and released however it ends. The identity: a checkpoint records the model, the data and
the config keys of the objective and the data order; --resume onto other data or another loss.beta is refused
before any weights load, unless --allow-changes (then other data starts from its first row).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpref.cli import main
from mmpref.data.splits import epoch_order
from mmpref.tiny_models import make_tiny_lm
from mmpref.training import Callback, load_config, run_lock, train
from mmpref.training import loop as loop_module
from mmpref.training.checkpoint import STATE_FILE, write_manifest
from mmpref.training.run_lock import LOCK_FILE, OutputDirInUse, RunLock
from mmpref.training.text_task import TextTask

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
# A process that takes a folder's lock and keeps it until killed (run_lock.py alone: no torch to import).
HOLDER = """import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.RunLock(sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def write_rows(path: Path, n: int, word: str) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": f"Say {word} number {i}.", "chosen": f"{word} {i}.", "rejected": f"Not a {word}, {i}?"}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_lock")
    return make_tiny_lm(root / "lm", seed=0), write_rows(root / "a.jsonl", 36, "cat"), write_rows(root / "b.jsonl", 32, "owl")


def overrides(tiny, out: Path, data: Path | None = None, *extra: str) -> list[str]:
    model, first, _ = tiny
    return [f"model={model}", f"dataset={data or first}", f"output_dir={out}", "batch_size=4", "learning_rate=1e-3",
            "report_to=none", "max_length=64", "max_prompt_length=32", "log_every=1", "max_steps=4", "save_every=2",
            *extra]  # fmt: skip


def cli(tmp_path: Path, args: list[str], *flags: str) -> list[str]:
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    return ["train", str(empty), *args, *flags]


def hold_lock(folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, run_lock.__file__, str(folder)], env=ENV,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the lock -------------------------------------------------------------------------------------------------


def test_a_live_holder_stops_the_second_run_naming_it_and_nothing_is_written(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        before = snapshot(out)
        assert main(cli(tmp_path, overrides(tiny, out))) == 2
        err = capsys.readouterr().err
        assert (f"mmpref train: error: output_dir: {out} is in use by another mmpref train (pid {holder.pid} on host "
                f"{socket.gethostname()}, started ") in err  # fmt: skip
        assert "); wait for it, or choose another output_dir" in err and "Traceback" not in err
        assert snapshot(out) == before  # the holder's lock file only, untouched
        with pytest.raises(OutputDirInUse, match=f"pid {holder.pid} "):  # the Python API alike
            train(load_config(None, overrides(tiny, out)))
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold_lock(out)
    holder.kill()  # SIGKILL: the lock dies with the process, its file stays
    holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    assert main(cli(tmp_path, overrides(tiny, out))) == 0
    err = capsys.readouterr().err
    assert f"output_dir: {out} was locked by pid {holder.pid} on host {socket.gethostname()}" in err
    assert "which is gone (killed?); taking it over" in err
    assert (out / "final" / "model.safetensors").is_file() and not (out / LOCK_FILE).exists()


class Crash(Exception):
    pass


class LockProbe(Callback):
    """Tries to take the run's lock at each step (it must fail, naming this process); crashes at ``crash_at``."""

    def __init__(self, out: Path, crash_at: int | None = None):
        self.out, self.crash_at, self.refusals = out, crash_at, []

    def on_step_end(self, step, model):
        with pytest.raises(OutputDirInUse) as refused:
            RunLock(self.out).acquire()
        self.refusals.append(str(refused.value))
        if step == self.crash_at:
            raise Crash


def test_the_lock_is_held_through_the_run_and_released_however_it_ends(tiny, tmp_path):
    out = tmp_path / "run"
    probe = LockProbe(out, crash_at=2)
    with pytest.raises(Crash):
        train(load_config(None, overrides(tiny, out)), callbacks=[probe])
    assert len(probe.refusals) == 2 and all(f"(pid {os.getpid()} on host" in r for r in probe.refusals)
    assert not (out / LOCK_FILE).exists()  # released on the exception
    probe = LockProbe(out)
    train(load_config(None, overrides(tiny, out)), callbacks=[probe])  # a run after the first ended
    assert len(probe.refusals) == 4 and not (out / LOCK_FILE).exists()
    RunLock(out).acquire().release()  # free


def test_two_launched_processes_both_stop_when_the_folder_is_in_use(tiny, tmp_path):
    """Under `accelerate launch` the main process alone takes the lock and tells the other it did not."""
    out = tmp_path / "run"
    holder = hold_lock(out)
    configs = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(configs / "cpu_gloo_2proc.yaml"),
              "-m", "mmpref.cli", *cli(tmp_path, overrides(tiny, out))]  # fmt: skip
    try:
        done = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0
    assert done.stderr.count(f"is in use by another mmpref train (pid {holder.pid} ") >= 2, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


# --- the identity check on --resume ----------------------------------------------------------------------------


def training_rows(monkeypatch) -> list[list[int]]:
    """The dataset rows of each training forward from now on."""
    original, seen = TextTask.rows, []

    def rows(self, model, batch):
        if torch.is_grad_enabled():
            seen.append(batch["row_index"].tolist())
        return original(self, model, batch)

    monkeypatch.setattr(TextTask, "rows", rows)
    return seen


def no_weights(monkeypatch) -> None:
    def build(*args, **kwargs):
        raise AssertionError("the run went on to load weights")

    monkeypatch.setattr(loop_module, "build", build)


def state(out: Path, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step-{step:08d}" / STATE_FILE).read_text())


def test_resume_onto_other_data_is_refused_unless_changes_are_allowed(tiny, tmp_path, capsys, monkeypatch):
    _, first, other = tiny
    out = tmp_path / "run"
    train(load_config(None, overrides(tiny, out)))
    recorded = state(out, 4)["run_identity"]
    assert recorded["dataset"]["name"] == str(first) and recorded["config"]["loss"]["beta"] == 0.1
    config_before = (out / "config.json").read_text()
    with monkeypatch.context() as m:
        no_weights(m)
        assert main(cli(tmp_path, overrides(tiny, out, other, "max_steps=6"), "--resume")) == 2
    err = capsys.readouterr().err
    assert f"mmpref train: error: --resume: the checkpoint was written for dataset {first} (files:" in err
    assert f"this run reads {other} (files:" in err and "Pass --allow-changes" in err
    assert (out / "config.json").read_text() == config_before  # nothing written

    seen = training_rows(monkeypatch)
    assert main(cli(tmp_path, overrides(tiny, out, other, "max_steps=6"), "--resume", "--allow-changes")) == 0
    err = capsys.readouterr().err
    assert "--resume with --allow-changes: the checkpoint was written for dataset" in err
    assert "the data restarts from its first row (epoch 0, batch 0); the step count and the LR schedule continue" in err
    assert seen[0] == epoch_order(32, 0, 0)[:4]  # the new data's first batch
    after = state(out, 6)
    assert (after["step"], after["epoch"], after["batch_in_epoch"]) == (6, 0, 2)  # steps continue, data anew
    assert after["run_identity"]["dataset"]["name"] == str(other)
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_resume_with_another_beta_is_refused_and_allowed_keeps_the_data_position(tiny, tmp_path, capsys,
                                                                                  monkeypatch):  # fmt: skip
    out = tmp_path / "run"
    train(load_config(None, overrides(tiny, out)))
    with monkeypatch.context() as m:
        no_weights(m)
        assert main(cli(tmp_path, overrides(tiny, out, None, "max_steps=6", "loss.beta=0.2"), "--resume")) == 2
    err = capsys.readouterr().err
    assert "error: --resume: loss.beta 0.1 → 0.2. Pass --allow-changes" in err and "written for dataset" not in err

    seen = training_rows(monkeypatch)
    resumed = overrides(tiny, out, None, "max_steps=6", "loss.beta=0.2")
    train(load_config(None, resumed), resume="latest", allow_changes=True)
    assert seen[0] == epoch_order(36, 0, 0)[16:20]  # the fifth batch: the data order did not change
    after = state(out, 6)
    assert (after["epoch"], after["batch_in_epoch"]) == (0, 6)
    assert after["run_identity"]["config"]["loss"]["beta"] == 0.2


def test_an_unchanged_resume_passes_and_an_old_checkpoint_resumes_with_a_warning(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    train(load_config(None, overrides(tiny, out)))
    assert main(cli(tmp_path, overrides(tiny, out, None, "max_steps=6"), "--resume")) == 0
    assert "records no run identity" not in capsys.readouterr().err
    checkpoint = out / "checkpoints" / "step-00000006"  # as written before identities were recorded
    trainer_state = json.loads((checkpoint / STATE_FILE).read_text())
    del trainer_state["run_identity"]
    (checkpoint / STATE_FILE).write_text(json.dumps(trainer_state))
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint)
    assert main(cli(tmp_path, overrides(tiny, out, None, "max_steps=8", "loss.beta=0.2"), "--resume")) == 0
    assert f"--resume: {checkpoint} records no run identity" in capsys.readouterr().err


def test_allow_changes_needs_resume(tiny, tmp_path, capsys):
    assert main(cli(tmp_path, overrides(tiny, tmp_path / "run"), "--allow-changes")) == 2
    assert "--allow-changes: only with --resume" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
