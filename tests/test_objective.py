"""Objective: the configured loss, its needs, what it refuses, its range checks and its evaluation view."""

import math

import pytest
import torch
from torch import Tensor

from mmpref.losses import LOSS_TYPES, RPO_MODES, LogRatios, Objective, dpo_loss, rpo_loss
from mmpref.losses.objective import ODPO_MIN_SCORE_GAP, _halves


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def random_rows(
    b: int, *, paired: bool = True, per_sample_embeddings: bool = False, seed: int = 0
) -> LogRatios:
    """Every field an adapter may fill; scores with s_w > s_l per pair, so odpo runs without RPO too."""
    g = torch.Generator().manual_seed(seed)
    k = 2 if paired else 1
    scores = torch.rand(b, 2, generator=g) * 3
    scores[:, 0] += 0.5 + scores[:, 1]
    scores[0, 0] = scores[0, 1] + 5e-4  # below ODPO_MIN_SCORE_GAP: clamped only for RPO's cross pairs
    labels = None if paired else torch.arange(b) % 3 != 1  # both kinds, unbalanced
    emb_shape = (b, k, 6) if per_sample_embeddings else (b, 6)
    return LogRatios(
        logratios=torch.randn(b, k, generator=g),
        row_index=torch.arange(b),
        lengths=torch.randint(1, 12, (b, k), generator=g).float(),
        policy_logps=-torch.rand(b, k, generator=g) * 20,
        embeddings=torch.randn(*emb_shape, generator=g),
        labels=labels,
        scores=scores if paired else None,
    )


def objective(loss_type: str, **kw) -> Objective:
    base = kw.get("rpo_base_loss", loss_type)
    kw.setdefault("label_smoothing", 0.1 if base in ("robust", "cdpo") else 0.0)
    return Objective(type=loss_type, beta=0.7, gamma=0.3, offset_alpha=0.6, reward_temperature=2.0, **kw)


CASES = [
    *[(objective(t), True) for t in LOSS_TYPES],
    *[(objective(t, sft_weight=0.5), True) for t in ("sigmoid", "simpo")],
    *[(objective("rpo", rpo_mode=m, rpo_base_loss=t), True) for m in RPO_MODES for t in LOSS_TYPES],
    *[(objective("rpo", rpo_mode="unpaired", rpo_base_loss=t), False)
      for t in LOSS_TYPES if t not in ("odpo", "rdpo")],
    (objective("rpo", rpo_mode="diagonal", diagonal_weight=0.3, sft_weight=0.2), True),
    (objective("rpo", rpo_mode="unpaired", rpo_temperature=0.2, sft_weight=0.2), False),
]  # fmt: skip


def by_hand(rows: LogRatios, t: Tensor, side: int) -> Tensor:
    """A half written out: column ``side`` of paired rows; the rows labelled True (0) or False (1) if unpaired."""
    return t[:, side] if rows.labels is None else t[rows.labels == (side == 0), 0]


@pytest.mark.parametrize(
    ("obj", "paired"), CASES, ids=lambda v: repr(v) if isinstance(v, Objective) else str(v)
)
def test_call_equals_the_core_losses_on_random_rows(obj, paired):
    """Every loss type, paired and unpaired rows, every RPO mode and base loss, with the SFT term: calling the
    Objective is dpo_loss / rpo_loss on the halves, bit for bit (as mmpref.training.objective.preference_loss
    was; checked against it on these cases before it was removed)."""
    for per_sample in (False, True) if paired else (False,):
        rows = random_rows(7, paired=paired, per_sample_embeddings=per_sample, seed=len(repr(obj)))
        rows.metrics = {"adapter/extra": torch.tensor(1.5)}
        out = obj(rows)
        values = rows.policy_logps if obj.base == "simpo" else rows.logratios
        emb = rows.embeddings if per_sample else rows.embeddings[:, None].expand(-1, 2, -1)
        kw = {"beta": 0.7, "label_smoothing": obj.label_smoothing, "gamma": 0.3,
              "chosen_lengths": by_hand(rows, rows.lengths, 0), "rejected_lengths": by_hand(rows, rows.lengths, 1)}  # fmt: skip
        if obj.base in ("odpo", "rdpo"):
            s_w, s_l = rows.scores[:, 0], rows.scores[:, 1]
            gap = s_w[:, None] - s_l[None, :] if obj.is_rpo else s_w - s_l
            if obj.base == "odpo":
                kw["offsets"] = 0.6 * (gap.clamp_min(1e-3) if obj.is_rpo else gap).log()
            else:
                kw["label_probs"] = torch.sigmoid(gap / 2.0)
        if obj.is_rpo:
            direct = rpo_loss(by_hand(rows, values, 0), by_hand(rows, values, 1), mode=obj.rpo_mode, chosen_embeddings=by_hand(rows, emb, 0),
                              rejected_embeddings=by_hand(rows, emb, 1), temperature=obj.rpo_temperature,
                              diagonal_weight=obj.diagonal_weight, base_loss=obj.base, **kw)  # fmt: skip
        else:
            direct = dpo_loss(by_hand(rows, values, 0), by_hand(rows, values, 1), loss_type=obj.base, **kw)
        nll = -(by_hand(rows, rows.policy_logps, 0).sum() / by_hand(rows, rows.lengths, 0).sum())
        expected = direct.loss + obj.sft_weight * nll if obj.sft_weight else direct.loss
        assert torch.equal(out.loss, expected) and torch.equal(out.per_pair, direct.per_pair)
        assert out.metrics.pop("adapter/extra").item() == 1.5
        if obj.sft_weight:
            assert torch.equal(out.metrics.pop("sft/nll"), nll)
        assert out.metrics.keys() == direct.metrics.keys()
        assert all(torch.equal(out.metrics[k], v) for k, v in direct.metrics.items())


