"""The text training path end to end: CLI, config errors, reference handling, resume, DDP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpref.cli import main
from mmpref.data.tokenized import PackedRows
from mmpref.tiny_models import make_tiny_lm
from mmpref.training import load_config, train
from mmpref.training import reference as reference_module
from mmpref.training import text_task as text_task_module
from mmpref.training.build import build_task
from mmpref.training.checkpoint import Checkpointer as _Checkpointer

TOPICS = {
    "baking": ["bread", "oven", "flour", "dough", "butter"],
    "space": ["planet", "orbit", "star", "moon", "rocket"],
    "music": ["guitar", "song", "melody", "drum", "piano"],
}


def write_rows(path: Path, n: int = 48, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    names = list(TOPICS)

    def pick(words):
        return words[int(torch.randint(len(words), (1,), generator=g))]

    with open(path, "w") as f:
        for i in range(n):
            topic, other = names[i % 3], names[(i + 1) % 3]
            words = TOPICS[topic]
            row = {
                "prompt": f"Please tell me about the {pick(words)} and the {pick(words)} today.",
                "chosen": f"The {pick(words)} is lovely.",
                "rejected": f"The {pick(TOPICS[other])} is awful.",
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return make_tiny_lm(root / "lm", seed=0), write_rows(root / "train.jsonl")


def config(tiny, out: Path, *overrides: str):
    model, data = tiny
    base = [f"model={model}", f"dataset={data}", f"output_dir={out}", "max_steps=4", "batch_size=4",
            "learning_rate=1e-3", "log_every=1", "report_to=none", "max_length=64", "max_prompt_length=32"]  # fmt: skip
    return load_config(None, [*base, *overrides])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_precomputed_reference_equals_on_the_fly(tiny, tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    pre = build_task(config(tiny, tmp_path / "a"), acc)
    fly = build_task(config(tiny, tmp_path / "b", "precompute_ref=false"), acc)
    assert fly.reference.kind == "frozen_copy" and pre.reference.kind == "precomputed"
    batch = pre.collate_train(list(range(8)))
    on_the_fly = fly.reference.logps(fly.model, batch)
    torch.testing.assert_close(batch["ref_logps"], on_the_fly, atol=1e-5, rtol=0)


def test_precompute_ref_never_calls_a_reference_during_training(tiny, tmp_path, monkeypatch):
    cfg = config(tiny, tmp_path / "run")
    train(cfg)  # writes the reference cache
    calls = []
    original = text_task_module.response_logps

    def spy(model, batch, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(model, batch, **kwargs)

    monkeypatch.setattr(text_task_module, "response_logps", spy)
    monkeypatch.setattr(reference_module, "response_logps", spy)  # where a reference model would run
    train(cfg)  # cache hit: only policy forwards, all with grad
    assert calls == [True] * cfg.max_steps


def test_resume_continues_exactly(tiny, tmp_path, monkeypatch):
    overrides = ("max_steps=6", "save_every=2", "lr_scheduler=linear", "warmup_steps=1")
    straight = train(config(tiny, tmp_path / "straight", *overrides))

    class Crash(Exception):
        pass

    original = _Checkpointer.save

    def save_then_crash(self, state):
        path = original(self, state)
        if state["step"] == 4:
            raise Crash
        return path

    monkeypatch.setattr(_Checkpointer, "save", save_then_crash)
    with pytest.raises(Crash):
        train(config(tiny, tmp_path / "resumed", *overrides))
    monkeypatch.setattr(_Checkpointer, "save", original)
    resumed = train(config(tiny, tmp_path / "resumed", *overrides), resume="latest")
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run logged steps 5 and 6 with the same losses as the straight run
    loss = {m["step"]: m["loss"] for m in metrics(tmp_path / "straight") if "loss" in m}
    loss_resumed = {m["step"]: m["loss"] for m in metrics(tmp_path / "resumed") if "loss" in m}
    assert loss_resumed[6] == pytest.approx(loss[6], abs=0)


def test_lora_reference_is_the_base_model(tiny, tmp_path):
    final = train(config(tiny, tmp_path / "lora", "precompute_ref=false", "lora.r=4", "lora.merge=true"))
    from transformers import AutoModelForCausalLM

    assert (final / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert merged.config.vocab_size > 0
    first = metrics(tmp_path / "lora")[1]  # step 1: policy == reference, so margins start at 0
    assert abs(first["rewards/margins"]) < 1e-6


def test_cli_errors_name_the_problem(tiny, tmp_path, capsys):
    model, data = tiny
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model}\ndataset: {data}\noutput_dir: {tmp_path / 'o'}\n")
    assert main(["train", str(cfg), "loss.betta=0.1"]) == 2
    assert "loss.betta: unknown key" in capsys.readouterr().err
    assert main(["train", str(cfg), "max_steps=ten"]) == 2
    assert "max_steps: expected int" in capsys.readouterr().err
    assert main(["train", str(cfg), "loss.beta=-1"]) == 2
    assert "loss.beta: must be > 0" in capsys.readouterr().err
    assert load_config(cfg, ["mixed_precision=no"]).mixed_precision == "no"  # not YAML's False
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", str(cfg), f"model={tmp_path / 'nope'}"]) == 2
    assert "model: no such folder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        data.read_text() + json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n"
    )
    assert main(["train", str(cfg), f"dataset={bad}"]) == 2
    assert "row 48" in capsys.readouterr().err


def test_two_process_global_batch_rpo_matches_one_process(tiny, tmp_path):
    """Two gloo processes on CPU: the gathered contrast matrix spans both processes' rows."""
    model, data = tiny
    common = [f"model={model}", f"dataset={data}", "max_steps=2", "log_every=1", "report_to=none",
              "learning_rate=1e-3", "max_length=64", "max_prompt_length=32", "loss.type=rpo",
              "rpo.global_batch=true", "lr_scheduler=constant"]  # fmt: skip
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmpref.cli"]  # fmt: skip
    subprocess.run([*launch, "train", str(cfg), *common, "batch_size=2", f"output_dir={tmp_path / 'ddp'}"],
                   check=True, env=env, timeout=600)  # fmt: skip
    train(load_config(None, [*common, "batch_size=4", f"output_dir={tmp_path / 'single'}"]))
    ddp = {m["step"]: m for m in metrics(tmp_path / "ddp") if "loss" in m}
    single = {m["step"]: m for m in metrics(tmp_path / "single") if "loss" in m}
    for step in (1, 2):  # step 2 also checks that step 1's gradient was the global one
        assert ddp[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-4, abs=1e-6)
        # Adam's first step hides the gradient's scale; the norm before clipping does not
        assert ddp[step]["grad_norm"] == pytest.approx(single[step]["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("name", ["dpo", "rpo_paired", "rpo_unpaired", "rpo_diagonal", "ipo", "simpo"])
def test_shipped_text_configs_run(name, tiny, tmp_path):
    """Every shipped config loads, validates and trains a few steps on its bundled data."""
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "text" / f"{name}.yaml",
                      [f"model={tiny[0]}", f"output_dir={tmp_path}", "max_steps=3", "report_to=none",
                       "eval_every=0", "max_length=96", "max_prompt_length=64"])  # fmt: skip
    cfg.dataset, cfg.eval_dataset = str(root / cfg.dataset), str(root / cfg.eval_dataset)
    final = train(cfg)
    assert (final / "model.safetensors").is_file()
    last = metrics(tmp_path)[-1]
    assert 0.0 <= last["eval/rewards/accuracies"] <= 1.0 and math.isfinite(last["eval/loss"])


def test_row_index_is_the_row_number_in_the_source_file(tiny, tmp_path):
    """Skipped bad rows and an eval split leave gaps: training messages name rows as the file does."""
    from accelerate import Accelerator

    from mmpref.adapters.causal_lm import tokenize_row

    model, data = tiny
    rows = [json.loads(line) for line in data.read_text().splitlines()][:10]
    for bad in (1, 4):
        rows[bad]["chosen"] = rows[bad]["rejected"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config((model, path), tmp_path / "run", "on_bad_rows=skip", "eval_split=0.25")
    task = build_task(cfg, Accelerator(cpu=True))
    numbered = {}
    for split in (task.train, task.eval):
        for k in range(len(split)):
            row = split.rows[k]
            n = row.index
            expected = tokenize_row(task.tokenizer, n, rows[n]["prompt"], [rows[n]["chosen"], rows[n]["rejected"]],
                                    max_length=64, max_prompt_length=32, truncation_mode=cfg.truncation_mode)  # fmt: skip
            assert row == expected, n
            numbered[n] = split.name
    assert sorted(numbered) == [0, 2, 3, 5, 6, 7, 8, 9] and list(numbered.values()).count("eval") == 2
    batch = task.collate_train(list(range(len(task.train))))
    assert batch["row_index"].tolist() == [task.train.rows[k].index for k in range(len(task.train))]


def test_packed_rows_widen_past_uint16_and_keep_row_numbers():
    from mmpref.adapters.causal_lm import TokenizedRow

    rows = [TokenizedRow(index=7, prompt=[1, 2], responses=[[3], [4, 5]]),
            TokenizedRow(index=9, prompt=[100_000, 2], responses=[[3], [65_536]])]  # fmt: skip
    packed = PackedRows()
    for row in rows:
        packed.append(row)
    assert list(packed) == rows
