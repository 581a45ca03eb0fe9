import math

import pytest
import torch

from ardetect.evaluation.abc import (
    AbC, Calibration, WorldEncoder, fit_calibration, nt_xent, pairs_by_epoch, train_heads, train_world_encoder,
)


def test_nt_xent_hand_computed():
    a = torch.eye(2)
    b = torch.eye(2)
    want = -math.log(math.e / (math.e + 1))  # logits [[1,0],[0,1]]
    assert nt_xent(a, b, 1.0).item() == pytest.approx(want, rel=1e-6)


def test_heads_start_at_identity_and_base_is_frozen():
    m = AbC(WorldEncoder(dim=16, width=4), 16)
    x = torch.randn(5, 16)
    assert torch.allclose(m.embed_train(x), torch.nn.functional.normalize(x, dim=-1))
    assert m.regulariser().item() == pytest.approx(0.0, abs=1e-6)
    assert not any(p.requires_grad for p in m.base.parameters())


def test_heads_learn_a_hidden_mapping():
    # synthesized features are a rotated, noisy copy of the training features: the heads must undo it
    g = torch.Generator().manual_seed(0)
    n, d = 60, 8
    train = torch.randn(n, d, generator=g)
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    synth = train @ rot + 0.3 * torch.randn(n, d, generator=g)
    concepts = [f"c{i}" for i in range(n)]
    m = AbC(torch.nn.Identity(), d)

    def top1():
        s = m.embed_synth(synth) @ m.embed_train(train).t()
        return (s.argmax(1) == torch.arange(n)).float().mean().item()

    before = top1()
    hist = train_heads(m, synth, train, concepts, epochs=60, batch_size=30, lr=5e-2, lambda_reg=0.0)
    assert hist[-1] < hist[0] and top1() > before + 0.2


def test_pairs_by_epoch_one_per_concept():
    idx = pairs_by_epoch(["a", "a", "b", "c", "c", "c"], seed=1)
    assert len(idx) == 3 and len({["a", "a", "b", "c", "c", "c"][i] for i in idx}) == 3


def test_calibration_sums_to_one_and_fits_sharper_than_softmax():
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(40, 30, generator=g) * 0.4
    pos = torch.randint(0, 30, (40,), generator=g)
    sims[torch.arange(40), pos] += 0.5  # the true exemplar is the most similar
    cal = fit_calibration(sims, pos)
    p = cal.influence(sims)
    assert torch.allclose(p.sum(-1), torch.ones(40))
    nll_fit = -p[torch.arange(40), pos].log().mean()
    nll_soft = -torch.softmax(sims, -1)[torch.arange(40), pos].log().mean()
    assert nll_fit < nll_soft and cal.tau < 1.0
    assert Calibration(tau=0.1, lam=0.9).influence(torch.tensor([[0.0, 1.0]]))[0, 0] == 0  # thresholded to zero


def test_world_encoder_ssl_runs_and_is_seeded():
    imgs = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    e1 = train_world_encoder(imgs, dim=16, epochs=1, batch_size=6, seed=3)
    e2 = train_world_encoder(imgs, dim=16, epochs=1, batch_size=6, seed=3)
    with torch.no_grad():
        assert torch.allclose(e1(imgs[:2]), e2(imgs[:2]))
