"""Safe loading: no pickle anywhere in mmpref, no model code run unless asked, no stale cache ever used."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import save_file

from mmpref.cli import main
from mmpref.data import embeddings as embeddings_mod
from mmpref.rdpo.config import EvalRewardConfig, ScoreConfig, SynthConfig
from mmpref.tiny_models import make_tiny_lm, make_tiny_sd15
from mmpref.training import load_config
from mmpref.training.config import TrainConfig

PACKAGE = Path(__file__).resolve().parent.parent / "mmpref"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("safe_lm") / "lm", seed=0)


def write_rows(path: Path, n: int = 8, tag: str = "") -> Path:
    rows = [{"prompt": f"Question {i}{tag}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------- source audit


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_no_pickle_in_mmpref():
    """Weights and caches written by mmpref are safetensors; any torch.load must be weights_only=True."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                if name.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"):
                    problems.append(f"{path.name}:{node.lineno} imports {name}")
        for call, func in _calls(tree):
            # the tiny scorers write the checkpoint formats the scorers' authors publish (HPS .pt, ImageReward.pt,
            # the aesthetic .pth), so their loaders are tested on those formats; they load with weights_only
            if func == "torch.save" and path.name != "tiny_scorers.py":
                problems.append(f"{path.name}:{call.lineno} torch.save (use safetensors)")
            if func == "torch.load":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in call.keywords)
                if not safe:
                    problems.append(f"{path.name}:{call.lineno} torch.load without weights_only=True")
            if func in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in call.keywords):
                problems.append(f"{path.name}:{call.lineno} np.load with allow_pickle")
            if func.endswith("save_pretrained") and any(
                k.arg == "safe_serialization" and getattr(k.value, "value", None) is False for k in call.keywords
            ):
                problems.append(f"{path.name}:{call.lineno} save_pretrained(safe_serialization=False)")
    assert problems == []


def test_the_audit_would_catch_an_unsafe_load(tmp_path):
    tree = ast.parse("import torch\nx = torch.load('f')\ny = torch.load('f', weights_only=True)\n")
    unsafe = [c.lineno for c, f in _calls(tree) if f == "torch.load"
              and not any(k.arg == "weights_only" and k.value.value is True for k in c.keywords)]  # fmt: skip
    assert unsafe == [2]


# -------------------------------------------------------------------------------- trust_remote_code


def test_trust_remote_code_is_off_by_default():
    for cls in (TrainConfig, SynthConfig, ScoreConfig, EvalRewardConfig):
        assert cls().trust_remote_code is False, cls


@pytest.fixture()
def custom_code_model(lm, tmp_path) -> tuple[Path, Path]:
    """A copy of the tiny LM whose config maps its classes to bundled code that leaves a marker when run."""
    folder = tmp_path / "custom"
    shutil.copytree(lm, folder)
    marker = tmp_path / "code_ran"
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mmpref_custom_llama"
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'mmpref_custom_llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    return folder, marker


