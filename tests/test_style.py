"""Style-alignment metric (docs/design.md §9): pure functions, the open_clip embedder and cache, the CLI commands."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmpref.cli import main
from mmpref.metrics import clip_embedder
from mmpref.metrics.clip_embedder import (
    BadImageError,
    BadImageWarning,
    ClipEmbedder,
    EmbedderError,
    FeatureEmbedder,
    embed_image_files,
    load_rgb,
)
from mmpref.metrics.report import compare_style, evaluate_style, parse_style_names
from mmpref.metrics.style import bootstrap_ci, content_score, style_accuracy, style_score, win_rate
from mmpref.tiny_models import load_clip, make_tiny_clip

# ------------------------------------------------------------------------------------------ pure functions


def _unit(d: int, i: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(i), d).float()


def test_generated_equal_to_references_scores_one():
    refs = torch.stack([s * torch.tensor([3.0, -1.0, 2.0, 0.5]) for s in (1.0, 4.0, 0.01)])
    result = style_score(refs, refs)
    assert result.value == pytest.approx(1.0, abs=1e-6)
    assert result.per_item == pytest.approx([1.0] * 3, abs=1e-6)
    # for diverse references, gen = refs scores exactly the length of the mean unit reference
    refs = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    expected = F.normalize(refs, dim=-1).mean(0).norm().item()
    assert style_score(refs, refs).value == pytest.approx(expected, abs=1e-6)


def test_orthogonal_sets_score_zero():
    gen = torch.stack([_unit(6, 0), _unit(6, 1), _unit(6, 0) + 2 * _unit(6, 1)])
    refs = torch.stack([_unit(6, 3), _unit(6, 4) * 5, _unit(6, 5)])
    result = style_score(gen, refs)
    assert result.value == pytest.approx(0.0, abs=1e-7)
    assert (result.ci_low, result.ci_high) == pytest.approx((0.0, 0.0), abs=1e-7)


def test_metrics_are_invariant_to_embedding_scale():
    g = torch.Generator().manual_seed(1)
    gen, refs, texts = (
        torch.randn(20, 8, generator=g),
        torch.randn(5, 8, generator=g),
        torch.randn(3, 8, generator=g),
    )
    prompts = torch.randn(20, 8, generator=g)
    scale = torch.rand(20, 1, generator=g) * 100 + 0.01  # a different scale per row, too
    assert style_score(gen * scale, refs * 1e-3).value == pytest.approx(
        style_score(gen, refs).value, abs=1e-6
    )
    assert style_accuracy(gen * scale, texts * 7, 1).value == style_accuracy(gen, texts, 1).value
    assert content_score(gen * scale, prompts * 9).value == pytest.approx(
        content_score(gen, prompts).value, abs=1e-4
    )


def _noisy_around(direction: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return direction + 0.8 * torch.randn(n, direction.numel(), generator=torch.Generator().manual_seed(seed))


def test_intervals_contain_the_estimate_and_shrink_with_n():
    refs = _noisy_around(_unit(16, 0) * 3, 10, seed=0)
    widths = []
    for n in (10, 100, 1000):
        result = style_score(_noisy_around(_unit(16, 0) * 3, n, seed=n), refs, n_resamples=500, seed=3)
        assert result.ci_low <= result.value <= result.ci_high and result.n == n
        widths.append(result.ci_high - result.ci_low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2] > 0  # ~ 1/sqrt(n)
    again = style_score(_noisy_around(_unit(16, 0) * 3, 10, seed=10), refs, n_resamples=500, seed=3)
    assert widths[0] == again.ci_high - again.ci_low  # seeded: reproducible
    assert bootstrap_ci(torch.tensor([0.3]), n_resamples=100) == (pytest.approx(0.3), pytest.approx(0.3))
    with pytest.raises(ValueError):
        bootstrap_ci(torch.tensor([]))


def test_style_accuracy_on_a_constructed_case():
    styles = torch.stack([_unit(4, 0), _unit(4, 1), _unit(4, 2)])  # e.g. van gogh, sketch, photo
    images = torch.cat([_unit(4, 1) + 0.3 * _unit(4, 0)] * 7 + [_unit(4, 2) + 0.2 * _unit(4, 1)] * 3).view(
        10, 4
    )
    assert style_accuracy(images, styles, target_index=1).value == pytest.approx(0.7)
    assert style_accuracy(images, styles, target_index=2).value == pytest.approx(0.3)
    assert style_accuracy(images, styles, target_index=0).value == 0.0
    with pytest.raises(ValueError, match="out of range"):
        style_accuracy(images, styles, target_index=3)


def test_content_score_is_100_cos_clamped_at_zero():
    prompts = torch.stack([_unit(3, 0), _unit(3, 1), _unit(3, 2)])
    images = torch.stack([_unit(3, 0) * 2, -_unit(3, 1), _unit(3, 2) + _unit(3, 0)])
    result = content_score(images, prompts)
    assert result.per_item == pytest.approx([100.0, 0.0, 100 / math.sqrt(2)])
    assert result.value == pytest.approx((100 + 100 / math.sqrt(2)) / 3)
    with pytest.raises(ValueError, match="one per image"):
        content_score(images, prompts[:2])


def test_win_rate_counts_ties_as_half():
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 5.0, 4.0])
    result = win_rate(a, b)
    assert result.per_item == [1.0, 0.5, 0.0, 0.5] and result.value == 0.5
    assert 0.0 <= result.ci_low <= 0.5 <= result.ci_high <= 1.0
    assert win_rate(a, a).value == 0.5 and win_rate(a + 1, a).value == 1.0
    assert win_rate(torch.tensor([1.0]), torch.tensor([1.05]), tie_tolerance=0.1).value == 0.5
    with pytest.raises(ValueError, match="paired"):
        win_rate(a, b[:3])


def test_parse_style_names():
    assert parse_style_names("van gogh, Sketch ,photo", "sketch") == (["van gogh", "Sketch", "photo"], 1)
    for names, target in [("van gogh,sketch", "cubism"), ("sketch", "sketch"), ("a,b", None), ("a,A", "a")]:
        with pytest.raises(ValueError):
            parse_style_names(names, target)


# ----------------------------------------------------------------------------------------- image folders


def _rng_image(rng: np.random.Generator, mode: str, size: int = 40) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (size, size) if channels is None else (size, size, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)


@pytest.fixture()
def folders(tmp_path) -> dict[str, Path]:
    """generated/: PNG, JPEG, RGBA PNG, grayscale PNG and a broken PNG; refs/: 3 images; a prompts file."""
    rng = np.random.default_rng(0)
    gen, refs = tmp_path / "generated", tmp_path / "refs"
    gen.mkdir()
    refs.mkdir()
    _rng_image(rng, "RGB").save(gen / "a_rgb.png")
    _rng_image(rng, "RGB").save(gen / "b_photo.jpg", quality=90)
    _rng_image(rng, "RGBA").save(gen / "c_rgba.png")
    _rng_image(rng, "L").save(gen / "d_gray.png")
    (gen / "e_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    (gen / "notes.txt").write_text("ignored: not an image suffix")
    for i in range(3):
        _rng_image(rng, "RGB").save(refs / f"ref{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na photo of a dog\na lighthouse\na bowl of ramen\na broken file\n")
    return {"generated": gen, "refs": refs, "prompts": prompts, "root": tmp_path}


def test_load_rgb_converts_rgba_and_grayscale(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent -> white
    rgba.save(tmp_path / "x.png")
    Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
    Image.new("I;16", (4, 4), 257 * 200).save(tmp_path / "g16.png")
    im = load_rgb(tmp_path / "x.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 1)) == (10, 20, 30)
    assert load_rgb(tmp_path / "g.png").getpixel((2, 2)) == (77, 77, 77)
    assert load_rgb(tmp_path / "g16.png").getpixel((2, 2)) == (200, 200, 200)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(BadImageError, match="bad.jpg"):
        load_rgb(tmp_path / "bad.jpg")


def test_clip_embedder_matches_open_clip_and_caches(clip_dir, folders, monkeypatch):
    paths = sorted(p for p in folders["refs"].iterdir())
    emb = ClipEmbedder(
        f"local-dir:{clip_dir}", cache_dir=folders["root"] / "cache", batch_size=2, progress=False
    )
    assert not emb.model_loaded  # lazy
    got = emb.embed_images(paths)
    assert emb.model_loaded and got.shape == (3, 32)
    model, preprocess, tokenizer = load_clip(clip_dir)
    with torch.inference_mode():
        want = model.encode_image(torch.stack([preprocess(load_rgb(p)) for p in paths]))
        want_text = model.encode_text(tokenizer(["a cat", "a dog"]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.embed_texts(["a cat", "a dog"]), want_text, atol=1e-5, rtol=1e-5)

    def boom(*args, **kwargs):
        raise AssertionError("the model must not be loaded when everything is cached")

    monkeypatch.setattr(clip_embedder, "load_open_clip", boom)
    fresh = ClipEmbedder(f"local-dir:{clip_dir}", cache_dir=folders["root"] / "cache", progress=False)
    torch.testing.assert_close(fresh.embed_images(paths[::-1]), got.flip(0))
    torch.testing.assert_close(fresh.embed_texts(["a dog"]), want_text[1:])
    assert not fresh.model_loaded
    (folders["root"] / "copy.png").write_bytes(paths[0].read_bytes())  # same content, other name: a hit
    torch.testing.assert_close(fresh.embed_images([folders["root"] / "copy.png"]), got[:1])
    assert not any(p.suffix == ".tmp" for p in (folders["root"] / "cache").rglob("*"))


def test_embedder_requires_local_weights(tmp_path):
    with pytest.raises(EmbedderError, match="--clip-weights"):
        ClipEmbedder("ViT-B-32")
    with pytest.raises(EmbedderError, match="not found"):
        ClipEmbedder("ViT-B-32", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(EmbedderError, match="not found"):
        ClipEmbedder(f"local-dir:{tmp_path / 'nope'}")


def test_embed_image_files_skips_or_raises(folders):
    embedder = FeatureEmbedder(lambda im: np.asarray(im, dtype=np.float32).mean(axis=(0, 1)))
    paths = sorted(folders["generated"].glob("*.*"))
    paths = [p for p in paths if p.suffix != ".txt"]
    with pytest.warns(BadImageWarning, match="e_broken.png"):
        result = embed_image_files(embedder, paths, on_bad_images="skip")
    assert [p.name for p in result.paths] == ["a_rgb.png", "b_photo.jpg", "c_rgba.png", "d_gray.png"]
    assert result.embeddings.shape == (4, 3) and list(result.skipped) == [
        folders["generated"] / "e_broken.png"
    ]
    with pytest.raises(BadImageError, match="e_broken.png"):
        embed_image_files(embedder, paths, on_bad_images="error")


# ------------------------------------------------------------------------------------------------- CLI


def _run(argv: list[str]) -> int:
    return main(argv)


def _style_argv(folders, clip_dir, *extra: str) -> list[str]:
    return [
        "style-score",
        "--generated",
        str(folders["generated"]),
        "--style-refs",
        str(folders["refs"]),
        "--clip-model",
        f"local-dir:{clip_dir}",
        "--cache-dir",
        str(folders["root"] / "cache"),
        "--n-resamples",
        "200",
        *extra,
    ]


def test_style_score_cli_end_to_end(clip_dir, folders, monkeypatch, capsys):
    out = folders["root"] / "out" / "report.json"
    argv = _style_argv(
        folders,
        clip_dir,
        "--prompts",
        str(folders["prompts"]),
        "--out",
        str(out),
        "--style-names",
        "van gogh,sketch,photo",
        "--target",
        "Sketch",
    )
    assert _run(argv) == 0
    captured = capsys.readouterr()
    assert "e_broken.png" in captured.err and "skipped 1" in captured.err
    for name in ("style_score", "style_accuracy", "content_score", "95% CI"):
        assert name in captured.out
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"style_score", "style_accuracy", "content_score"}
    assert [row["file"] for row in report["images"]] == [
        "a_rgb.png",
        "b_photo.jpg",
        "c_rgba.png",
        "d_gray.png",
    ]
    assert [row["prompt"] for row in report["images"]][-1] == "a bowl of ramen"
    assert report["skipped"][0]["file"].endswith("e_broken.png") and report["target"] == "sketch"
    for m in report["metrics"].values():
        assert m["ci"][0] <= m["value"] <= m["ci"][1] and m["n"] == 4
    sheet = Path(report["contact_sheet"])
    assert sheet == out.with_name("report_sheet.png")
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width > 2 * 128

    def boom(*args, **kwargs):
        raise AssertionError("cached re-run must not load the model")

    monkeypatch.setattr(clip_embedder, "load_open_clip", boom)
    out2 = folders["root"] / "out2.json"
    assert _run([*argv, "--out", str(out2)]) == 0  # the last --out wins
    assert json.loads(out2.read_text())["metrics"] == report["metrics"]


def test_style_score_cli_bad_images_flagged_as_error(clip_dir, folders, capsys):
    assert (
        _run(
            _style_argv(
                folders, clip_dir, "--on-bad-images", "error", "--out", str(folders["root"] / "r.json")
            )
        )
        == 2
    )
    assert "e_broken.png" in capsys.readouterr().err
    assert not (folders["root"] / "r.json").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_folder", "not found"),
        ("empty_folder", "no images"),
        ("bad_target", "not among"),
        ("target_alone", "needs --style-names"),
        ("prompt_count", "4 prompts but the folder has 5 images"),
        ("no_weights", "--clip-weights"),
        ("out_in_generated", "--out must not be inside --generated"),
    ],
)
def test_style_score_cli_user_errors_exit_2(clip_dir, folders, capsys, case, message):
    argv = _style_argv(folders, clip_dir, "--out", str(folders["root"] / "r.json"))
    if case == "missing_folder":
        argv[argv.index("--generated") + 1] = str(folders["root"] / "nope")
    elif case == "empty_folder":
        (folders["root"] / "empty").mkdir()
        argv[argv.index("--style-refs") + 1] = str(folders["root"] / "empty")
    elif case == "bad_target":
        argv += ["--style-names", "van gogh,sketch", "--target", "cubism"]
    elif case == "target_alone":
        argv += ["--target", "sketch"]
    elif case == "prompt_count":
        short = folders["root"] / "short.txt"
        short.write_text("one\ntwo\nthree\nfour\n")
        argv += ["--prompts", str(short)]
    elif case == "no_weights":
        argv[argv.index("--clip-model") + 1] = "ViT-B-32"
    elif case == "out_in_generated":
        argv += ["--out", str(folders["generated"] / "report.json")]
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmpref style-score: error:") and message in err


def test_prompts_mapping_files(clip_dir, folders):
    mapping = folders["root"] / "prompts.jsonl"
    names = ["a_rgb.png", "b_photo.jpg", "c_rgba", "d_gray.png"]  # a mapping may omit the suffix
    mapping.write_text(
        "".join(json.dumps({"file_name": n, "prompt": f"p{i}"}) + "\n" for i, n in enumerate(names))
    )
    out = folders["root"] / "r.json"
    assert _run(_style_argv(folders, clip_dir, "--prompts", str(mapping), "--out", str(out))) == 0
    assert [r["prompt"] for r in json.loads(out.read_text())["images"]] == ["p0", "p1", "p2", "p3"]
    partial = folders["root"] / "p.json"
    partial.write_text(json.dumps({"a_rgb.png": "only one"}))
    assert _run(_style_argv(folders, clip_dir, "--prompts", str(partial), "--out", str(out))) == 2


def test_compare_style_cli(clip_dir, folders, capsys):
    out = folders["root"] / "cmp.json"
    argv = [
        "compare-style",
        "--a",
        str(folders["generated"]),
        "--b",
        str(folders["generated"]),
        "--style-refs",
        str(folders["refs"]),
        "--clip-model",
        f"local-dir:{clip_dir}",
        "--cache-dir",
        str(folders["root"] / "cache"),
        "--n-resamples",
        "100",
        "--out",
        str(out),
    ]
    assert _run(argv) == 0
    assert "win_rate_a_over_b" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["metrics"]["win_rate_a_over_b"]["value"] == 0.5  # identical sets: all ties
    assert len(report["pairs"]) == 4
    argv[argv.index("--b") + 1] = str(folders["refs"])  # no shared file name
    assert _run(argv) == 2
    assert "share no image file name" in capsys.readouterr().err


# -------------------------------------------------------------------- a style the embedder can see


def _texture_features(im: Image.Image) -> np.ndarray:
    """Hand-made "style" features: high-frequency energy along x and y, contrast, and flatness."""
    x = np.asarray(im, dtype=np.float32).mean(axis=2) / 255.0
    energy_x, energy_y = np.abs(np.diff(x, axis=1)).mean(), np.abs(np.diff(x, axis=0)).mean()
    return np.array([energy_x, energy_y, x.std(), max(0.0, 0.03 - energy_x - energy_y)])


def _striped(rng: np.random.Generator, size: int = 48) -> Image.Image:
    period, vertical = int(rng.integers(2, 7)), bool(rng.integers(2))
    stripes = (np.arange(size) // period) % 2
    mask = np.broadcast_to(stripes[None, :] if vertical else stripes[:, None], (size, size))
    c0, c1 = rng.integers(0, 100, 3), rng.integers(156, 256, 3)  # dark and light stripes
    return Image.fromarray(np.where(mask[..., None] == 1, c1, c0).astype(np.uint8))


def _flat(rng: np.random.Generator, size: int = 48) -> Image.Image:
    noise = rng.normal(0, 1, (size, size, 1))  # a flat fill with faint sensor-like noise
    return Image.fromarray(np.clip(rng.integers(0, 256, 3) + noise, 0, 255).astype(np.uint8))


def _image_folder(root: Path, name: str, make, n: int, seed: int) -> Path:
    folder = root / name
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        make(rng).save(folder / f"{i:03d}.png")
    return folder


def test_styled_images_score_higher_with_an_embedder_that_sees_the_style(tmp_path):
    embedder = FeatureEmbedder(_texture_features)
    refs = _image_folder(tmp_path, "refs", _striped, 12, seed=0)
    styled = _image_folder(tmp_path, "styled", _striped, 16, seed=1)
    plain = _image_folder(tmp_path, "plain", _flat, 16, seed=2)
    s_styled = evaluate_style(embedder, styled, refs, n_resamples=200).metrics["style_score"]
    s_plain = evaluate_style(embedder, plain, refs, n_resamples=200).metrics["style_score"]
    assert s_styled.value > s_plain.value + 0.3
    assert s_styled.ci_low > s_plain.ci_high  # the intervals separate too
    comparison = compare_style(embedder, styled, plain, refs, n_resamples=200)
    assert comparison.metrics["win_rate_a_over_b"].value == 1.0


def test_on_the_bundled_task_the_chosen_images_carry_the_style(tmp_path):
    """data/image_style: chosen (styled) images score higher than their rejected (plain) twins against the
    task's style references, with an embedder that sees texture (the features above, not CLIP)."""
    import shutil

    data = Path(__file__).resolve().parent.parent / "data" / "image_style"
    rows = [json.loads(line) for line in (data / "eval.jsonl").read_text().splitlines()]
    for side in ("chosen", "rejected"):
        (tmp_path / side).mkdir()
    for i, row in enumerate(rows):  # same file name on both sides: compare-style pairs them by name
        chosen, rejected = (row["jpg_0"], row["jpg_1"]) if row["label_0"] == 1 else (row["jpg_1"], row["jpg_0"])
        shutil.copy(data / chosen, tmp_path / "chosen" / f"{i:03d}.png")
        shutil.copy(data / rejected, tmp_path / "rejected" / f"{i:03d}.png")
    embedder = FeatureEmbedder(_texture_features)
    refs = data / "style_refs"
    chosen = evaluate_style(embedder, tmp_path / "chosen", refs, n_resamples=200).metrics["style_score"]
    rejected = evaluate_style(embedder, tmp_path / "rejected", refs, n_resamples=200).metrics["style_score"]
    assert chosen.n == rejected.n == len(rows) == 48
    assert chosen.ci_low > rejected.ci_high, (chosen, rejected)
    win = compare_style(embedder, tmp_path / "chosen", tmp_path / "rejected", refs, n_resamples=200)
    assert win.metrics["win_rate_a_over_b"].value > 0.9
