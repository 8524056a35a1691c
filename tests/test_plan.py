"""The plan: every config or data-shape mistake is reported in seconds, before any model weights load, with
exit code 2 and the key the user set named; and a reference is built and tested from a tiny model and a 3-row
split, without a task."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from mmpref.adapters.causal_lm import response_logps
from mmpref.cli import main
from mmpref.data.image_task import make_image_style_task
from mmpref.data.tokenized import TokenizedSplit, TokenLimits
from mmpref.data.validation import prepare_text_dataset
from mmpref.tiny_models import make_tiny_lm, make_tiny_sd15
from mmpref.training.reference import AdaptersOff, FrozenCopy, Precomputed
from mmpref.training.text_task import reference_logps

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"prompt": f"Question {i}: what is {i} plus one?", "chosen": f"It is {i + 1}.", "rejected": "No idea."}
        for i in range(8)]  # fmt: skip
UNPAIRED = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0} for i in range(8)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    paired, unpaired = root / "paired.jsonl", root / "unpaired.jsonl"
    paired.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    unpaired.write_text("".join(json.dumps(r) + "\n" for r in UNPAIRED))
    images, _ = make_image_style_task(root / "images", n_train=6, n_eval=2, size=32, n_style_refs=1)
    return {"lm": make_tiny_lm(root / "lm"), "sd": make_tiny_sd15(root / "sd"), "paired": paired,
            "unpaired": unpaired, "images": images, "root": root}  # fmt: skip


def train(files, tmp_path, capsys, model: str, data: str, *overrides: str) -> tuple[int, str]:
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    code = main(["train", str(config), f"model={files[model]}", f"dataset={files[data]}", f"output_dir={tmp_path / 'out'}",
                 "max_steps=1", "batch_size=2", "report_to=none", "max_length=64", "max_prompt_length=32", *overrides])  # fmt: skip
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "data", "overrides", "message"),
    [
        ("sd", "images", ["loss.type=odpo"], "loss.type: odpo needs score_0 and score_1 in every row"),
        ("sd", "images", ["loss.type=rpo", "rpo.base_loss=rdpo", "rpo.mode=diagonal"],
         "rpo.base_loss: rdpo needs score_0 and score_1"),
        ("lm", "paired", ["loss.type=odpo"], "loss.type: odpo needs score_chosen and score_rejected"),
        ("lm", "paired", ["max_steps=null", "batch_size=4", "gradient_accumulation_steps=3"],
         "dataset: 8 rows give fewer than 3 batches of 4"),
        ("sd", "images", ["diffusion.attention=xformers"], "diffusion.attention: xformers is not installed"),
        ("lm", "unpaired", ["loss.type=rpo", "rpo.mode=diagonal"], "rpo.mode: diagonal needs paired rows"),
        ("lm", "unpaired", ["loss.type=sigmoid"], "loss.type: sigmoid needs paired rows"),
        ("sd", "images", ["loss.type=simpo"], "loss.type: simpo needs the policy's own log-probs"),
        ("sd", "images", ["loss.sft_weight=0.5"], "loss.sft_weight"),
    ],
)  # fmt: skip
def test_config_mistakes_are_reported_before_any_weights_load(files, tmp_path, capsys, no_weights, model, data,
                                                             overrides, message):  # fmt: skip
    if "diffusion.attention=xformers" in overrides:
        pytest.importorskip("mmpref")  # xformers absent here (CPU); where it is installed the run is valid
        import importlib.util

        if importlib.util.find_spec("xformers") is not None:
            pytest.skip("xformers is installed")
    code, err = train(files, tmp_path, capsys, model, data, *overrides)
    assert code == 2 and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "config.json").exists()  # nothing written for a run that cannot start


def test_custom_code_is_refused_from_the_config_file_alone(files, tmp_path, capsys, no_weights):
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(files["lm"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.Model"}}))
    files = {**files, "custom": model}
    code, err = train(files, tmp_path, capsys, "custom", "paired")
    assert code == 2 and "trust_remote_code:" in err and "auto_map" in err, err


def three_rows(lm: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer, model = AutoTokenizer.from_pretrained(lm), AutoModelForCausalLM.from_pretrained(lm)
    data = prepare_text_dataset(ROWS[:3])
    split = TokenizedSplit.build(data, "train", tokenizer, TokenLimits(64, 32, "keep_end"), Accelerator(cpu=True))
    return model, tokenizer, split, split.collate([0, 1, 2], tokenizer.pad_token_id)


def test_references_from_a_tiny_model_and_three_rows(files):
    model, tokenizer, split, batch = three_rows(files["lm"])
    with torch.no_grad():
        before = response_logps(model, batch)[0]

    compute = partial(reference_logps, accelerator=Accelerator(cpu=True), batch_size=2, chunk_size=0,
                      pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    precomputed = Precomputed.build(model, [split], compute)
    torch.testing.assert_close(split.ref_logps, before, atol=1e-5, rtol=0)
    batch = split.collate([0, 1, 2], tokenizer.pad_token_id)
    assert torch.equal(precomputed.logps(model, batch), split.ref_logps)

    frozen = FrozenCopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # training moves the policy, not the reference
        moved = response_logps(model, batch)[0]
    assert not torch.allclose(moved, before, atol=1e-3)
    torch.testing.assert_close(frozen.logps(model, batch), before, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in frozen.module.parameters())


def test_adapters_off_is_the_base_model(files):
    from peft import LoraConfig, get_peft_model

    model, tokenizer, split, batch = three_rows(files["lm"])
    with torch.no_grad():
        base = response_logps(model, batch)[0]
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        adapted = response_logps(lora, batch)[0]
    assert not torch.allclose(adapted, base, atol=1e-4)  # the adapters change the model ...
    torch.testing.assert_close(AdaptersOff().logps(lora, batch), base, atol=1e-5, rtol=0)  # ... and go off
    with torch.no_grad():
        torch.testing.assert_close(response_logps(lora, batch)[0], adapted)  # back on after the call