def test_from_config_reads_both_sections():
    from mmpref.training.config import LossConfig, RPOConfig

    loss = LossConfig(type="rpo", beta=0.3, label_smoothing=0.2, gamma=0.1, offset_alpha=2.0,
                      reward_temperature=3.0, sft_weight=0.4)  # fmt: skip
    rpo = RPOConfig(
        mode="unpaired", temperature=0.2, diagonal_weight=0.5, base_loss="cdpo", global_batch=True
    )
    assert Objective.from_config(loss, rpo) == Objective(
        type="rpo", beta=0.3, label_smoothing=0.2, gamma=0.1, offset_alpha=2.0, reward_temperature=3.0,
        sft_weight=0.4, rpo_mode="unpaired", rpo_temperature=0.2, diagonal_weight=0.5, rpo_base_loss="cdpo",
        global_batch=True,
    )  # fmt: skip
    assert (
        Objective.from_config(LossConfig()) == Objective() == Objective.from_config(LossConfig(), RPOConfig())
    )


def test_unpaired_rows_contrast_the_desirable_with_the_undesirable():
    rows = LogRatios(logratios=torch.tensor([[0.3], [0.2], [-0.1], [0.0], [-0.5]]), row_index=torch.arange(5),
                     labels=torch.tensor([True, False, True, False, False]), embeddings=torch.randn(5, 3))  # fmt: skip
    out = objective("rpo", rpo_mode="unpaired")(rows)
    direct = rpo_loss(torch.tensor([0.3, -0.1]), torch.tensor([0.2, 0.0, -0.5]), beta=0.7, mode="unpaired",
                      chosen_embeddings=rows.embeddings[[0, 2]], rejected_embeddings=rows.embeddings[[1, 3, 4]])  # fmt: skip
    assert torch.equal(out.loss, direct.loss)
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(4 / 6)  # 0.3 beats all three, -0.1 one


def test_unpaired_mode_on_paired_rows_is_the_paired_loss():
    """What accepts("paired") promises for rpo.mode=unpaired: the same loss, margins over all B × B pairs."""
    rows = random_rows(4)
    paired, pooled = objective("rpo")(rows), objective("rpo", rpo_mode="unpaired")(rows)
    assert torch.equal(paired.loss, pooled.loss)
    w, l = rows.logratios.unbind(1)
    expected = (w[:, None] > l[None, :]).float().mean()
    assert pooled.metrics["rewards/accuracies"].item() == pytest.approx(expected.item())


def test_odpo_and_rdpo_read_the_scores_by_hand():
    rows = LogRatios(logratios=torch.tensor([[0.5, -0.5]]), row_index=torch.arange(1),
                     scores=torch.tensor([[3.0, 1.0]]))  # fmt: skip
    odpo = Objective(type="odpo", beta=1.0, offset_alpha=0.5)(rows)
    assert odpo.loss.item() == pytest.approx(-logsig(1.0 - 0.5 * math.log(2.0)), rel=1e-6)
    rdpo = Objective(type="rdpo", beta=1.0, reward_temperature=4.0)(rows)
    p = 1 / (1 + math.exp(-2.0 / 4.0))
    assert rdpo.loss.item() == pytest.approx(-p * logsig(1.0) - (1 - p) * logsig(-1.0), rel=1e-6)


