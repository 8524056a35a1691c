"""Each loss against the docs/design.md §5 formula computed by hand (plain floats), plus gradients."""

import math

import pytest
import torch

from mmpref.losses import Objective, contrast_weights, dpo_loss, rpo_loss

W = [0.3, -1.2, 0.0, 2.5]  # chosen log-ratios
L = [-0.4, 0.8, 0.0, 1.0]  # rejected log-ratios
LEN_W = [3.0, 5.0, 2.0, 4.0]
LEN_L = [2.0, 4.0, 6.0, 1.0]
BETA = 0.7
EPS = 0.1


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def hand(loss_type: str, w: float, l: float, lw: float, ll: float, offset: float, p: float) -> float:
    z = BETA * (w - l)
    if loss_type == "sigmoid":
        return -logsig(z)
    if loss_type == "robust":
        return (-(1 - EPS) * logsig(z) + EPS * logsig(-z)) / (1 - 2 * EPS)
    if loss_type == "cdpo":
        return -(1 - EPS) * logsig(z) - EPS * logsig(-z)
    if loss_type == "ipo":
        return (w / lw - l / ll - 1 / (2 * BETA)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - z)
    if loss_type == "odpo":
        return -logsig(z - offset)
    if loss_type == "simpo":
        return -logsig(BETA * (w / lw - l / ll) - 0.3)
    if loss_type == "rdpo":
        return -p * logsig(z) - (1 - p) * logsig(-z)
    raise AssertionError(loss_type)


OFFSETS = [0.2, 0.0, 1.5, -0.3]
PROBS = [0.9, 0.5, 0.1, 1.0]


def kwargs_for(loss_type: str, dtype=torch.float32) -> dict:
    kw = {"beta": BETA, "loss_type": loss_type}
    if loss_type in ("robust", "cdpo"):
        kw["label_smoothing"] = EPS
    if loss_type in ("ipo", "simpo"):
        kw["chosen_lengths"] = torch.tensor(LEN_W, dtype=dtype)
        kw["rejected_lengths"] = torch.tensor(LEN_L, dtype=dtype)
    if loss_type == "simpo":
        kw["gamma"] = 0.3
    if loss_type == "odpo":
        kw["offsets"] = torch.tensor(OFFSETS, dtype=dtype)
    if loss_type == "rdpo":
        kw["label_probs"] = torch.tensor(PROBS, dtype=dtype)
    return kw


ALL = ["sigmoid", "robust", "cdpo", "ipo", "hinge", "odpo", "simpo", "rdpo"]


@pytest.mark.parametrize("loss_type", ALL)
def test_dpo_loss_matches_hand_computation(loss_type):
    out = dpo_loss(torch.tensor(W), torch.tensor(L), **kwargs_for(loss_type))
    expected = [hand(loss_type, *args) for args in zip(W, L, LEN_W, LEN_L, OFFSETS, PROBS)]
    torch.testing.assert_close(out.per_pair, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, torch.tensor(sum(expected) / 4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ALL)
def test_dpo_loss_gradient(loss_type):
    w = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    l = torch.tensor(L, dtype=torch.float64, requires_grad=True)
    kw = kwargs_for(loss_type, torch.float64)
    # hinge has a kink at z = 1; shift away from it for a finite-difference check
    if loss_type == "hinge":
        w = (torch.tensor(W, dtype=torch.float64) + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, **kw).loss, (w, l))
    # analytic gradient for sigmoid: d/dw −log σ(β(w−l)) = −β·σ(−z)/n
    if loss_type == "sigmoid":
        dpo_loss(w, l, **kw).loss.backward()
        z = BETA * (torch.tensor(W, dtype=torch.float64) - torch.tensor(L, dtype=torch.float64))
        torch.testing.assert_close(w.grad, -BETA * torch.sigmoid(-z) / 4)


def test_diffusion_dpo_equals_published_formula():
    # ℓ = −½(m − r) per image; DPO on ℓ with β equals −log σ(−½β((m_w − m_l) − (r_w − r_l)))
    m_w, m_l = torch.tensor([0.11, 0.30]), torch.tensor([0.12, 0.25])
    r_w, r_l = torch.tensor([0.10, 0.31]), torch.tensor([0.14, 0.24])
    beta = 5000.0
    out = dpo_loss(-0.5 * (m_w - r_w), -0.5 * (m_l - r_l), beta=beta)
    inside = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))
    torch.testing.assert_close(out.loss, -torch.nn.functional.logsigmoid(inside).mean())


