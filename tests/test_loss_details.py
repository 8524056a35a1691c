"""Loss details where mmpref follows the reference implementations: SimPO's metrics, ties, the SFT term."""

import json
import math

import pytest
import torch

from mmpref.losses import LogRatios, Objective, dpo_loss, rpo_loss


def test_simpo_rewards_are_the_length_averaged_log_probs_the_loss_compares():
    logps_w, logps_l = torch.tensor([-6.0, -2.0]), torch.tensor([-3.0, -9.0])
    len_w, len_l = torch.tensor([6.0, 1.0]), torch.tensor([1.0, 3.0])
    out = dpo_loss(logps_w, logps_l, beta=2.0, loss_type="simpo", gamma=0.5,
                   chosen_lengths=len_w, rejected_lengths=len_l)  # fmt: skip
    # averages: chosen (-1, -2), rejected (-3, -3); β = 2
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-3.0)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-6.0)
    assert out.metrics["rewards/accuracies"].item() == 1.0  # summed log-probs would say 0.5
    expected = [-math.log(1 / (1 + math.exp(-(2 * (a - b) - 0.5)))) for a, b in ((-1, -3), (-2, -3))]
    assert out.per_pair.tolist() == pytest.approx(expected)
    rpo = rpo_loss(logps_w, logps_l, beta=2.0, mode="diagonal", base_loss="simpo", gamma=0.5,
                   chosen_lengths=len_w, rejected_lengths=len_l)  # fmt: skip
    assert rpo.metrics["rewards/chosen"].item() == pytest.approx(-3.0)


def test_sft_term_is_token_weighted_as_trl():
    rows = LogRatios(logratios=torch.zeros(2, 2), row_index=torch.arange(2),
                     lengths=torch.tensor([[1.0, 1.0], [3.0, 1.0]]),
                     policy_logps=torch.tensor([[-1.0, -5.0], [-9.0, -5.0]]))  # fmt: skip
    out = Objective(sft_weight=1.0)(rows)
    # chosen tokens: 1 + 3, their NLL 1 + 9: (1 + 9) / 4, not the mean of per-row averages (1 + 3) / 2
    assert out.metrics["sft/nll"].item() == pytest.approx(2.5)
    assert out.loss.item() == pytest.approx(math.log(2) + 2.5)


def test_ties_count_half_in_the_diffusion_metrics():
    from mmpref.training.diffusion_task import _error_metrics

    model_err = torch.tensor([[0.2, 0.2], [0.1, 0.3], [0.3, 0.1]])
    ref_err = torch.tensor([[0.2, 0.2], [0.2, 0.2], [0.2, 0.2]])
    # a tie, a win (chosen improved more), a loss
    assert _error_metrics(model_err, ref_err)["diffusion/implicit_acc"].item() == pytest.approx(0.5)


def test_unpaired_batches_are_balanced_like_the_authors_loader():
    from mmpref.data.splits import epoch_order

    labels = torch.tensor([True] * 7 + [False] * 13)
    for epoch in range(3):
        order = epoch_order(20, seed=0, epoch=epoch, labels=labels, batch_size=4)
        assert len(order) == 12 and len(set(order)) == 12  # 3 batches: the 7 desirable rows run out first
        for b in range(0, 12, 4):
            assert labels[order[b : b + 4]].sum().item() == 2
    odd = epoch_order(20, seed=0, epoch=0, labels=labels, batch_size=3)
    assert [labels[odd[b : b + 3]].sum().item() for b in range(0, len(odd), 3)] == [2, 2, 2]
    assert epoch_order(20, seed=0, epoch=0) == torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    from mmpref.tiny_models import make_tiny_sd15

    return make_tiny_sd15(tmp_path_factory.mktemp("sd15") / "sd")


@pytest.mark.parametrize(
    "override, message",
    [("loss.type=simpo", "loss.type: simpo needs the policy's own log-probs"),
     ("loss.type=rpo rpo.base_loss=simpo", "rpo.base_loss: simpo needs"),
     ("loss.sft_weight=0.1", "loss.sft_weight: the SFT term is a log-likelihood")],
)  # fmt: skip
def test_diffusion_refuses_losses_its_logratio_cannot_feed(override, message, tiny_sd15, tmp_path, capsys):
    from mmpref.cli import main

    sd = tiny_sd15
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {sd}\ndataset: {tmp_path / 'data.jsonl'}\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(config), *override.split()]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything loads or is written


