import math

import pytest
import torch

from ardetect.train.losses import SetCriterion, adapter_regulariser, orthogonality
from ardetect.train.matcher import HungarianMatcher, Target


def rand_targets(gen, B, T, sizes):
    out = []
    for n in sizes:
        cxcy = torch.rand(n, 2, generator=gen) * 0.5 + 0.25
        wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.1
        tm = torch.zeros(n, T)
        for i in range(n):
            tm[i, 1 + i % (T - 2) : 3 + i % (T - 2)] = 1
        out.append(Target(torch.cat([cxcy, wh], -1), tm))
    return out


def test_batched_matching_equals_single():
    gen = torch.Generator().manual_seed(0)
    B, Q, T = 4, 12, 8
    logits = torch.randn(B, Q, T, generator=gen)
    boxes = torch.rand(B, Q, 4, generator=gen) * 0.5 + 0.2
    targets = rand_targets(gen, B, T, [1, 3, 0, 2])
    m = HungarianMatcher()
    batched = m(logits, boxes, targets)
    for b in range(B):
        (qi, ti), = m(logits[b : b + 1], boxes[b : b + 1], targets[b : b + 1])
        assert torch.equal(qi, batched[b][0]) and torch.equal(ti, batched[b][1])
    assert [len(q) for q, _ in batched] == [1, 3, 0, 2]


def test_empty_targets():
    m = HungarianMatcher()
    t = [Target(torch.zeros(0, 4), torch.zeros(0, 5))] * 2
    out = m(torch.randn(2, 6, 5), torch.rand(2, 6, 4), t)
    assert all(len(q) == 0 and len(ti) == 0 for q, ti in out)


