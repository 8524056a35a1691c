"""What the launcher decides: precision from `accelerate launch` / its config unless the run config sets it,
and the schedule length from epochs."""

import json
import os
import subprocess
import sys

import pytest

from mmpref.tiny_models import make_tiny_lm
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


def test_bf16_autocast_reference_gives_log2_at_step_0(tiny, tmp_path):
    """The precomputed reference runs under the policy's autocast: ℓ = 0 exactly before training."""
    model, data = tiny
    out = tmp_path / "bf16"
    config = tmp_path / "bf16.yaml"
    config.write_text(f"model: {model}\ndataset: {data}\noutput_dir: {out}\nmax_steps: 1\nbatch_size: 2\n"
                      "eval_split: 0.4\neval_batch_size: 2\nmixed_precision: bf16\nreport_to: none\nlog_every: 1\n"
                      "max_length: 32\nmax_prompt_length: 16\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "mmpref.cli", "train", str(config)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    first, step1 = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[:2])
    assert first["step"] == 0 and first["eval/rewards/margins"] == 0.0
    assert first["eval/loss"] == pytest.approx(0.6931471805599453, abs=1e-7)  # log 2, in float32
    # the first training step's forward (under autocast, before any update) sees ℓ = 0 too
    assert step1["step"] == 1 and step1["rewards/chosen"] == 0.0 and step1["rewards/rejected"] == 0.0
    names = [p.name for p in (out / "cache").iterdir()]
    assert all("-bf16" in n for n in names), names