def test_odpo_pairs_whose_chosen_score_is_not_higher_are_bad_rows(tmp_path):
    from mmpref.data import DataError, prepare_text_dataset

    rows = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad", "score_chosen": sc, "score_rejected": sr}
            for i, (sc, sr) in enumerate([(2.0, 1.0), (1.0, 1.0), (0.5, 3.0), (4.0, 0.0)])]  # fmt: skip
    with pytest.raises(DataError, match=r"2 of 4 rows are bad[\s\S]*row 1: 'score_chosen' \(1.0\) must exceed"):
        prepare_text_dataset(rows, chosen_scores_higher=True)
    kept = prepare_text_dataset(rows, chosen_scores_higher=True, on_bad_rows="skip")
    assert list(kept.row_numbers) == [0, 3]
    assert len(prepare_text_dataset(rows).dataset) == 4  # other losses take any scores
    with pytest.raises(DataError, match="needs the columns score_chosen and score_rejected"):
        prepare_text_dataset([{"prompt": "q", "chosen": "a", "rejected": "b"}], needs_scores=True)


def test_odpo_offsets_are_not_clamped_per_pair():
    rows = LogRatios(logratios=torch.zeros(1, 2), row_index=torch.arange(1), scores=torch.tensor([[1.0005, 1.0]]))
    out = Objective(type="odpo", beta=1.0, offset_alpha=1.0)(rows)
    # Δ_r = log(0.0005) ≈ −7.6; the old clamp at 1e-3 gave log(1e-3) ≈ −6.9
    assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-(0 - math.log(0.0005))))), rel=1e-4)


def test_odpo_and_rdpo_train_on_image_rows_with_scores(tiny_sd15, tmp_path):
    from mmpref.data import DataError
    from mmpref.data.image_task import make_image_style_task
    from mmpref.data.images import prepare_image_dataset
    from mmpref.training import load_config, train

    train_file, _ = make_image_style_task(tmp_path / "img", n_train=4, n_eval=1, size=32, n_style_refs=1)
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    for r in rows:  # the preferred (styled) image scores higher
        r["score_0"], r["score_1"] = (2.0, 1.0) if r["label_0"] == 1 else (1.0, 2.0)
    scored = tmp_path / "img" / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = prepare_image_dataset(scored, chosen_scores_higher=True).pairs
    assert [p.scores for p in pairs] == [(2.0, 1.0)] * 4  # in (chosen, rejected) order
    rows[1]["score_0"], rows[1]["score_1"] = rows[1]["score_1"], rows[1]["score_0"]
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="row 1: the preferred image's score"):
        prepare_image_dataset(scored, chosen_scores_higher=True)
    with pytest.raises(DataError, match="needs the columns score_0 and score_1"):
        prepare_image_dataset(train_file, needs_scores=True)
    for loss in ("odpo", "rdpo"):
        cfg = load_config(None, [f"model={tiny_sd15}", f"dataset={scored}", f"output_dir={tmp_path / loss}",
                                 f"loss.type={loss}", "loss.beta=5000", "max_steps=1", "batch_size=2",
                                 "report_to=none", "diffusion.resolution=32", "on_bad_rows=skip"])  # fmt: skip
        assert (train(cfg) / "unet").is_dir()


def test_sdxl_flip_mirrors_the_crop_corner_as_diffusers_does(tmp_path):
    """diffusers' SDXL scripts flip the resized image, then crop: crop_top_left is measured in the mirror."""
    import io

    import numpy as np
    from PIL import Image

    from mmpref.data.image_inputs import pair_pixels
    from mmpref.data.images import ImagePair

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 80, 3), dtype=np.uint8)) for _ in range(2)]
    blobs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    pair = ImagePair(0, "a caption", blobs[0], blobs[1], "digest")
    plain = pair_pixels(pair, 32, center_crop=False, generator=torch.Generator().manual_seed(3))
    flipped = pair_pixels(pair, 32, center_crop=False, flip=True, generator=torch.Generator().manual_seed(3))
    (top, left), width = plain.crop_top_left, 64  # 40x80 resized so the short side is 32: 32x64
    assert flipped.crop_top_left == (top, width - 32 - left) and flipped.mirrored_left == width - 32 - left
    # the diffusers order: resize, flip, crop at the mirrored corner; the same pixels
    resized = np.asarray(images[0].resize((width, 32), Image.BILINEAR), dtype=np.float32)[:, ::-1]
    crop = resized[top : top + 32, width - 32 - left : width - left]
    expected = torch.from_numpy(crop.copy()).permute(2, 0, 1) / 127.5 - 1.0
    torch.testing.assert_close(flipped.pixels[0], expected)


def test_global_batch_is_refused_without_rpo():
    from mmpref.training import ConfigError, load_config

    with pytest.raises(ConfigError, match="rpo.global_batch: only for loss.type=rpo"):
        load_config(None, ["model=m", "dataset=d.jsonl", "rpo.global_batch=true"])
    assert load_config(None, ["loss.type=rpo", "rpo.global_batch=true"]).rpo.global_batch
