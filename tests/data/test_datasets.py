import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ardetect.data.datasets import NegativeSampler, TupleDataset, build_transform, transform_with_box


def test_every_transform_moves_the_box_with_the_image():
    # a white square on black: after any train transform, the box must still frame the white pixels
    img = np.zeros((80, 100, 3), np.uint8)
    img[20:50, 60:90] = 255
    pil = Image.fromarray(img)
    tf = build_transform(train=True, size=64)
    for seed in range(20):
        torch.manual_seed(seed)
        out, box = transform_with_box(tf, pil, [60, 20, 90, 50])
        white = out.mean(0) > 0.5  # [0, 1] images
        ys, xs = torch.nonzero(white, as_tuple=True)
        found = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.allclose(found, box, atol=2.5), (seed, found, box)


def _tuples(tmp_path, n_concepts=6):
    rows = []
    for c in range(n_concepts):
        Image.fromarray(np.full((48, 48, 3), (c * 30) % 256, np.uint8)).save(tmp_path / f"x{c}.png")
        for q in range(2):
            Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / f"q{c}_{q}.png")
            rows.append(
                {"tuple_id": f"t{c}_{q}", "split": "train" if c < 4 else "test", "concept_id": f"c{c}",
                 "prompt": "A V* cat", "concept_phrase": "V* cat", "query_image": f"q{c}_{q}.png",
                 "query_box": [4.0, 4.0, 20.0, 24.0], "train_image": f"x{c}.png", "train_box": [8.0, 8.0, 40.0, 32.0]}
            )
    return pd.DataFrame(rows)


def test_dataset_scales_boxes_to_model_format(tmp_path):
    ds = TupleDataset(_tuples(tmp_path), tmp_path, "train", image_size=24, train=False)
    s = ds[0]
    assert s.image.shape == (3, 24, 24) and s.query_image.shape == (3, 24, 24)
    assert torch.allclose(s.box_xyxy, torch.tensor([4.0, 4.0, 20.0, 16.0]))  # 48 -> 24
    assert torch.allclose(s.box, torch.tensor([12 / 24, 10 / 24, 16 / 24, 12 / 24]))
    assert torch.allclose(s.query_box, torch.tensor([2.4, 2.4, 12.0, 14.4]))  # 40 -> 24
    neg = ds.item(0, target_image="x3.png")
    assert not neg.positive and neg.box.shape == (0, 4)
    with pytest.raises(ValueError, match="no tuples in split 'val'"):
        TupleDataset(_tuples(tmp_path), tmp_path, "val", 24, False)


def test_negative_sampler_fresh_per_epoch_seeded_and_never_own(tmp_path):
    t = _tuples(tmp_path, n_concepts=12)
    t["split"] = "train"
    s = NegativeSampler(t, "train", k=4, seed=7)
    draws = [s.draw(0, e) for e in range(6)]
    assert all(len(d) == 4 and len(set(d)) == 4 for d in draws)
    assert all("x0.png" not in d for d in draws)  # tuple 0 belongs to concept c0
    assert len({tuple(d) for d in draws}) > 1  # fresh each epoch
    assert NegativeSampler(t, "train", k=4, seed=7).draw(0, 3) == draws[3]  # reproducible
    with pytest.raises(ValueError, match="k=12"):
        NegativeSampler(t, "train", k=12, seed=0)


def test_negative_sampler_draws_same_class_negatives_first(tmp_path):
    t = _tuples(tmp_path, n_concepts=12)
    t["split"] = "train"
    t["base_class"] = ["cat" if int(c[1:]) < 4 else "mug" for c in t["concept_id"]]  # c0..c3 cats, 3 others for c0
    hard = NegativeSampler(t, "train", k=4, seed=7, same_class=2)
    for e in range(6):
        d = hard.draw(0, e)
        assert len(set(d)) == 4 and "x0.png" not in d
        assert set(d[:2]) <= {"x1.png", "x2.png", "x3.png"}  # two of the other cats
        assert hard.draw(0, e) == d  # reproducible
    # more asked than the class holds: all of it, the rest uniform
    all3 = NegativeSampler(t, "train", k=4, seed=7, same_class=4).draw(0, 0)
    assert set(all3[:3]) == {"x1.png", "x2.png", "x3.png"} and len(set(all3)) == 4 and "x0.png" not in all3
    with pytest.raises(ValueError, match="same_class=5"):
        NegativeSampler(t, "train", k=4, seed=7, same_class=5)


def test_negative_sampler_draws_images_holding_a_distractor_of_the_query_class(tmp_path):
    t = _tuples(tmp_path, n_concepts=12)
    t["split"] = "train"
    t["base_class"] = ["cat" if int(c[1:]) < 4 else "mug" for c in t["concept_id"]]  # c0..c3 cats, c4..c11 mugs
    objects = pd.DataFrame({  # concept objects of every image; cat distractors in x5 and x7 (mugs), a mug distractor in x1 (a cat)
        "image": [f"x{c}.png" for c in range(12)] + ["x5.png", "x7.png", "x1.png", "x9.png"],
        "role": ["concept"] * 12 + ["distractor"] * 4,
        "base_class": t.drop_duplicates("concept_id")["base_class"].tolist() + ["cat", "cat", "mug", "mug"],
    })
    s = NegativeSampler(t, "train", k=3, seed=7, distractor_class=2, objects=objects)
    cat_tuple = 0  # concept c0, a cat: the images of mugs with a cat beside them are x5 and x7
    mug_tuple = int(np.flatnonzero(t["concept_id"] == "c9")[0])  # a mug: only x1 is another class's image with a mug distractor
    for e in range(5):
        d = s.draw(cat_tuple, e)
        assert set(d[:2]) == {"x5.png", "x7.png"} and len(set(d)) == 3 and "x0.png" not in d
        m = s.draw(mug_tuple, e)
        assert m[0] == "x1.png" and len(set(m)) == 3 and "x9.png" not in m  # x9 is its own image; one such image, the rest uniform
        assert s.draw(cat_tuple, e) == d  # reproducible
    both = NegativeSampler(t, "train", k=3, seed=7, same_class=1, distractor_class=1, objects=objects).draw(cat_tuple, 0)
    assert both[0] in {"x1.png", "x2.png", "x3.png"} and both[1] in {"x5.png", "x7.png"} and len(set(both)) == 3
    with pytest.raises(ValueError, match="needs the objects table"):
        NegativeSampler(t, "train", k=3, seed=7, distractor_class=1)
    with pytest.raises(ValueError, match="distractor_class=3 must be >= 0 and add up to at most k=3"):
        NegativeSampler(t, "train", k=3, seed=7, same_class=1, distractor_class=3, objects=objects)