def test_metrics_on_known_batch():
    out = dpo_loss(torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0]), beta=2.0)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["rewards/chosen"] == pytest.approx(0.0)
    assert m["rewards/rejected"] == pytest.approx(2 / 3)
    assert m["rewards/margins"] == pytest.approx((2 + 0 - 4) / 3)
    assert m["rewards/accuracies"] == pytest.approx((1 + 0.5 + 0) / 3)  # the tie counts 0.5
    assert all(not v.requires_grad for v in out.metrics.values())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beta": 0.1, "loss_type": "odpo"}, "offsets"),
        ({"beta": 0.1, "loss_type": "rdpo"}, "label_probs"),
        ({"beta": 0.1, "loss_type": "rdpo", "label_probs": torch.tensor([1.5, 0.5])}, "label_probs"),
        ({"beta": 0.1, "loss_type": "nope"}, "loss_type"),
        ({"beta": 0.1, "loss_type": "ipo", "chosen_lengths": torch.tensor([0.0, 1.0])}, "chosen_lengths"),
    ],
)
def test_dpo_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        dpo_loss(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.3]), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "loss.beta: must be > 0"),
        ({"beta": -1.0}, "loss.beta: must be > 0"),
        ({"type": "robust", "label_smoothing": 0.5}, "loss.label_smoothing: must be in [0, 0.5)"),
        ({"type": "cdpo", "label_smoothing": -0.1}, "loss.label_smoothing: must be in [0, 0.5)"),
        ({"label_smoothing": 0.1}, "loss.label_smoothing: only used when loss.type is one of robust, cdpo"),
    ],
)
def test_dpo_bad_scalars_are_the_objectives_problems(kwargs, message):
    """The core checks tensors only; the ranges of the scalars are Objective.problems()'s, named by key."""
    assert [p for p in Objective(**kwargs).problems() if p.startswith(message)]


def test_dpo_bad_tensors_name_the_argument():
    with pytest.raises(ValueError, match="rejected_logratios"):
        dpo_loss(torch.zeros(3), torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError, match="chosen_logratios"):
        dpo_loss(torch.zeros(2, 2), torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError, match="chosen_logratios.*NaN"):
        dpo_loss(torch.tensor([float("nan"), 0.0]), torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError, match="rejected_logratios.*NaN or inf"):
        dpo_loss(torch.zeros(2), torch.tensor([float("inf"), 0.0]), beta=0.1)


# --- RPO --------------------------------------------------------------------------------

RW = torch.tensor([0.5, -0.2, 1.0])
RL = torch.tensor([0.1, 0.4, -0.6])
EMB = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 2.0]])


def test_rpo_paired_identical_embeddings_is_uniform_weighting():
    emb = torch.ones(3, 4)
    beta = 0.5
    out = rpo_loss(RW, RL, beta=beta, chosen_embeddings=emb)
    expected = sum(-logsig(beta * (RW[i] - RL[j]).item() / 3) for i in range(3) for j in range(3)) / 9
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_rpo_paired_tiny_temperature_gives_identity_weights():
    beta = 0.5
    out = rpo_loss(RW, RL, beta=beta, chosen_embeddings=EMB, temperature=1e-4)
    dpo = dpo_loss(RW, RL, beta=beta).loss.item()
    assert out.loss.item() == pytest.approx((dpo + 2 * math.log(2)) / 3, rel=1e-5)
    assert out.metrics["rpo/diagonal_weight"].item() == pytest.approx(1.0)


def test_rpo_paired_matches_hand_computation():
    beta, tau = 0.3, 0.5
    e = EMB / EMB.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(3):
        logits = [-(1 - (e[i] @ e[j]).item()) / tau for j in range(3)]
        z = sum(math.exp(x) for x in logits)
        for j in range(3):
            total += -logsig(beta * math.exp(logits[j]) / z * (RW[i] - RL[j]).item())
    out = rpo_loss(RW, RL, beta=beta, chosen_embeddings=EMB, temperature=tau)
    assert out.loss.item() == pytest.approx(total / 9, rel=1e-5)
    weights = contrast_weights(EMB, EMB, tau)
    torch.testing.assert_close(weights.sum(1), torch.ones(3))


