"""Every model key takes a hub id: loaded offline from a Hugging Face cache laid out as huggingface_hub writes it."""

import json

import pytest
import torch

from mmpref.cli import main
from mmpref.data.embeddings import prompt_embeddings
from mmpref.errors import ConfigError
from mmpref.hub import open_clip_name, resolve_model
from mmpref.tiny_models import make_tiny_clip, make_tiny_lm, make_tiny_sd15
from mmpref.training import load_config, train
from tests.hub_cache import use_hub_cache, write_hub_repo

ROWS = [{"prompt": f"Tell me about topic {i}.", "chosen": f"Topic {i} is fine.", "rejected": "No."} for i in range(8)]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return use_hub_cache(monkeypatch, tmp_path / "hf")


def write_rows(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_model_by_hub_id_trains_from_the_cache(hub, tmp_path):
    commit = write_hub_repo(hub, "tiny-org/tiny-lm", make_tiny_lm(tmp_path / "lm"))
    source = resolve_model("model", "tiny-org/tiny-lm")
    assert source.is_hub and source.commit == commit and source.identity() == f"tiny-org/tiny-lm@{commit}"
    cfg = load_config(None, ["model=tiny-org/tiny-lm", f"dataset={write_rows(tmp_path / 'd.jsonl')}",
                             f"output_dir={tmp_path / 'run'}", "max_steps=2", "batch_size=4", "report_to=none",
                             "max_length=48", "max_prompt_length=24"])  # fmt: skip
    final = train(cfg)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final).config.vocab_size > 0
    # the reference cache is keyed by the snapshot's commit
    assert len(list((tmp_path / "run" / "cache").glob("ref_logps-train-*.safetensors"))) == 1


def test_revision_pins_a_snapshot(hub, tmp_path):
    first = write_hub_repo(hub, "tiny-org/lm", make_tiny_lm(tmp_path / "a", seed=0), revision="v1")
    second = write_hub_repo(hub, "tiny-org/lm", make_tiny_lm(tmp_path / "b", seed=1))
    assert first != second
    assert resolve_model("model", "tiny-org/lm", revision="v1").commit == first
    assert resolve_model("model", "tiny-org/lm@v1").commit == first
    assert resolve_model("model", "tiny-org/lm").commit == second


def test_uncached_id_offline_names_the_key_the_id_and_the_fix(hub, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"rpo.embedding_model: nobody/missing is not in the local Hugging Face "
                                          r"cache .* HF_HUB_OFFLINE=1 .*hf download nobody/missing"):  # fmt: skip
        resolve_model("rpo.embedding_model", "nobody/missing")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {make_tiny_lm(tmp_path / 'lm')}\ndataset: {write_rows(tmp_path / 'd.jsonl')}\n"
                      f"output_dir: {tmp_path / 'run'}\nloss: {{type: rpo}}\nrpo: {{embedding_model: nobody/st-model}}\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "rpo.embedding_model: nobody/st-model is not in the local Hugging Face cache" in err, err
    assert "Traceback" not in err


def test_hub_repo_without_a_model_is_named(hub, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.md").write_text("no model here")
    write_hub_repo(hub, "tiny-org/notes", folder)
    with pytest.raises(ConfigError, match="model: the hub repository tiny-org/notes is not a transformers model"):
        resolve_model("model", "tiny-org/notes")


def test_sentence_embedder_by_hub_id_equals_the_packaged_folder(hub, tmp_path):
    from mmpref.data.embeddings import default_embedder_path

    write_hub_repo(hub, "sentence-transformers/all-MiniLM-L6-v2", default_embedder_path())
    prompts = ["How long do I knead bread dough?", "What is an orbit?"]
    by_id = prompt_embeddings(prompts, model="sentence-transformers/all-MiniLM-L6-v2")
    assert torch.allclose(by_id, prompt_embeddings(prompts), atol=1e-6)


def test_open_clip_by_hub_id_is_its_cached_snapshot(hub, tmp_path):
    from mmpref.data.image_inputs import load_open_clip

    folder = make_tiny_clip(tmp_path / "clip")
    commit = write_hub_repo(hub, "tiny-org/clip", folder)
    name = open_clip_name("rpo.clip_model", "tiny-org/clip")
    assert name == f"local-dir:{hub / 'models--tiny-org--clip' / 'snapshots' / commit}"
    assert open_clip_name("rpo.clip_model", "hf-hub:tiny-org/clip") == name
    model, _, _ = load_open_clip("tiny-org/clip")
    reference, _, _ = load_open_clip(f"local-dir:{folder}")
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_diffusion_pipeline_by_hub_id_trains(hub, tmp_path):
    from mmpref.data.image_task import make_image_style_task

    write_hub_repo(hub, "tiny-org/sd15", make_tiny_sd15(tmp_path / "sd"))
    train_file, _ = make_image_style_task(tmp_path / "img", n_train=4, n_eval=2, size=32)
    cfg = load_config(None, ["model=tiny-org/sd15", f"dataset={train_file}", f"output_dir={tmp_path / 'run'}",
                             "max_steps=1", "batch_size=2", "report_to=none", "diffusion.resolution=32",
                             "loss.beta=5000", "lora.r=4"])  # fmt: skip
    final = train(cfg)
    info = json.loads((final / "mmpref.json").read_text())
    assert info["base_model"] == "tiny-org/sd15" and info["kind"] == "lora"


def test_reward_and_teacher_models_by_hub_id(hub, tmp_path):
    from mmpref.rdpo.config import _folder
    from mmpref.rdpo.generation import Generator
    from mmpref.rdpo.reward import ModelReward
    from mmpref.rdpo.tiny_models import make_tiny_reward_model

    folder = make_tiny_reward_model(tmp_path / "rm")
    write_hub_repo(hub, "tiny-org/rm", folder, revision="v1")
    _folder("reward", "tiny-org/rm@v1", "a reward model")  # the config check resolves it from the cache
    by_id, by_folder = ModelReward("tiny-org/rm@v1", device="cpu"), ModelReward(str(folder), device="cpu")
    for a, b in zip(by_id.model.state_dict().values(), by_folder.model.state_dict().values()):
        assert torch.equal(a, b)
    write_hub_repo(hub, "tiny-org/teacher", make_tiny_lm(tmp_path / "lm"))
    assert Generator("tiny-org/teacher", device="cpu").model.config.vocab_size > 0
    with pytest.raises(ConfigError, match="teacher: no model nobody/teacher|teacher: nobody/teacher is not in"):
        _folder("teacher", "nobody/teacher", "the teacher")