def test_model_folder_with_custom_code_is_refused(custom_code_model, tmp_path, capsys):
    folder, marker = custom_code_model
    data = write_rows(tmp_path / "d.jsonl")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    code = main(["train", str(cfg), f"model={folder}", f"dataset={data}", f"output_dir={tmp_path / 'run'}",
                 "report_to=none", "max_length=64", "max_prompt_length=32"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"trust_remote_code: {folder} contains custom code" in err, err
    assert "set trust_remote_code: true only if you trust it" in err
    code = main(["synth", str(cfg), f"teacher={folder}", "prompts=[hi]", "principle=p",
                 f"output={tmp_path / 's.jsonl'}"])  # fmt: skip
    assert code == 2 and "contains custom code" in capsys.readouterr().err
    assert not marker.exists()  # nothing of the folder's code ran
    assert not (tmp_path / "run" / "final").exists()


def test_trust_remote_code_reaches_from_pretrained(lm, tmp_path, monkeypatch):
    import transformers

    seen = []

    class Stop(Exception):
        pass

    def spy(name):
        def record(*args, **kwargs):
            seen.append((name, kwargs.get("trust_remote_code")))
            if name == "model":
                raise Stop
            return original_tokenizer(*args, **kwargs)

        return record

    original_tokenizer = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy("model"))
    from mmpref.training.build import build_task

    data = write_rows(tmp_path / "d.jsonl")
    for flag in (False, True):
        cfg = load_config(None, [f"model={lm}", f"dataset={data}", f"output_dir={tmp_path}", "report_to=none",
                                 f"trust_remote_code={str(flag).lower()}"])  # fmt: skip
        with pytest.raises(Stop):
            build_task(cfg, Accelerator(cpu=True))
    assert seen == [("tokenizer", False), ("model", False), ("tokenizer", True), ("model", True)]


# ------------------------------------------------------------------------------------ stale caches


class CountingEmbedder:
    calls = 0

    def encode(self, texts, **kwargs):
        CountingEmbedder.calls += 1
        return torch.stack([torch.tensor([float(len(t)), 1.0, float(sum(map(ord, t)) % 7)]) for t in texts])


def test_prompt_embedding_cache_follows_data_and_model(tmp_path, monkeypatch):
    monkeypatch.setattr(embeddings_mod, "_load_embedder", lambda *a, **k: CountingEmbedder())
    model, cache = tmp_path / "embedder", tmp_path / "cache"
    model.mkdir()
    (model / "modules.json").write_text("[]")  # what marks a sentence-transformers folder
    (model / "weights.bin").write_bytes(b"version one")
    prompts = ["bake bread", "orbit a planet"]
    first = embeddings_mod.prompt_embeddings(prompts, model=model, cache_dir=cache)
    embeddings_mod.prompt_embeddings(prompts, model=model, cache_dir=cache)
    assert CountingEmbedder.calls == 1  # a hit
    embeddings_mod.prompt_embeddings(["bake bread", "orbit a moon"], model=model, cache_dir=cache)
    assert CountingEmbedder.calls == 2  # other data: recomputed
    (model / "weights.bin").write_bytes(b"version two, retrained")
    again = embeddings_mod.prompt_embeddings(prompts, model=model, cache_dir=cache)
    assert CountingEmbedder.calls == 3  # the model changed in place: recomputed
    torch.testing.assert_close(again, first)
    assert len(list(cache.glob("*.safetensors"))) == 3 and not list(cache.glob(".tmp*"))


def test_reference_logp_cache_follows_data_and_model(lm, tmp_path):
    from mmpref.training.build import build_task

    model = tmp_path / "lm"
    shutil.copytree(lm, model)
    data = write_rows(tmp_path / "d.jsonl")
    out = tmp_path / "run"

    def build():
        cfg = load_config(None, [f"model={model}", f"dataset={data}", f"output_dir={out}", "report_to=none",
                                 "max_length=64", "max_prompt_length=32"])  # fmt: skip
        return build_task(cfg, Accelerator(cpu=True)).train.ref_logps

    first = build()
    build()
    assert len(list((out / "cache").glob("ref_logps-*"))) == 1  # a hit
    write_rows(data, tag=" (edited)")
    build()
    assert len(list((out / "cache").glob("ref_logps-*"))) == 2  # other data: a new cache entry
    state = model / "model.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(state)
    weights = {k: v + 0.05 if k.endswith("lm_head.weight") or "embed" in k else v for k, v in weights.items()}
    save_file(weights, state, metadata={"format": "pt"})
    write_rows(data)  # the original data, with the retrained model
    changed = build()
    assert len(list((out / "cache").glob("ref_logps-*"))) == 3
    assert not torch.allclose(changed, first)  # computed with the new weights, not read back


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Path:
    return make_tiny_sd15(tmp_path_factory.mktemp("safe_sd15") / "sd15", seed=0)


def image_task(root: Path) -> Path:
    root.mkdir()
    rows = []
    for i, (a, b) in enumerate([("red", "blue"), ("green", "yellow"), ("white", "black")]):
        Image.new("RGB", (16, 16), a).save(root / f"{i}a.png")
        Image.new("RGB", (16, 16), b).save(root / f"{i}b.png")
        rows.append({"caption": f"a {a} square", "jpg_0": f"{i}a.png", "jpg_1": f"{i}b.png", "label_0": 1})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "train.jsonl"


def test_latent_cache_follows_images_and_vae(sd15, tmp_path):
    from mmpref.training.build import build_task

    model = tmp_path / "sd15"
    shutil.copytree(sd15, model)
    data = image_task(tmp_path / "task")
    cache = data.parent / ".mmpref_cache"

    def latents():
        cfg = load_config(None, [f"model={model}", f"dataset={data}", f"output_dir={tmp_path / 'o'}",
                                 "report_to=none", "diffusion.resolution=16", "loss.beta=5000", "max_length=64",
                                 "max_prompt_length=32", "diffusion.cache_latents=ahead", "batch_size=1"])  # fmt: skip
        split = build_task(cfg, Accelerator(cpu=True)).train
        return split.latents.get([split.data.row(i) for i in range(3)])["latents"].float()

    def chunks():
        return sorted(cache.glob("latents-*/chunk-*"))

    first = latents()
    latents()
    assert len(list(cache.glob("latents-*"))) == 1 and len(chunks()) == 1  # a hit: nothing encoded again
    Image.new("RGB", (16, 16), "purple").save(data.parent / "1a.png")  # an image edited in place
    edited = latents()
    assert len(list(cache.glob("latents-*"))) == 1 and len(chunks()) == 2  # that row alone, encoded again
    from safetensors.torch import load_file

    assert load_file(chunks()[-1])["row"].tolist() == [1]
    torch.testing.assert_close(edited[[0, 2]], first[[0, 2]])
    assert not torch.allclose(edited[1], first[1])
    from safetensors.torch import load_file, save_file

    (vae_weights,) = (model / "vae").glob("*.safetensors")
    save_file({k: v * 1.5 for k, v in load_file(vae_weights).items()}, vae_weights)  # a retrained VAE
    other_vae = latents()
    assert len(list(cache.glob("latents-*"))) == 2  # a new cache, not the old latents
    assert not torch.allclose(other_vae, edited)


def test_clip_embedding_cache_follows_captions_and_model(sd15, tmp_path, monkeypatch):
    import mmpref.data.image_inputs as image_inputs
    from mmpref.training.build import build_task

    loads = []

    class FakeClip:
        def encode_text(self, tokens):
            return tokens.float()

    def fake_load(model, weights, device):
        loads.append(model)
        return FakeClip(), None, lambda texts: torch.tensor([[len(t), 1.0, 2.0] for t in texts])

    monkeypatch.setattr(image_inputs, "load_open_clip", fake_load)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "open_clip_config.json").write_text("{}")
    save_file({"w": torch.ones(1)}, clip / "open_clip_model.safetensors")  # stands for the weights
    data = image_task(tmp_path / "task")

    def embed():  # every row's embedding, cached before training (cache_latents: ahead)
        cfg = load_config(None, [f"model={sd15}", f"dataset={data}", f"output_dir={tmp_path / 'o'}", "report_to=none",
                                 "diffusion.resolution=16", "loss.beta=5000", "max_length=64", "max_prompt_length=32",
                                 "diffusion.cache_latents=ahead", "loss.type=rpo", f"rpo.clip_model=local-dir:{clip}",
                                 "rpo.embedding=text", "batch_size=1"])  # fmt: skip
        build_task(cfg, Accelerator(cpu=True))

    embed()
    embed()
    assert len(loads) == 1  # a hit
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[0]["caption"] = "a red square, edited"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    embed()
    assert len(loads) == 2  # other captions: recomputed
    save_file({"w": torch.ones(2)}, clip / "open_clip_model.safetensors")  # retrained in place
    embed()
    assert len(loads) == 3  # other weights: recomputed
