import math

import pytest
import torch

from ardetect.evaluation.abc import (
    AbC, ARDBackboneEncoder, Calibration, WorldEncoder, fit_calibration, identity_views, nt_xent, pairs_by_epoch, train_heads,
    train_world_encoder,
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
    # and it trains the encoder itself: its weights leave where the same seed starts them (0 epochs)
    e0 = train_world_encoder(imgs, dim=16, epochs=0, batch_size=6, seed=3)
    assert any(not torch.equal(a, b) for a, b in zip(e1.parameters(), e0.parameters()))


def test_identity_views_are_per_image_seeded_and_keep_colour():
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.2, 0.9], [0.6, 0.5, 0.1]])
    imgs = colours[:, :, None, None].expand(-1, -1, 40, 40).clone()
    imgs[:, :, 10:20, 10:30] = 0.5  # a grey patch, so crops differ
    a = identity_views(imgs, torch.Generator().manual_seed(1))
    b = identity_views(imgs, torch.Generator().manual_seed(1))
    c = identity_views(imgs, torch.Generator().manual_seed(2))
    assert a.shape == imgs.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded, and a new draw differs
    # each image gets its own crop, flip and jitter: four copies of one image give four different views
    same = identity_views(imgs[:1].expand(4, -1, -1, -1).contiguous(), torch.Generator().manual_seed(1))
    assert all(not torch.equal(same[i], same[j]) for i in range(4) for j in range(i + 1, 4))
    # no hue jitter, no greyscale: a plain colour keeps its dominant channel and stays coloured
    plain = identity_views(colours[:, :, None, None].expand(-1, -1, 40, 40).contiguous(), torch.Generator().manual_seed(3))
    for i in range(4):
        assert (plain[i].argmax(0) == colours[i].argmax()).all(), i
        assert (plain[i].max(0).values - plain[i].min(0).values).min() > 0.2, i


def test_ard_backbone_encoder_pools_every_level(tmp_path):
    from ardetect.model import ModelConfig, build

    det = build(ModelConfig.named("nano", num_queries=16, image_size=(64, 64))).eval()
    enc = ARDBackboneEncoder(det, features="backbone")  # max pooling by default
    assert enc.dim == sum(det.backbone.channels)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = det.backbone(x)
        torch.testing.assert_close(enc(x), torch.cat([f.amax(dim=(2, 3)) for f in feats], 1))
        torch.testing.assert_close(ARDBackboneEncoder(det, "avg", "backbone")(x), torch.cat([f.mean(dim=(2, 3)) for f in feats], 1))
        # the default: the detector's own region map, max-pooled over the image
        rm = ARDBackboneEncoder(det)
        assert rm.dim == det.region_proj.out_channels
        torch.testing.assert_close(rm(x), det.region_map(feats).amax(dim=(2, 3)))
    with pytest.raises(ValueError, match="pooling='sum'"):
        ARDBackboneEncoder(det, "sum")
    with pytest.raises(ValueError, match="features='pixels'"):
        ARDBackboneEncoder(det, features="pixels")
    assert enc.backbone is not det.backbone  # a frozen copy: the detector is left as it was
    other = build(ModelConfig.named("nano", num_queries=16, image_size=(64, 64), pixel_mean=(0.5, 0.5, 0.5)))
    with pytest.raises(ValueError, match="mean"):
        ARDBackboneEncoder(other)


def test_ard_backbone_encoder_standardises_with_the_statistics_it_is_given():
    from ardetect.model import ModelConfig, build

    det = build(ModelConfig.named("nano", num_queries=16, image_size=(64, 64))).eval()
    enc = ARDBackboneEncoder(det)
    x = torch.rand(6, 3, 64, 64)
    with torch.no_grad():
        raw = enc(x)  # before any statistics: the raw pooled features
        z = enc.fit_standardisation(raw)
        torch.testing.assert_close(z.mean(0), torch.zeros(enc.dim), atol=1e-5, rtol=0)
        torch.testing.assert_close(z.std(0), torch.ones(enc.dim), atol=1e-4, rtol=0)
        torch.testing.assert_close(enc(x), z, atol=1e-5, rtol=1e-5)  # later reads use the same shift and scale
        # fitting again on standardised features recovers the same statistics (undoes the first)
        shift = enc.shift.clone()
        enc.fit_standardisation(enc(x))
        torch.testing.assert_close(enc.shift, shift, atol=1e-5, rtol=1e-5)
        y = torch.rand(3, 3, 64, 64)
        torch.testing.assert_close(enc(y), (enc.pooled(y) - enc.shift) / enc.scale)
