"""Image preference scorers against hand-computed scores, the statistics module, and ``mmpref eval``.

Every scorer loads a tiny random model written in its authors' published layout (``mmpref.metrics.tiny_scorers``)
through the same loader the real weights take; each expected value is computed here from the model's parts,
with the preprocessing written out by hand (PIL bicubic resize of the shorter side, center crop, CLIP mean/std),
so changing a scorer's normalisation, logit scale, image size or crop fails its test. Nothing downloads.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmpref.metrics.scorers import SCORERS, load_scorer
from mmpref.metrics.stats import bootstrap_ci, win_outcomes, win_rate
from mmpref.metrics.tiny_scorers import make_tiny_scorers
from mmpref.training.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])  # CLIP's, as the authors' code writes it
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
PROMPTS = ["a red circle on a blue background", "a green square", "the old teacher plays the piano"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_scorers(tmp_path_factory.mktemp("scorers"))


@pytest.fixture(scope="module")
def images():
    """Non-square pictures with structure at every scale, so resize and crop both change the pixels."""
    out = []
    for i, (w, h) in enumerate([(48, 40), (40, 56), (37, 37)]):
        y, x = np.mgrid[0:h, 0:w]
        rng = np.random.default_rng(i)
        rgb = np.stack([(x * (3 + i)) % 256, (y * 7 + x * 2) % 256, rng.integers(0, 256, (h, w))], axis=-1)
        out.append(Image.fromarray(rgb.astype(np.uint8)))
    return out


def resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic, the longer one floored), then the centered ``size`` square."""
    w, h = image.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = round((nw - size) / 2), round((nh - size) / 2)
    return image.crop((left, top, left + size, top + size))


def to_normalised(image: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - MEAN[:, None, None]) / STD[:, None, None]


def clip_pixels(images, size: int) -> torch.Tensor:
    """OpenAI CLIP's ``_transform``: the preprocessing of ImageReward, the aesthetic predictor and PickScore."""
    return torch.stack([to_normalised(resize_crop(im, size)) for im in images])


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def mlp_by_hand(state: dict, x: torch.Tensor, prefix: str = "") -> torch.Tensor:
    """The authors' MLP (Linear layers 0, 2, 4, 6, 7; dropout between, no activation), in eval mode."""
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"{prefix}layers.{i}.weight"].T + state[f"{prefix}layers.{i}.bias"]
    return x.squeeze(-1)


# --------------------------------------------------------------------------------------------- scorers


def test_pickscore_is_the_logit_scale_times_the_cosine(tiny, images):
    from transformers import CLIPModel, CLIPTokenizer

    scores = load_scorer("pickscore", tiny["pickscore"]).score(images, PROMPTS)
    model = CLIPModel.from_pretrained(tiny["pickscore"]).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny["pickscore"])
    with torch.no_grad():
        pixels = clip_pixels(images, 32)
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_in = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = model.text_projection(model.text_model(**text_in).pooler_output)
        scale = model.logit_scale.exp()
    assert scale.item() == pytest.approx(math.exp(2.0), rel=1e-6)  # not 1: a lost logit scale shows
    expected = scale * (unit(image) * unit(text)).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert scores.std() > 0.05  # the images and prompts matter


def hps_pixels(images, size: int) -> torch.Tensor:
    """HPSv2's ``image_transform(is_train=False)``: ToTensor first, then bicubic resize *of the tensor*
    (antialiased), center crop, normalise."""
    out = []
    for im in images:
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        h, w = x.shape[1:]
        nh, nw = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
        top, left = round((nh - size) / 2), round((nw - size) / 2)
        x = x[:, top : top + size, left : left + size]
        out.append((x - MEAN[:, None, None]) / STD[:, None, None])
    return torch.stack(out)


