"""The path a user takes, end to end: a hub model and a hub dataset in TRL's conversational implicit-prompt
format (both from a local Hugging Face cache, offline), LoRA, tensorboard and wandb, a model card, and an
output that reloads with peft; and the same run from Python with objects already in memory."""

import json

import datasets
import pytest
import torch
import yaml

from mmpref.tiny_models import make_tiny_lm
from mmpref.training import Callback, load_config, train
from tests.hub_cache import use_hub_cache, write_hub_repo

pytestmark = pytest.mark.usefixtures("one_thread")


def chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# TRL's implicit prompt: chosen and rejected are whole conversations; the prompt is their common prefix
ROWS = [{"chosen": chat(f"Tell me about topic {i}.", f"Topic {i} is lovely."),
         "rejected": chat(f"Tell me about topic {i}.", "Go away.")} for i in range(12)]  # fmt: skip


def test_hub_model_hub_dataset_lora_trackers_card_and_reload(tmp_path, monkeypatch, wandb_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = use_hub_cache(monkeypatch, tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    write_hub_repo(hub, "tiny-org/chat-lm", make_tiny_lm(tmp_path / "lm"))
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    (data / "train-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:10]))
    (data / "test-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[10:]))
    write_hub_repo(hub, "tiny-org/chat-prefs", tmp_path / "repo", repo_type="dataset")

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": "tiny-org/chat-lm", "dataset": "tiny-org/chat-prefs", "eval_split": "test", "output_dir": str(out),
        "lora": {"r": 4, "alpha": 8}, "learning_rate": 1e-3, "max_steps": 3, "batch_size": 2, "log_every": 1,
        "report_to": ["tensorboard", "wandb"], "max_length": 64, "max_prompt_length": 32,
    }))  # fmt: skip
    from mmpref.cli import main

    assert main(["train", str(config)]) == 0

    final = out / "final"
    card = (final / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "tiny-org/chat-lm" and front["datasets"] == ["tiny-org/chat-prefs"]
    assert front["library_name"] == "peft" and {"mmpref", "dpo", "lora"} <= set(front["tags"])
    assert "eval/rewards/accuracies" in card
    assert list((out / "mmpref").rglob("events.out.tfevents.*")), "no tensorboard events"
    assert list(wandb_dir.glob("offline-run-*/run-*.wandb")), "no wandb offline run"

    base = AutoModelForCausalLM.from_pretrained("tiny-org/chat-lm")  # from the cache, as a user would
    model = PeftModel.from_pretrained(base, final)
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 8
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("Tell me about topic 3.", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


class Recorder(Callback):
    def __init__(self):
        self.logged, self.steps, self.final = [], [], None

    def on_log(self, step, metrics):
        self.logged.append((step, dict(metrics)))

    def on_step_end(self, step, model):
        self.steps.append(step)

    def on_train_end(self, final_dir):
        self.final = final_dir


def test_python_api_with_objects_in_memory(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_lm(tmp_path / "lm")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = Recorder()
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "max_steps=2", "batch_size=2", "log_every=1",
                             "report_to=none", "learning_rate=1e-2", "max_length=64", "max_prompt_length=32"])  # fmt: skip
    final = train(cfg, train_dataset=ROWS[:8], eval_dataset=datasets.Dataset.from_list(ROWS[8:]), model=model,
                  tokenizer=tokenizer, callbacks=[recorder])  # fmt: skip
    assert recorder.steps == [1, 2] and recorder.final == final
    assert [step for step, m in recorder.logged if "loss" in m] == [1, 2]
    assert any("eval/rewards/accuracies" in m for _, m in recorder.logged)
    trained = AutoModelForCausalLM.from_pretrained(final)
    assert any(not torch.equal(before[k], v) for k, v in trained.state_dict().items())  # it trained the given model
    with pytest.raises(ValueError, match="row 1"):  # in-memory rows are validated as files are
        train(cfg, train_dataset=[ROWS[0], {"chosen": "same", "rejected": "same"}], model=model, tokenizer=tokenizer)
