"""What final/ holds: weights that reload to the trained model exactly, a model card, and the Hub upload."""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl

from mmpref.data.image_task import make_image_style_task
from mmpref.hub import ModelSource
from mmpref.tiny_models import make_tiny_lm, make_tiny_sd15
from mmpref.training import load_config, train
from mmpref.training.diffusion_task import DiffusionTask
from mmpref.training.model_card import HubUploadError, hub_dataset_id, write_model_card
from mmpref.training.text_task import TextTask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    rows = root / "train.jsonl"
    with open(rows, "w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": f"Tell me about item {i}.", "chosen": f"Item {i} is lovely.",
                                "rejected": f"Item {i} is awful."}) + "\n")  # fmt: skip
    image_train, image_eval = make_image_style_task(root / "images", n_train=8, n_eval=4, seed=1)
    return {"lm": make_tiny_lm(root / "lm"), "rows": rows, "sd15": make_tiny_sd15(root / "sd15"),
            "image_train": image_train, "image_eval": image_eval}  # fmt: skip


def text_config(tiny, out: Path, *overrides: str):
    base = [f"model={tiny['lm']}", f"dataset={tiny['rows']}", f"output_dir={out}", "max_steps=2", "batch_size=4",
            "learning_rate=1e-2", "report_to=none", "max_length=64", "max_prompt_length=32", "eval_split=0.25"]  # fmt: skip
    return load_config(None, [*base, *overrides])


def diffusion_config(tiny, out: Path, *overrides: str):
    base = [f"model={tiny['sd15']}", f"dataset={tiny['image_train']}", f"eval_dataset={tiny['image_eval']}",
            f"output_dir={out}", "report_to=none", "diffusion.resolution=64", "loss.beta=5000", "max_steps=2",
            "batch_size=2", "eval_batch_size=4", "learning_rate=1e-2"]  # fmt: skip
    return load_config(None, [*base, *overrides])


def capture_at_save(monkeypatch, task_class, forward):
    """Record ``forward(model)`` of the trained model as the loop hands it to ``save``, before anything is
    written (merging LoRA changes the model in place)."""
    seen = {}
    original = task_class.save

    def save(self, model, out_dir, state_dict=None):
        model.eval()
        with torch.no_grad():
            seen["output"] = forward(model)
        return original(self, model, out_dir, state_dict=state_dict)

    monkeypatch.setattr(task_class, "save", save)
    return seen


TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 8]])


def logits(model) -> torch.Tensor:
    return model(input_ids=TOKENS).logits


def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents, states = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    return unet(latents, torch.tensor([500]), encoder_hidden_states=states).sample


def front_matter(final: Path) -> dict:
    return ModelCard.load(final / "README.md").data.to_dict()


# ------------------------------------------------------------------------------- weights reload exactly


