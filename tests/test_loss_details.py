"""Loss details where mmpref follows the reference implementations: SimPO's metrics, ties, the SFT term."""

import math

import pytest
import torch

from mmpref.losses import dpo_loss, rpo_loss
from mmpref.training.config import LossConfig, RPOConfig
from mmpref.training.objective import Rows, preference_loss


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
    rows = Rows(logratios=torch.zeros(2, 2), row_index=torch.arange(2),
                lengths=torch.tensor([[1.0, 1.0], [3.0, 1.0]]),
                policy_logps=torch.tensor([[-1.0, -5.0], [-9.0, -5.0]]))  # fmt: skip
    out = preference_loss(LossConfig(sft_weight=1.0), RPOConfig(), rows)
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
    from mmpref.training.loop import epoch_order

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
    from mmpref.testing import make_tiny_sd15

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