@pytest.mark.parametrize(
    ("name", "checkpoint"), [("hpsv2", "HPS_v2_compressed.pt"), ("hpsv21", "HPS_v2.1_compressed.pt")]
)
def test_hpsv2_is_the_cosine_under_the_hps_checkpoint(tiny, images, name, checkpoint):
    import open_clip

    folder = Path(tiny["hpsv2"])
    scores = load_scorer(name, folder).score(images, PROMPTS)
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.CLIP(**cfg).eval()
    model.load_state_dict(torch.load(folder / checkpoint, weights_only=True)["state_dict"])
    with torch.no_grad():
        image = model.encode_image(hps_pixels(images, cfg["vision_cfg"]["image_size"]))
        text = model.encode_text(open_clip.tokenize(PROMPTS))
    assert model.logit_scale.exp().item() > 10  # HPS's score leaves it out
    torch.testing.assert_close(scores, (unit(image) * unit(text)).sum(-1), atol=1e-5, rtol=1e-4)
    other = "hpsv21" if name == "hpsv2" else "hpsv2"
    assert not torch.allclose(scores, load_scorer(other, folder).score(images, PROMPTS))  # its own checkpoint


def timm_vit_by_hand(state: dict, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's ``vit.py:VisionTransformer.forward`` straight from the checkpoint's tensors (timm names)."""
    p = "blip.visual_encoder."
    weight = state[p + "patch_embed.proj.weight"]
    width, patch = weight.shape[0], weight.shape[-1]
    heads = width // 64
    x = F.conv2d(pixels, weight, state[p + "patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([state[p + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + state[p + "pos_embed"]
    b, n, _ = x.shape
    depth = len({k.split(".")[3] for k in state if k.startswith(p + "blocks.")})
    for i in range(depth):
        q = f"{p}blocks.{i}."
        h = F.layer_norm(x, (width,), state[q + "norm1.weight"], state[q + "norm1.bias"], eps=1e-6)
        qkv = (h @ state[q + "attn.qkv.weight"].T + state[q + "attn.qkv.bias"]).reshape(b, n, 3, heads, -1)
        qs, ks, vs = qkv.permute(2, 0, 3, 1, 4)
        attn = (qs @ ks.transpose(-2, -1) * (width // heads) ** -0.5).softmax(-1)
        o = (attn @ vs).transpose(1, 2).reshape(b, n, width)
        x = x + o @ state[q + "attn.proj.weight"].T + state[q + "attn.proj.bias"]
        h = F.layer_norm(x, (width,), state[q + "norm2.weight"], state[q + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ state[q + "mlp.fc1.weight"].T + state[q + "mlp.fc1.bias"])
        x = x + h @ state[q + "mlp.fc2.weight"].T + state[q + "mlp.fc2.bias"]
    return F.layer_norm(x, (width,), state[p + "norm.weight"], state[p + "norm.bias"], eps=1e-6)


def test_imagereward_is_the_normalised_mlp_of_blip(tiny, images):
    from transformers import BertTokenizer

    folder = Path(tiny["imagereward"])
    scorer = load_scorer("imagereward", folder)
    scores = scorer.score(images, PROMPTS)
    state = torch.load(folder / "ImageReward.pt", weights_only=True)
    # the text encoder holds exactly the checkpoint's BERT (its forward is transformers' port of med.py)
    bert = scorer.model.text_encoder.state_dict()
    for key, value in state.items():
        if key.startswith("blip.text_encoder."):
            assert torch.equal(bert[key[len("blip.text_encoder.") :]], value), key
    tokenizer = BertTokenizer.from_pretrained(folder)  # blip.py:init_tokenizer
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    text = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert text.input_ids.shape == (3, 35)
    with torch.no_grad():
        image_embeds = timm_vit_by_hand(state, clip_pixels(images, 32))
        hidden = scorer.model.text_encoder(input_ids=text.input_ids, attention_mask=text.attention_mask,
                                           encoder_hidden_states=image_embeds,
                                           encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long))  # fmt: skip
        raw = mlp_by_hand(state, hidden.last_hidden_state[:, 0], prefix="mlp.")
    expected = (raw - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert scores.std() > 0.05


def test_aesthetic_is_the_mlp_of_the_unit_clip_embedding(tiny, images):
    from transformers import CLIPModel

    folder = Path(tiny["aesthetic"])
    scores = load_scorer("aesthetic", folder).score(images, ["ignored"] * 3)
    model = CLIPModel.from_pretrained(folder).eval()
    state = torch.load(folder / "aesthetic-model.pth", weights_only=True)
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=clip_pixels(images, 32)).pooler_output)
        expected = mlp_by_hand(state, unit(emb))
        assert not torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=0.1)  # the normalisation matters
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert scores.std() > 0.01


def test_clipscore_is_100_times_the_clamped_cosine(tiny, images):
    import open_clip

    from mmpref.tiny_models import load_clip

    scores = load_scorer("clipscore", tiny["clipscore"]).score(images, PROMPTS)
    model, _, _ = load_clip(tiny["clipscore"].removeprefix("local-dir:"))
    with torch.no_grad():
        image = model.encode_image(clip_pixels(images, 32))
        text = model.encode_text(open_clip.tokenize(PROMPTS))
    expected = 100 * (unit(image) * unit(text)).sum(-1).clamp(min=0)
    torch.testing.assert_close(scores, expected, atol=1e-3, rtol=1e-4)


def test_scorers_take_hub_ids_and_never_download(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for name in SCORERS:
        with pytest.raises(ConfigError, match=f"{name}: .*HF_HUB_OFFLINE=1"):
            load_scorer(name)  # the authors' published weights, not cached here
    with pytest.raises(ConfigError, match="unknown 'pick'"):
        load_scorer("pick")
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        load_scorer("aesthetic", tiny["aesthetic"]).score([Image.new("RGB", (8, 8))] * 2, PROMPTS)


# ------------------------------------------------------------------------------------------ statistics


def test_win_rate_counts_ties_half_and_resamples_prompts():
    a, b = torch.tensor([3.0, 1.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 5.0, 0.0])
    assert win_outcomes(a, b).tolist() == [1.0, 0.5, 0.0, 0.5]
    result = win_rate(a, b, n_resamples=500)
    assert result.value == 0.5 and result.n == 4 and result.ci_low < 0.5 < result.ci_high
    same = win_rate(a, a)
    assert (same.value, same.ci_low, same.ci_high) == (0.5, 0.5, 0.5)
    two_d = win_rate(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 3.0], [0.0, 1.0]]))
    assert two_d.n == 2 and two_d.per_item == [0.5, 0.25] and two_d.value == 0.375  # per-prompt means
    assert bootstrap_ci(torch.arange(10.0), seed=3) == bootstrap_ci(torch.arange(10.0), seed=3)
    with pytest.raises(ValueError, match="paired"):
        win_rate(a, b[:3])


# ------------------------------------------------------------------------- training and `mmpref eval images`

SAMPLE_PROMPTS = [
    "a red circle on a blue background",
    "a green square on a white background",
    "a black cross",
]


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """A 1-step Diffusion-DPO run of the tiny SD 1.5 on 6 pairs of the bundled task, at 32 px, with
    pickscore and aesthetic scoring its samples at every evaluation; counts what each scorer scores."""
    from mmpref.metrics import scorers as scorers_module
    from mmpref.tiny_models import make_tiny_sd15
    from mmpref.training import load_config, train

    root = tmp_path_factory.mktemp("run")
    data = Path(__file__).resolve().parents[1] / "data" / "image_style"
    for split, n in (("train", 6), ("eval", 2)):
        lines = (data / f"{split}.jsonl").read_text().splitlines()[:n]
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    sd15 = make_tiny_sd15(root / "sd15", seed=0)
    calls = []
    real = scorers_module.load_scorer

    def counting(name, model=None, **kwargs):
        scorer = real(name, model, **kwargs)
        score = scorer.score
        scorer.score = lambda images, prompts: calls.append((name, len(images))) or score(images, prompts)
        return scorer

    cfg = load_config(None, [
        f"model={sd15}", f"dataset={root / 'train.jsonl'}", f"eval_dataset={root / 'eval.jsonl'}",
        f"image_root={data}", f"output_dir={root / 'out'}", "report_to=none", "diffusion.resolution=32",
        "loss.beta=5000", "max_steps=1", "batch_size=2", "eval_batch_size=2", "learning_rate=1e-2",
        f"samples.prompts={SAMPLE_PROMPTS}", "samples.num_inference_steps=2", "samples.scorers=[pickscore,aesthetic]",
        f"samples.scorer_models.pickscore={tiny['pickscore']}", f"samples.scorer_models.aesthetic={tiny['aesthetic']}",
    ])  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scorers_module, "load_scorer", counting)
        train(cfg)
    return {"out": root / "out", "calls": calls, "root": root}


def test_training_logs_each_scorer_and_its_win_rate_at_every_evaluation(run):
    records = [json.loads(line) for line in (run["out"] / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in records if "samples/pickscore" in r}
    assert sorted(scored) == [0, 1]
    for name in ("pickscore", "aesthetic"):
        assert scored[0][f"samples/{name}_win_rate"] == 0.5  # step 0: the policy is the reference, all ties
        assert scored[0][f"samples/{name}"] == pytest.approx(scored[0][f"samples/reference_{name}"])
        assert scored[1][f"samples/reference_{name}"] == scored[0][f"samples/reference_{name}"]
        assert 0.0 <= scored[1][f"samples/{name}_win_rate"] <= 1.0
    assert any("eval/rewards/accuracies" in r for r in records)  # beside the implicit reward accuracy
    # the reference images are scored once; the policy's at each of the two evaluations
    assert sorted(run["calls"]) == sorted([(n, 3) for n in ("pickscore", "aesthetic") for _ in range(3)])


def test_eval_images_on_sample_output_writes_report_table_and_sheet(run, tiny, tmp_path, capsys):
    from mmpref.cli import main

    (tmp_path / "prompts.txt").write_text("\n".join(SAMPLE_PROMPTS) + "\n")
    samples = tmp_path / "samples"
    assert main(["sample", str(run["out"]), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
                 "--resolution", "32", "--out", str(samples), "--device", "cpu"]) == 0  # fmt: skip
    names = ["pickscore", "hpsv2", "hpsv21", "imagereward", "aesthetic", "clipscore"]
    models = [f"--scorer-model={n}={tiny['hpsv2' if n == 'hpsv21' else n]}" for n in names]
    capsys.readouterr()
    assert main(["eval", "images", str(samples), "--scorers", ",".join(names), *models, "--device", "cpu",
                 "--n-resamples", "200"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    print(printed)  # the table, for -s runs
    out = samples / "eval"
    report = json.loads((out / "eval_images.json").read_text())
    assert list(report["scorers"]) == names and len(report["pairs"]) == 3
    for name in names:
        assert f"| {name} |" in printed
        r = report["scorers"][name]
        assert (
            r["win_rate"]["n"] == 3
            and r["win_rate"]["ci"][0] <= r["win_rate"]["value"] <= r["win_rate"]["ci"][1]
        )
        wins = [
            (p["scores"][name]["trained"] > p["scores"][name]["reference"])
            + 0.5 * (p["scores"][name]["trained"] == p["scores"][name]["reference"])
            for p in report["pairs"]
        ]
        assert r["win_rate"]["value"] == pytest.approx(sum(wins) / 3)
        assert r["trained"]["value"] == pytest.approx(
            np.mean([p["scores"][name]["trained"] for p in report["pairs"]])
        )
    assert report["pairs"][0]["prompt"] == SAMPLE_PROMPTS[0]
    assert (out / "eval_images.md").read_text().count("\n| ") == len(names) + 1
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] == 160 + 2 * 160 and sheet.size[1] > 3 * 160

    # identical folders: every pair a tie, the win rate 0.5 and its interval [0.5, 0.5]
    same = tmp_path / "same"
    assert main(["eval", "images", "--reference", str(samples / "reference"), "--trained",
                 str(samples / "reference"), "--scorers", "aesthetic", models[4], "--out", str(same)]) == 0  # fmt: skip
    win = json.loads((same / "eval_images.json").read_text())["scorers"]["aesthetic"]["win_rate"]
    assert win["value"] == 0.5 and win["ci"][0] <= 0.5 <= win["ci"][1]

    # user errors name the problem; a scorer's hub weights are never fetched
    assert main(["eval", "images", str(tmp_path / "nowhere"), "--scorers", "aesthetic"]) == 2
    assert main(["eval", "images", str(samples), "--scorers", "pickscor"]) == 2
    err = capsys.readouterr().err
    assert "image folder not found" in err and "unknown 'pickscor'" in err


# ------------------------------------------------------------------------------------------ `mmpref eval text`


def summed_logps_by_hand(model, tokenizer, prompt: str, response: str) -> float:
    """log π(response | prompt): one forward over prompt + response + EOS, summed over the response tokens."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    return sum(logps[len(p) - 1 + i, tok].item() for i, tok in enumerate(r))


def test_eval_text_judges_with_several_rewards_counts_tokens_and_measures_implicit_accuracy(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmpref.cli import main
    from mmpref.tiny_models import make_tiny_lm

    policy, reference = (
        make_tiny_lm(tmp_path / "policy", seed=1),
        make_tiny_lm(tmp_path / "reference", seed=0),
    )
    rows = [{"prompt": "How do I make pancakes?", "chosen": "Mix flour, eggs and milk.", "rejected": "No."},
            {"prompt": "What is 12 plus 30?", "chosen": "12 plus 30 is 42.", "rejected": "Whatever, go away."},
            {"prompt": "Why is the sky blue?", "chosen": "Sunlight scatters off the air.", "rejected": "Boring."},
            {"prompt": "Tell me about trains.", "chosen": "Thank you for asking!", "rejected": "It rains."}]  # fmt: skip
    prefs = tmp_path / "heldout.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"policy": str(policy), "reference": str(reference), "prompts": ["Hi there!", "How do I bake bread?"],
           "reward": "rule:polite", "rewards": ["rule:keyword"], "rule": {"keywords": ["e"]}, "samples_per_prompt": 2,
           "preferences": str(prefs), "max_length": 64, "max_prompt_length": 32,
           "generation": {"max_new_tokens": 6, "batch_size": 2, "temperature": 1.0},
           "output": str(tmp_path / "text.json")}  # fmt: skip
    (tmp_path / "eval.yaml").write_text(json.dumps({"eval": cfg}))  # JSON is YAML
    assert main(["eval", "text", str(tmp_path / "eval.yaml")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "text.json").read_text())
    assert list(report["rewards"]) == ["rule:polite", "rule:keyword"]
    assert report["summary"] == report["rewards"]["rule:polite"]  # eval-reward's summary: the first reward
    assert "| `rule:keyword` |" in printed and "answer length (tokens)" in printed
    tok = AutoTokenizer.from_pretrained(policy)
    for side in ("policy", "reference"):
        counts = [
            [len(tok(a, add_special_tokens=False)["input_ids"]) for a in r[side]] for r in report["prompts"]
        ]
        assert [r[f"{side}_tokens"] for r in report["prompts"]] == counts
        assert report["lengths"][side]["value"] == pytest.approx(np.mean(counts))
    # ℓ = policy − reference summed log-probs, by hand, then accuracy with ties ½
    models = {name: AutoModelForCausalLM.from_pretrained(path).eval() for name, path in
              (("policy", policy), ("reference", reference))}  # fmt: skip
    margins = []
    for r in rows:
        ell = {y: summed_logps_by_hand(models["policy"], tok, r["prompt"], r[y])
               - summed_logps_by_hand(models["reference"], tok, r["prompt"], r[y]) for y in ("chosen", "rejected")}  # fmt: skip
        margins.append(ell["chosen"] - ell["rejected"])
    expected = np.mean([1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins])
    assert 0 < expected < 1  # the hand check sees both outcomes
    assert report["implicit_accuracy"]["value"] == pytest.approx(expected)
    assert report["implicit_accuracy"]["n"] == 4

    # eval-reward is the same command
    assert main(["eval-reward", str(tmp_path / "eval.yaml"), f"output={tmp_path / 'alias.json'}",
                 "preferences=null", "rewards=[]"]) == 0  # fmt: skip
    alias = json.loads((tmp_path / "alias.json").read_text())
    assert alias["summary"] == report["summary"] and alias["implicit_accuracy"] is None


def test_samples_scorer_keys_are_checked_before_anything_loads():
    from mmpref.training import load_config

    cfg = load_config(
        None, ["samples.scorers=[pickscore,hpsv21]", "samples.scorer_models.pickscore=ORG/NAME"]
    )
    assert cfg.samples.scorers == ["pickscore", "hpsv21"] and cfg.samples.scorer_models == {
        "pickscore": "ORG/NAME"
    }
    for overrides, message in [
        (["samples.scorers=[pickscor]"], "samples.scorers: unknown scorer 'pickscor'"),
        (
            ["samples.scorers=[pickscore]", "samples.scorer_models.hpsv2=x"],
            "samples.scorer_models: 'hpsv2' is not",
        ),
        (
            ["samples.scorers=[pickscore]", "samples.scorer_models.pickscore=3"],
            "samples.scorer_models.pickscore",
        ),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