def test_diffusion_lora_reloads_at_full_strength(tiny, tmp_path, monkeypatch):
    """r ≠ alpha: a LoRA saved without its adapter config reloads with alpha = r, here 4× too weak."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    seen = capture_at_save(monkeypatch, DiffusionTask, unet_output)
    final = train(diffusion_config(tiny, tmp_path / "run", "lora.r=4", "lora.alpha=16",
                                   "samples.prompts=[a red circle]", "samples.num_inference_steps=2"))  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(tiny["sd15"], safety_checker=None)
    pipe.load_lora_weights(final)
    with torch.no_grad():
        reloaded = unet_output(pipe.unet.eval())
        base = unet_output(UNet2DConditionModel.from_pretrained(tiny["sd15"], subfolder="unet").eval())
    assert (seen["output"] - base).abs().max() > 1e-3  # the adapter changed the output: the check can fail
    torch.testing.assert_close(reloaded, seen["output"], rtol=1e-5, atol=1e-6)

    card = front_matter(final)
    assert card["library_name"] == "diffusers" and card["pipeline_tag"] == "text-to-image"
    assert {"mmpref", "dpo", "sigmoid", "lora", "text-to-image", "stable-diffusion", "diffusion-dpo"} <= set(
        card["tags"]
    )
    assert "base_model" not in card  # a local folder: named in the text only
    text = (final / "README.md").read_text()
    assert (final / "samples.png").is_file() and "](samples.png)" in text
    assert str(tiny["sd15"]) in text and "load_lora_weights" in text
    assert "| LoRA r | 4 |" in text and "| LoRA alpha | 16 |" in text and "eval/rewards/accuracies" in text
    assert "| LoRA target modules | to_k, to_out.0, to_q, to_v |" in text  # as applied to the UNet


def test_text_lora_reloads_with_peft(tiny, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seen = capture_at_save(monkeypatch, TextTask, logits)
    final = train(text_config(tiny, tmp_path / "run", "lora.r=4", "lora.alpha=16"))
    base = AutoModelForCausalLM.from_pretrained(tiny["lm"]).eval()
    with torch.no_grad():
        base_logits = logits(base)
        reloaded = logits(PeftModel.from_pretrained(base, final).eval())
    assert (seen["output"] - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(reloaded, seen["output"], rtol=1e-5, atol=1e-5)

    card = front_matter(final)  # ours, not the one peft's save_pretrained writes
    assert card["library_name"] == "peft" and card["pipeline_tag"] == "text-generation"
    assert {"mmpref", "dpo", "sigmoid", "lora"} <= set(card["tags"])
    text = (final / "README.md").read_text()
    assert "PeftModel.from_pretrained" in text and "eval/rewards/accuracies" in text


def test_merged_text_lora_loads_as_a_plain_model(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = capture_at_save(monkeypatch, TextTask, logits)
    final = train(text_config(tiny, tmp_path / "run", "lora.r=4", "lora.alpha=16", "lora.merge=true"))
    with torch.no_grad():
        merged = logits(AutoModelForCausalLM.from_pretrained(final / "merged").eval())
        base = logits(AutoModelForCausalLM.from_pretrained(tiny["lm"]).eval())
    assert (seen["output"] - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, seen["output"], rtol=1e-4, atol=1e-4)  # merging rounds in float32


# ------------------------------------------------------------------------------------------- model card


def test_card_of_a_full_rpo_model_names_hub_ids(tiny, tmp_path):
    """Hub ids go into the front matter, local paths only into the text."""
    cfg = load_config(None, ["model=org/tiny-lm", "dataset=org/pairs", "eval_dataset=./held_out.jsonl",
                             "loss.type=rpo", "rpo.mode=diagonal", f"output_dir={tmp_path}"])  # fmt: skip
    source = ModelSource("model", "org/tiny-lm", "v1", None, "abc123", "config.json")
    metrics = {"eval/loss": 0.5, "eval/rewards/accuracies": 0.75}
    write_model_card(
        tmp_path, cfg, source, metrics, diffusion=False, steps=7, processes=2, location="org/out"
    )
    card = front_matter(tmp_path)
    assert card["base_model"] == "org/tiny-lm" and card["datasets"] == ["org/pairs"]
    assert card["library_name"] == "transformers" and card["pipeline_tag"] == "text-generation"
    assert set(card["tags"]) == {"mmpref", "rpo", "sigmoid"}
    text = (tmp_path / "README.md").read_text()
    assert "arXiv 2402.10958" in text and "arXiv 2305.18290" in text and "./held_out.jsonl" in text
    assert (
        "| steps | 7 |" in text and "| effective batch size | 8 |" in text and "| eval/loss | 0.5 |" in text
    )
    assert 'AutoModelForCausalLM.from_pretrained("org/out")' in text


def test_hub_dataset_ids_and_local_paths(tmp_path):
    assert hub_dataset_id("trl-lib/ultrafeedback_binarized@main") == "trl-lib/ultrafeedback_binarized"
    assert hub_dataset_id("imdb") == "imdb"
    assert hub_dataset_id(str(tmp_path)) is None and hub_dataset_id("data/*.jsonl") is None
    assert hub_dataset_id("pairs.jsonl") is None and hub_dataset_id("./pairs") is None


# ------------------------------------------------------------------------------------------ push_to_hub


def test_push_to_hub_sends_final_with_its_card(tiny, tmp_path, monkeypatch):
    sent = {}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        sent.update(repo_id=repo_id, private=private, exist_ok=exist_ok)
        return RepoUrl(f"https://huggingface.co/me/{repo_id.split('/')[-1]}")

    def upload_folder(self, *, folder_path, repo_id, commit_message=None, **kwargs):
        sent.update(files=sorted(p.name for p in Path(folder_path).iterdir()), upload_repo=repo_id,
                    folder=Path(folder_path), message=commit_message)  # fmt: skip

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    final = train(text_config(tiny, tmp_path / "run", "push_to_hub=true", "hub_model_id=tiny-dpo",
                              "hub_private=true"))  # fmt: skip
    assert sent["repo_id"] == "tiny-dpo" and sent["private"] is True and sent["exist_ok"] is True
    assert sent["upload_repo"] == "me/tiny-dpo" and sent["folder"] == final
    assert {"README.md", "model.safetensors", "config.json"} <= set(sent["files"]) and sent["message"]


def test_failed_upload_keeps_the_model_and_names_the_repo(tiny, tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise OSError("401 Unauthorized")

    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}")
    )
    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    out = tmp_path / "run"
    with pytest.raises(HubUploadError, match="org/tiny-dpo") as info:
        train(text_config(tiny, out, "push_to_hub=true", "hub_model_id=org/tiny-dpo"))
    assert "401 Unauthorized" in str(info.value) and str(out / "final") in str(info.value)
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "README.md").is_file()
    assert (out / "summary.json").is_file()
