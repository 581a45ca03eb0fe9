"""AbC fitted on the record: each training image is decoded once."""

from __future__ import annotations

import torch

from ardetect.config import AbCSection
from ardetect.evaluation import abc


def test_fit_abc_decodes_each_training_image_once(tiny_world, monkeypatch):
    tuples, root = tiny_world
    cfg = AbCSection(feature_dim=16, width=8, ssl_epochs=1, head_epochs=2)
    calls: list[list[str]] = []
    real = abc.load_images
    monkeypatch.setattr(abc, "load_images", lambda paths, *a, **k: calls.append(list(paths)) or real(paths, *a, **k))
    seen: list[torch.Tensor] = []
    base_features = abc.AbC.base_features
    monkeypatch.setattr(abc.AbC, "base_features", lambda self, images, *a, **k: seen.append(images) or base_features(self, images, *a, **k))
    _, _, stats = abc.fit_abc(cfg, tuples, root, 32)
    assert 0.0 <= stats["val_recall@10"] <= 1.0
    train = tuples[tuples["split"] == "train"]
    pool = set(train["train_image"]) | set(train["query_image"])
    decoded_train = [p for c in calls for p in c if p in pool]
    assert sorted(decoded_train) == sorted(pool)  # once each
    # the heads see exactly what decoding each list afresh gives
    torch.testing.assert_close(seen[0], real(train["query_image"].tolist(), root, 32), rtol=0, atol=0)
    torch.testing.assert_close(seen[1], real(train["train_image"].tolist(), root, 32), rtol=0, atol=0)
