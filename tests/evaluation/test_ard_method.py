"""ARD in the harness: cached candidate features score exactly as a fresh forward pass."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ardetect.evaluation.ard import ARDMethod
from ardetect.model import ModelConfig, build


def test_cached_features_match_a_fresh_forward(tmp_path):
    torch.manual_seed(0)
    model = build(ModelConfig.named("nano", num_queries=16, image_size=(64, 64))).eval()
    rng = np.random.default_rng(0)
    paths = []
    for i, side in enumerate((64, 80, 64, 72)):  # the originals' sizes differ: boxes scale back to each
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(tmp_path / f"x{i}.png")
        paths.append(f"x{i}.png")
    query = pd.Series({"query_image": "x0.png", "query_box": [8.0, 10.0, 40.0, 50.0], "prompt": "A photo of a V* cat.", "concept_phrase": "V* cat"})
    method = ARDMethod(model, tmp_path, 64, batch=3, max_cached=3)
    first = method.score(query, paths[1:])
    assert len(method._features) == 3
    again = method.score(query, paths[::-1])  # x0 is new: the oldest entry is evicted, the rest reused
    assert len(method._features) == 3
    np.testing.assert_allclose(again.scores[::-1][1:], first.scores, atol=1e-5)

    # the same through a plain forward pass on the images
    q_img, q_box = method._image("x0.png")[0][None], torch.tensor([[8.0, 10.0, 40.0, 50.0]]) * 64 / 64
    cache = model.encode_query(q_img, q_box, [query["prompt"]], [query["concept_phrase"]])
    imgs = torch.stack([method._image(p)[0] for p in paths[1:]])
    sizes = torch.tensor([method._image(p)[1] for p in paths[1:]])
    boxes, scores = model.predict_region(imgs, cache, image_sizes=sizes)
    np.testing.assert_allclose(first.scores, scores.numpy(), atol=1e-5)
    np.testing.assert_allclose(first.boxes, boxes.numpy(), atol=1e-3)
    assert first.boxes[0, 2] <= 80 and (first.boxes >= 0).all()
