"""What the launcher decides: precision from `accelerate launch` / its config unless the run config sets it,
and the schedule length from epochs."""

import json
import os
import subprocess
import sys

import pytest

from mmpref.testing import make_tiny_lm
from mmpref.training import load_config, train
from mmpref.training.config import ConfigError

ROWS = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(10)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return make_tiny_lm(root / "lm"), data


def run_as_launched(tiny, out, env_precision: str, *overrides: str) -> dict:
    """``mmpref train`` in a fresh process with the environment `accelerate launch --mixed_precision X` sets."""
    model, data = tiny
    config = out.parent / f"{out.name}.yaml"
    config.write_text(f"model: {model}\ndataset: {data}\noutput_dir: {out}\nmax_steps: 1\nbatch_size: 2\n"
                      "report_to: none\nmax_length: 32\nmax_prompt_length: 16\n")  # fmt: skip
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": env_precision, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mmpref.cli", "train", str(config), *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_precision_comes_from_the_launcher_unless_the_config_sets_it(tiny, tmp_path):
    assert run_as_launched(tiny, tmp_path / "launcher", "bf16")["mixed_precision"] == "bf16"
    assert run_as_launched(tiny, tmp_path / "config", "bf16", "mixed_precision=no")["mixed_precision"] == "no"


def test_num_epochs_sets_the_schedule_from_the_data(tiny, tmp_path):
    model, data = tiny
    common = [f"model={model}", f"dataset={data}", "batch_size=2", "report_to=none", "max_length=32",
              "max_prompt_length=16", "log_every=1"]  # fmt: skip
    # 10 rows, batches of 2: 5 steps an epoch; 2 batches accumulated per step: 2 steps an epoch
    summary = tmp_path / "e" / "summary.json"
    train(load_config(None, [*common, f"output_dir={tmp_path / 'e'}", "num_epochs=2"]))
    assert json.loads(summary.read_text())["steps"] == 10
    train(load_config(None, [*common, f"output_dir={tmp_path / 'e'}", "num_epochs=1.5",
                             "gradient_accumulation_steps=2"]))  # fmt: skip
    assert json.loads(summary.read_text())["steps"] == 3
    with pytest.raises(ConfigError, match="num_epochs: set max_steps or num_epochs, not both"):
        load_config(None, [*common, "num_epochs=1", "max_steps=3"])