def test_rpo_odpo_clamps_the_cross_pairs_whose_chosen_score_is_lower():
    rows = LogRatios(logratios=torch.tensor([[0.4, 0.1], [0.2, 0.3]]), row_index=torch.arange(2),
                     scores=torch.tensor([[2.0, 1.5], [1.0, 0.5]]))  # fmt: skip
    out = Objective(type="rpo", beta=1.0, offset_alpha=1.0, rpo_mode="diagonal", diagonal_weight=0.5,
                    rpo_base_loss="odpo")(rows)  # fmt: skip
    w, l, sw, sl = [0.4, 0.2], [0.1, 0.3], [2.0, 1.0], [1.5, 0.5]

    def f(i, j):
        return -logsig((w[i] - l[j]) - math.log(max(sw[i] - sl[j], ODPO_MIN_SCORE_GAP)))

    expected = [0.5 * f(i, i) + 0.5 * f(i, 1 - i) for i in range(2)]  # row 1 vs rejected 0: 1.0 − 1.5 < 0
    assert out.per_pair.tolist() == pytest.approx(expected, rel=1e-5)


def test_simpo_reads_the_policy_log_probs_and_averages_them():
    rows = LogRatios(logratios=torch.full((2, 2), 99.0), row_index=torch.arange(2),  # never read
                     policy_logps=torch.tensor([[-6.0, -3.0], [-2.0, -9.0]]),
                     lengths=torch.tensor([[6.0, 1.0], [1.0, 3.0]]))  # fmt: skip
    obj = Objective(type="simpo", beta=2.0, gamma=0.5)
    expected = [-logsig(2 * (a - b) - 0.5) for a, b in ((-1, -3), (-2, -3))]
    assert obj(rows).per_pair.tolist() == pytest.approx(expected)
    assert obj.compared(rows).tolist() == [[-1.0, -3.0], [-2.0, -3.0]]
    assert Objective(type="ipo").compared(rows) is rows.logratios  # IPO's rewards stay on ℓ
    bare = LogRatios(logratios=torch.zeros(2, 2), row_index=torch.arange(2))
    for use in (obj, obj.compared):
        with pytest.raises(ValueError, match="loss.type: simpo needs the policy's log-probs"):
            use(bare)


def test_sft_term_is_token_weighted_as_trl():
    rows = LogRatios(logratios=torch.zeros(2, 2), row_index=torch.arange(2),
                     lengths=torch.tensor([[1.0, 1.0], [3.0, 1.0]]),
                     policy_logps=torch.tensor([[-1.0, -5.0], [-9.0, -5.0]]))  # fmt: skip
    out = Objective(sft_weight=2.0)(rows)
    assert out.metrics["sft/nll"].item() == pytest.approx(2.5)  # (1 + 9) / (1 + 3) chosen tokens
    assert out.loss.item() == pytest.approx(math.log(2) + 2 * 2.5)
    with pytest.raises(ValueError, match="loss.sft_weight: 2.0 needs the policy's log-probs"):
        Objective(sft_weight=2.0)(LogRatios(logratios=torch.zeros(2, 2), row_index=torch.arange(2)))


def test_halves_name_the_chosen_and_the_rejected():
    paired = LogRatios(logratios=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), row_index=torch.arange(2),
                       lengths=torch.tensor([[5.0, 6.0], [7.0, 8.0]]), scores=torch.tensor([[0.9, 0.1], [0.8, 0.2]]))  # fmt: skip
    chosen, rejected = _halves(paired)
    assert chosen.logratios.tolist() == [1.0, 3.0] and rejected.lengths.tolist() == [6.0, 8.0]
    assert rejected.scores.tolist() == pytest.approx([0.1, 0.2]) and chosen.policy_logps is None
    unpaired = LogRatios(logratios=torch.tensor([[1.0], [2.0], [3.0]]), row_index=torch.arange(3),
                         labels=torch.tensor([True, False, True]), embeddings=torch.eye(3))  # fmt: skip
    good, bad = _halves(unpaired)
    assert good.logratios.tolist() == [1.0, 3.0] and bad.logratios.tolist() == [2.0]
    assert bad.embeddings.tolist() == [[0.0, 1.0, 0.0]] and good.scores is None
    with pytest.raises(ValueError, match="labels"):
        _halves(LogRatios(logratios=torch.zeros(3, 1), row_index=torch.arange(3)))


# --- what it needs ---------------------------------------------------------------------------------------

FLAGS = ("reference_free", "length_normalised", "needs_scores", "chosen_scores_higher", "needs_embeddings",
         "needs_policy_logps")  # fmt: skip