def test_rpo_diagonal_mode():
    beta = 0.4
    out = rpo_loss(RW, RL, beta=beta, mode="diagonal", diagonal_weight=1.0)
    torch.testing.assert_close(out.loss, dpo_loss(RW, RL, beta=beta).loss)
    out = rpo_loss(RW, RL, beta=beta, mode="diagonal")
    diag = sum(-logsig(beta * (RW[i] - RL[i]).item()) for i in range(3)) / 3
    off = sum(-logsig(beta * (RW[i] - RL[j]).item()) for i in range(3) for j in range(3) if i != j) / 6
    assert out.loss.item() == pytest.approx(0.8 * diag + 0.2 * off, rel=1e-5)


def test_rpo_unpaired_rectangular():
    beta, tau = 0.2, 0.5
    ce = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    re = torch.tensor([[1.0, 0.1], [0.2, 1.0], [1.0, 1.0]])
    w, l = torch.tensor([0.3, -0.1]), torch.tensor([0.2, 0.0, -0.5])
    out = rpo_loss(
        w, l, beta=beta, mode="unpaired", chosen_embeddings=ce, rejected_embeddings=re, temperature=tau
    )
    weights = contrast_weights(ce, re, tau)
    expected = (
        sum(-logsig(beta * weights[i, j].item() * (w[i] - l[j]).item()) for i in range(2) for j in range(3))
        / 6
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.per_pair.shape == (2,)
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(
        4 / 6
    )  # 0.3 beats all three, -0.1 beats only -0.5


@pytest.mark.parametrize(("nw", "nl"), [(0, 3), (2, 0), (0, 0)])
def test_rpo_empty_side_is_zero_with_grad_path(nw, nl):
    w = torch.randn(nw, requires_grad=True)
    l = torch.randn(nl, requires_grad=True)
    out = rpo_loss(
        w,
        l,
        beta=0.1,
        mode="unpaired",
        chosen_embeddings=torch.randn(nw, 4),
        rejected_embeddings=torch.randn(nl, 4),
    )
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert w.grad is not None and l.grad is not None


@pytest.mark.parametrize("base_loss", ["ipo", "hinge", "cdpo", "rdpo"])
def test_rpo_base_loss_reduces_to_that_loss_on_the_diagonal(base_loss):
    beta = 0.4
    kw = {}
    if base_loss == "cdpo":
        kw["label_smoothing"] = 0.1
    if base_loss == "rdpo":
        kw["label_probs"] = torch.full((3, 3), 0.8)
    out = rpo_loss(RW, RL, beta=beta, mode="diagonal", diagonal_weight=1.0, base_loss=base_loss, **kw)
    if base_loss == "rdpo":
        kw["label_probs"] = torch.full((3,), 0.8)
    torch.testing.assert_close(out.loss, dpo_loss(RW, RL, beta=beta, loss_type=base_loss, **kw).loss)


def test_rpo_gradient():
    w = RW.double().requires_grad_()
    l = RL.double().requires_grad_()
    emb = EMB.double()
    assert torch.autograd.gradcheck(lambda a, b: rpo_loss(a, b, beta=0.5, chosen_embeddings=emb).loss, (w, l))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "weird"}, "mode"),
        ({"chosen_embeddings": None}, "chosen_embeddings"),
        ({"chosen_embeddings": torch.zeros(2, 3)}, "chosen_embeddings"),
        ({"base_loss": "odpo"}, "offsets"),
        ({"base_loss": "rdpo", "label_probs": torch.full((3, 2), 0.5)}, "label_probs"),
        ({"chosen_lengths": torch.tensor([1.0, -1.0, 2.0])}, "chosen_lengths"),
    ],
)
def test_rpo_bad_arguments_name_the_argument(kwargs, name):
    args = {"beta": 0.1, "chosen_embeddings": EMB, **kwargs}
    with pytest.raises(ValueError, match=name):
        rpo_loss(RW, RL, **args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rpo_temperature": 0.0}, "rpo.temperature: must be > 0"),
        ({"beta": -0.1}, "loss.beta: must be > 0"),
        ({"diagonal_weight": 1.5, "rpo_mode": "diagonal"}, "rpo.diagonal_weight: must be in [0, 1]"),
        ({"rpo_mode": "weird"}, "rpo.mode: must be one of paired, unpaired, diagonal"),
    ],
)
def test_rpo_bad_scalars_are_the_objectives_problems(kwargs, message):
    assert [p for p in Objective(type="rpo", **kwargs).problems() if p.startswith(message)]


def test_rpo_paired_needs_equal_sides():
    with pytest.raises(ValueError, match="rejected_logratios"):
        rpo_loss(RW, RL[:2], beta=0.1, chosen_embeddings=EMB)