def test_matcher_picks_the_query_on_the_target():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.6, 0.5, 0.3, 0.4], [0.8, 0.8, 0.1, 0.1]]])
    logits = torch.zeros(1, 3, 4)
    tgt = Target(torch.tensor([[0.6, 0.5, 0.3, 0.4]]), torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    (qi, ti), = HungarianMatcher()(logits, boxes, [tgt])
    assert qi.tolist() == [1] and ti.tolist() == [0]


def test_losses_hand_computed():
    # one image, one query, two tokens; the query is matched to the target
    p = torch.tensor([[[2.0, -1.0]]])  # logits [1, 1, 2]
    box = torch.tensor([[[0.5, 0.5, 0.4, 0.4]]])
    tgt = Target(torch.tensor([[0.5, 0.5, 0.2, 0.4]]), torch.tensor([[1.0, 0.0]]))
    crit = SetCriterion(HungarianMatcher(), weight_class=2.0, weight_bbox=5.0, weight_giou=2.0)
    out = crit({"pred_logits": p, "pred_boxes": box}, [tgt], token_mask=torch.tensor([[True, True]]))
    a, g = 0.25, 2.0

    def focal(x, y):
        s = 1 / (1 + math.exp(-x))
        ce = -(y * math.log(s) + (1 - y) * math.log(1 - s))
        pt = s * y + (1 - s) * (1 - y)
        return (a * y + (1 - a) * (1 - y)) * ce * (1 - pt) ** g

    want_cls = focal(2.0, 1.0) + focal(-1.0, 0.0)
    assert out["loss_class"].item() == pytest.approx(want_cls, rel=1e-5)
    assert out["loss_bbox"].item() == pytest.approx(0.2, rel=1e-5)  # |0.4-0.2| on w
    # boxes [0.3,0.3,0.7,0.7] vs [0.4,0.3,0.6,0.7]: IoU = 0.08/0.16 = 0.5, enclosing = union -> GIoU 0.5
    assert out["loss_giou"].item() == pytest.approx(0.5, rel=1e-5)
    assert out["loss"].item() == pytest.approx(2 * want_cls + 5 * 0.2 + 2 * 0.5, rel=1e-5)


def test_padding_tokens_do_not_count_and_negatives_have_no_box_terms():
    p = torch.tensor([[[2.0, 5.0]]], requires_grad=True)
    box = torch.rand(1, 1, 4, requires_grad=True)
    neg = Target(torch.zeros(0, 4), torch.zeros(0, 2))
    crit = SetCriterion(HungarianMatcher())
    out = crit({"pred_logits": p, "pred_boxes": box}, [neg], token_mask=torch.tensor([[True, False]]))
    s = torch.sigmoid(torch.tensor(2.0)).item()
    want = 0.75 * -math.log(1 - s) * s**2  # only token 0, target 0
    assert out["loss_class"].item() == pytest.approx(want, rel=1e-5)
    assert out["loss_bbox"].item() == 0 and out["loss_giou"].item() == 0
    out["loss"].backward()
    assert p.grad[0, 0, 1] == 0 and p.grad[0, 0, 0] > 0


def test_aux_and_encoder_terms_present():
    gen = torch.Generator().manual_seed(1)
    outs = {"pred_logits": torch.randn(2, 5, 6, generator=gen), "pred_boxes": torch.rand(2, 5, 4, generator=gen) * 0.5 + 0.25}
    outs["aux_outputs"] = [{"pred_logits": torch.randn(2, 5, 6), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.25}]
    outs["enc_outputs"] = {"pred_logits": torch.randn(2, 5, 6), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.25}
    targets = rand_targets(gen, 2, 6, [1, 1])
    out = SetCriterion(HungarianMatcher())(outs, targets, torch.ones(2, 6, dtype=torch.bool))
    assert {"loss_class_0", "loss_bbox_0", "loss_giou_enc"} <= set(out)
    parts = sum(SetCriterion(HungarianMatcher()).weights[k.rsplit("_", 1)[0] if k.count("_") > 1 else k] * v for k, v in out.items() if k != "loss")
    assert out["loss"].item() == pytest.approx(parts.item(), rel=1e-6)


def test_orthogonality_regulariser():
    assert orthogonality(torch.eye(4)).item() == pytest.approx(0.0)
    w = 2 * torch.eye(3)  # W W^T - I = 3 I -> Frobenius sqrt(27)
    assert orthogonality(w).item() == pytest.approx(math.sqrt(27))
    assert adapter_regulariser(torch.eye(3), w).item() == pytest.approx(0.5 * math.sqrt(27))


def test_region_contrast_hand_computed():
    from ardetect.train.losses import region_contrast

    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # cosines q . t^T: [[1, 0.6], [0, 0.8]]
    t = torch.tensor([[3.0, 0.0], [0.6, 0.8]])
    same = torch.eye(2, dtype=torch.bool)
    tau = 0.5
    row = lambda pos, other: -math.log(math.exp(pos / tau) / (math.exp(pos / tau) + math.exp(other / tau)))  # noqa: E731
    q_to_t = 0.5 * (row(1.0, 0.6) + row(0.8, 0.0))  # rows of q . t^T
    t_to_q = 0.5 * (row(1.0, 0.0) + row(0.8, 0.6))  # rows of t . q^T
    assert region_contrast(q, t, same, tau).item() == pytest.approx(0.5 * (q_to_t + t_to_q), rel=1e-5)
    # a pair of the same concept is no negative: with both off-diagonals masked, nothing is left to contrast
    assert region_contrast(q, t, torch.ones(2, 2, dtype=torch.bool), tau).item() == pytest.approx(0.0, abs=1e-6)
    # one positive alone has no negatives: zero, but still attached to the graph
    one = torch.ones(1, 2, requires_grad=True)
    loss = region_contrast(one, one, torch.ones(1, 1, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and one.grad is not None


def test_criterion_adds_the_weighted_region_contrast():
    from ardetect.train.losses import region_contrast

    gen = torch.Generator().manual_seed(2)
    outs = {"pred_logits": torch.randn(2, 5, 6, generator=gen), "pred_boxes": torch.rand(2, 5, 4, generator=gen) * 0.5 + 0.25}
    pairs = (torch.randn(2, 8, generator=gen), torch.randn(2, 8, generator=gen), torch.eye(2, dtype=torch.bool), torch.randn(3, 8, generator=gen))
    targets = rand_targets(gen, 2, 6, [1, 1])
    mask = torch.ones(2, 6, dtype=torch.bool)
    plain = SetCriterion(HungarianMatcher())
    assert not plain.uses_align and "loss_align" not in plain({**outs, "align": pairs}, targets, mask)
    crit = SetCriterion(HungarianMatcher(), weight_align=0.7, align_temperature=0.2)
    out = crit({**outs, "align": pairs}, targets, mask)
    want = region_contrast(*pairs[:3], temperature=0.2, extra_negatives=pairs[3])
    assert out["loss_align"].item() == pytest.approx(want.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(plain(outs, targets, mask)["loss"].item() + 0.7 * want.item(), rel=1e-5)


def test_region_contrast_other_regions_are_negatives_of_every_query():
    from ardetect.train.losses import region_contrast

    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # as above: cosines q . t^T [[1, 0.6], [0, 0.8]]
    t = torch.tensor([[3.0, 0.0], [0.6, 0.8]])
    same = torch.eye(2, dtype=torch.bool)
    tau = 0.5
    others = torch.tensor([[0.0, 3.0]])  # unit [0, 1]: cosines with q 0 and 1
    e = lambda x: math.exp(x / tau)  # noqa: E731
    q_to_t = 0.5 * (-math.log(e(1.0) / (e(1.0) + e(0.6) + e(0.0))) - math.log(e(0.8) / (e(0.8) + e(0.0) + e(1.0))))
    t_to_q = 0.5 * (-math.log(e(1.0) / (e(1.0) + e(0.0))) - math.log(e(0.8) / (e(0.8) + e(0.6))))  # others only on the query side
    got = region_contrast(q, t, same, tau, extra_negatives=others)
    assert got.item() == pytest.approx(0.5 * (q_to_t + t_to_q), rel=1e-5)
    # one positive alone has negatives now; an empty set of others changes nothing
    assert region_contrast(q[:1], t[:1], same[:1, :1], tau, others).item() > 0
    assert region_contrast(q, t, same, tau, others[:0]).item() == pytest.approx(region_contrast(q, t, same, tau).item())
    # the criterion passes the fourth element of "align" on as the other regions
    gen = torch.Generator().manual_seed(3)
    outs = {"pred_logits": torch.randn(2, 5, 6, generator=gen), "pred_boxes": torch.rand(2, 5, 4, generator=gen) * 0.5 + 0.25}
    targets = rand_targets(gen, 2, 6, [1, 1])
    mask = torch.ones(2, 6, dtype=torch.bool)
    crit = SetCriterion(HungarianMatcher(), weight_align=1.0, align_temperature=tau, align_negatives=3)
    assert crit.align_negatives == 3
    assert crit({**outs, "align": (q, t, same, others)}, targets, mask)["loss_align"].item() == pytest.approx(got.item(), rel=1e-6)
    assert SetCriterion(HungarianMatcher(), weight_align=0.0, align_negatives=3).align_negatives == 0  # no contrast, no negatives
    with pytest.raises(ValueError, match="align_negatives=-1"):
        SetCriterion(HungarianMatcher(), weight_align=1.0, align_negatives=-1)


def test_ranking_loss_hand_computed():
    from ardetect.train.losses import ranking_loss

    scores = torch.tensor([-0.5, -1.0, -2.0, -0.1, float("-inf"), -3.0, -1.0], requires_grad=True)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    positive = torch.tensor([True, False, False, False, True, False, True])
    # group 0: positive first of three; group 1: the positive missed its target (-inf), left out; group 2: positive second of two
    g0 = math.log(math.exp(-0.5) + math.exp(-1.0) + math.exp(-2.0)) + 0.5
    g2 = math.log(math.exp(-3.0) + math.exp(-1.0)) + 1.0
    loss = ranking_loss(scores, group, positive)
    assert loss.item() == pytest.approx((g0 + g2) / 2, rel=1e-6)
    loss.backward()
    assert scores.grad[0] < 0 < scores.grad[1] and scores.grad[3] == 0  # the positive up, its negatives down
    # a negative that cannot be ranked (-inf) simply drops out of its group's softmax
    assert ranking_loss(torch.tensor([-1.0, float("-inf")]), torch.tensor([0, 0]), torch.tensor([True, False])).item() == pytest.approx(0.0, abs=1e-7)
    # nothing rankable: 0, still differentiable
    none = ranking_loss(torch.tensor([float("-inf"), -1.0], requires_grad=True), torch.tensor([0, 0]), torch.tensor([True, False]))
    assert none.item() == 0.0 and none.requires_grad