NEEDS = {  # loss.type → the flags above, in order
    "sigmoid": (0, 0, 0, 0, 0, 0), "robust": (0, 0, 0, 0, 0, 0), "cdpo": (0, 0, 0, 0, 0, 0),
    "ipo": (0, 1, 0, 0, 0, 0), "hinge": (0, 0, 0, 0, 0, 0), "odpo": (0, 0, 1, 1, 0, 0),
    "simpo": (1, 1, 0, 0, 0, 1), "rdpo": (0, 0, 1, 0, 0, 0),
}  # fmt: skip


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_needs_of_each_loss(loss_type):
    obj = Objective(type=loss_type)
    assert tuple(int(getattr(obj, flag)) for flag in FLAGS) == NEEDS[loss_type]
    assert (obj.base, obj.type_key, obj.is_rpo) == (loss_type, "loss.type", False)
    assert Objective(type=loss_type, sft_weight=0.1).needs_policy_logps
    assert obj.loss_scale(4) == Objective(type=loss_type, global_batch=True).loss_scale(4) == 1


@pytest.mark.parametrize("mode", RPO_MODES)
@pytest.mark.parametrize("base", LOSS_TYPES)
def test_needs_under_rpo(base, mode):
    obj = Objective(type="rpo", rpo_base_loss=base, rpo_mode=mode)
    expected = dict(zip(FLAGS, NEEDS[base]))
    expected["chosen_scores_higher"] = 0  # cross pairs are clamped instead
    expected["needs_embeddings"] = int(mode != "diagonal")
    assert {flag: int(getattr(obj, flag)) for flag in FLAGS} == expected
    assert (obj.base, obj.type_key, obj.is_rpo) == (base, "rpo.base_loss", True)
    assert (
        obj.loss_scale(4) == 1 and Objective(type="rpo", rpo_mode=mode, global_batch=True).loss_scale(4) == 4
    )


# --- what it refuses -------------------------------------------------------------------------------------


def test_supports_names_the_key():
    assert all(Objective(type=t).supports("text") is None for t in (*LOSS_TYPES, "rpo"))
    assert Objective(type="simpo", sft_weight=1.0).supports("text") is None
    assert Objective(type="sigmoid").supports("diffusion") is None
    msg = Objective(type="simpo").supports("diffusion")
    assert msg.startswith("loss.type: simpo needs the policy's own log-probs") and "simpo," not in msg
    assert (
        Objective(type="rpo", rpo_base_loss="simpo").supports("diffusion").startswith("rpo.base_loss: simpo")
    )
    assert Objective(sft_weight=0.1).supports("diffusion").startswith("loss.sft_weight: the SFT term")
    with pytest.raises(ValueError, match="modality"):
        Objective().supports("audio")


def test_accepts_names_the_key():
    assert all(Objective(type=t).accepts("paired") is None for t in LOSS_TYPES)
    assert all(Objective(type="rpo", rpo_mode=m).accepts("paired") is None for m in RPO_MODES)
    assert Objective(type="rpo", rpo_mode="unpaired").accepts("unpaired") is None
    assert Objective().accepts("unpaired") == (
        "loss.type: sigmoid needs paired rows (prompt, chosen, rejected); "
        "unpaired rows train with loss.type=rpo and rpo.mode=unpaired"
    )
    for mode in ("paired", "diagonal"):
        msg = Objective(type="rpo", rpo_mode=mode).accepts("unpaired")
        assert msg.startswith(f"rpo.mode: {mode} needs paired rows (prompt, chosen, rejected); unpaired rows")
    scored = Objective(type="rpo", rpo_mode="unpaired", rpo_base_loss="odpo").accepts("unpaired")
    assert scored.startswith("rpo.base_loss: odpo needs paired rows with scores")
    with pytest.raises(ValueError, match="data_format"):
        Objective().accepts("triples")


def test_call_refuses_what_accepts_refuses():
    unpaired = random_rows(6, paired=False)
    with pytest.raises(ValueError, match="loss.type: ipo needs paired rows"):
        Objective(type="ipo")(unpaired)
    with pytest.raises(ValueError, match="rpo.mode: diagonal needs paired rows"):
        Objective(type="rpo", rpo_mode="diagonal")(unpaired)
    with pytest.raises(ValueError, match="logratios: expected"):
        Objective()(LogRatios(logratios=torch.zeros(3, 3), row_index=torch.arange(3)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "loss.beta: must be > 0, got 0.0"),
        ({"beta": -1.0}, "loss.beta: must be > 0, got -1.0"),
        ({"beta": math.inf}, "loss.beta: must be finite, got inf"),
        ({"beta": math.nan}, "loss.beta: must be > 0, got nan"),
        ({"beta": "0.1"}, "loss.beta: must be a number, got '0.1'"),
        ({"rpo_temperature": 0.0}, "rpo.temperature: must be > 0, got 0.0"),
        ({"reward_temperature": -2.0}, "loss.reward_temperature: must be > 0, got -2.0"),
        ({"gamma": -0.1}, "loss.gamma: must be >= 0, got -0.1"),
        ({"sft_weight": -1.0}, "loss.sft_weight: must be >= 0, got -1.0"),
        ({"offset_alpha": math.nan}, "loss.offset_alpha: must be finite, got nan"),
        ({"type": "robust", "label_smoothing": 0.5}, "loss.label_smoothing: must be in [0, 0.5), got 0.5"),
        ({"type": "cdpo", "label_smoothing": -0.1}, "loss.label_smoothing: must be in [0, 0.5), got -0.1"),
        ({"label_smoothing": 0.1}, "loss.label_smoothing: only used when loss.type is one of robust, cdpo, not sigmoid"),
        ({"type": "rpo", "label_smoothing": 0.1}, "loss.label_smoothing: only used when rpo.base_loss is one of"),
        ({"diagonal_weight": 1.5}, "rpo.diagonal_weight: must be in [0, 1], got 1.5"),
        ({"diagonal_weight": -0.1}, "rpo.diagonal_weight: must be in [0, 1], got -0.1"),
        ({"type": "dpo"}, "loss.type: must be one of sigmoid, robust"),
        ({"rpo_mode": "weird"}, "rpo.mode: must be one of paired, unpaired, diagonal, got 'weird'"),
        ({"rpo_base_loss": "rpo"}, "rpo.base_loss: must be one of sigmoid"),
        ({"global_batch": True}, "rpo.global_batch: only for loss.type=rpo"),
    ],
)  # fmt: skip
def test_problems_name_the_key(kwargs, message):
    found = Objective(**kwargs).problems()
    assert len(found) == 1 and found[0].startswith(message), found


def test_good_parameters_have_no_problems():
    from mmpref.training.config import LossConfig, RPOConfig

    assert Objective().problems() == [] and Objective.from_config(LossConfig(), RPOConfig()).problems() == []
    assert Objective.from_config(LossConfig()) == Objective()
    for t in ("robust", "cdpo"):
        assert Objective(type=t, label_smoothing=0.49).problems() == []
        assert Objective(type="rpo", rpo_base_loss=t, label_smoothing=0.2, global_batch=True).problems() == []
    assert Objective(diagonal_weight=1, beta=5000, gamma=0, offset_alpha=-1.0).problems() == []
    assert len(Objective(beta=0.0, rpo_temperature=0.0).problems()) == 2  # every problem, not the first


# --- evaluation ------------------------------------------------------------------------------------------


def test_eval_metrics_per_pair():
    compared = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]])
    m = Objective(beta=2.0).eval_metrics(compared, None)
    assert list(m) == ["eval/rewards/accuracies", "eval/rewards/margins", "eval/rewards/chosen",
                       "eval/rewards/rejected"]  # fmt: skip
    assert m["eval/rewards/accuracies"] == pytest.approx((1 + 0.5 + 0) / 3)  # the tie counts 0.5
    assert m["eval/rewards/margins"] == pytest.approx((2 + 0 - 4) / 3)
    assert m["eval/rewards/chosen"] == pytest.approx(0.0)
    assert m["eval/rewards/rejected"] == pytest.approx(2 / 3)


def test_eval_metrics_unpaired_over_every_good_bad_pair():
    compared = torch.tensor([[0.3], [0.2], [-0.1], [0.0], [-0.5]])
    labels = torch.tensor([True, False, True, False, False])
    m = Objective(beta=2.0).eval_metrics(compared, labels)
    assert m["eval/rewards/accuracies"] == pytest.approx(4 / 6)
    margins = [2 * (w - l) for w in (0.3, -0.1) for l in (0.2, 0.0, -0.5)]
    assert m["eval/rewards/margins"] == pytest.approx(sum(margins) / 6)
    assert m["eval/rewards/chosen"] == pytest.approx(0.2)
    assert m["eval/rewards/rejected"] == pytest.approx(-0.2)
    only_good = Objective(beta=2.0).eval_metrics(compared[[0, 2]], labels[[0, 2]])
    assert only_good["eval/rewards/chosen"] == pytest.approx(0.2)
    assert all(math.isnan(only_good[f"eval/rewards/{k}"]) for k in ("rejected", "margins", "accuracies"))
