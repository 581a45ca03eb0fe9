"""The synthetic attribution world: determinism, boxes vs masks, distractors, styles, identities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ardetect.config import WorldConfig
from ardetect.data.schema import EXEMPLAR_COLUMNS, GENERATED_COLUMNS
from ardetect.data.templates import parse_template, templates_for
from ardetect.data.world import (
    WORLD_CLASSES,
    make_exemplars,
    make_generated,
    render_exemplar,
    render_generated,
    sample_identity,
)


def tiny(**kw) -> WorldConfig:
    base = dict(n_concepts=6, queries_per_concept=2, image_size=96, workers=1)
    base.update(kw)
    return WorldConfig(**base)


def build(root: Path, cfg: WorldConfig, objects: bool = False):
    ex, ex_objects = make_exemplars(cfg, root / "exemplars", root)
    gen, gen_objects = make_generated(cfg, ex, root / "generated", root)
    return (ex, gen, ex_objects, gen_objects) if objects else (ex, gen)


def _bytes(root: Path, rel: list[str]) -> list[bytes]:
    return [(root / r).read_bytes() for r in rel]


def _tight(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("w1")
    ex, gen = build(root, tiny(workers=1))
    return root, ex, gen


def test_tables_follow_the_record(world):
    root, ex, gen = world
    assert list(ex.columns) == list(EXEMPLAR_COLUMNS)
    assert list(gen.columns) == list(GENERATED_COLUMNS)
    assert len(ex) == 6 and len(gen) == 12
    assert list(ex.concept_id) == [f"c{i:05d}" for i in range(6)]
    assert list(gen.query_id[:2]) == ["q00000_00", "q00000_01"]
    assert (ex.source == "synthetic").all() and (gen.backend == "synthetic").all()
    for r in ex.itertuples():
        assert (root / r.image).is_file() and (root / r.mask).is_file()
        assert not Path(r.image).is_absolute()
        assert isinstance(r.box, list) and len(r.box) == 4 and all(type(v) is float for v in r.box)
        idn = json.loads(r.identity)
        assert idn["base_class"] == r.base_class and WORLD_CLASSES[r.base_class] == r.group
        assert Image.open(root / r.image).size == (96, 96)
        assert Image.open(root / r.mask).mode == "L"
    for r in gen.itertuples():
        assert (root / r.image).is_file()
        assert "V* " in r.prompt and r.concept_phrase in r.prompt and r.concept_phrase.startswith("V* ")
        t = parse_template(r.template, ex.set_index("concept_id").loc[r.concept_id, "group"])
        assert t.medium == r.medium and t.scene == r.scene
    # templates chosen without replacement per concept
    assert all(g.template.nunique() == len(g) for _, g in gen.groupby("concept_id"))


def test_round_robin_classes(world):
    _, ex, _ = world
    assert list(ex.base_class) == list(WORLD_CLASSES)[:6]
    cfg = tiny(base_classes=["cat", "mug"])
    assert [sample_identity(cfg, i)["base_class"] for i in range(4)] == ["cat", "mug", "cat", "mug"]
    with pytest.raises(ValueError):
        sample_identity(tiny(base_classes=["unicorn"]), 0)


def test_deterministic_across_workers_and_seed_sensitive(world, tmp_path):
    root1, ex1, gen1 = world
    root2 = tmp_path / "w2"
    ex2, gen2 = build(root2, tiny(workers=2))
    pd.testing.assert_frame_equal(ex1, ex2)
    pd.testing.assert_frame_equal(gen1, gen2)
    paths = list(ex1.image) + list(ex1["mask"]) + list(gen1.image)
    assert _bytes(root1, paths) == _bytes(root2, paths)
    root3 = tmp_path / "w3"
    ex3, gen3 = build(root3, tiny(workers=1, seed=7))
    assert list(ex3.identity) != list(ex1.identity)
    b1, b3 = _bytes(root1, list(gen1.image)), _bytes(root3, list(gen3.image))
    assert sum(x != y for x, y in zip(b1, b3)) == len(b1)


def test_boxes_match_masks(world):
    root, ex, gen = world
    for r in ex.itertuples():
        m = np.asarray(Image.open(root / r.mask)) > 127
        assert np.allclose(_tight(m), r.box, atol=1.0)
    for r in list(ex.itertuples()) + list(gen.itertuples()):
        x0, y0, x1, y1 = r.box
        assert 0 <= x0 < x1 <= r.width and 0 <= y0 < y1 <= r.height
        assert x1 - x0 >= 10 and y1 - y0 >= 10


@pytest.mark.parametrize("cls", list(WORLD_CLASSES))
def test_every_class_renders_with_consistent_box(cls):
    cfg = tiny(base_classes=[cls], image_size=128)
    idn = sample_identity(cfg, 0)
    for k, t in enumerate(templates_for(WORLD_CLASSES[cls], "lvis")[:4]):
        img, mask, box, *_ = render_generated(cfg, idn, t, np.random.default_rng(k))
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8 and mask.shape == (128, 128)
        assert mask.dtype == bool and mask.sum() > 60
        assert np.allclose(_tight(mask), box, atol=1.0)
        assert box[2] - box[0] >= 10 and box[3] - box[1] >= 10


def test_distractors_present():
    cfg = tiny(image_size=128, distractors={"min_count": 2, "max_count": 2, "same_class_prob": 1.0})
    none = tiny(image_size=128, distractors={"min_count": 0, "max_count": 0})
    idn = sample_identity(cfg, 0)
    t = parse_template("A {} is wandering through a dense forest.", "living_creatures")
    img, mask, _, *_ = render_generated(cfg, idn, t, np.random.default_rng(3))
    img0, mask0, _, *_ = render_generated(none, idn, t, np.random.default_rng(3))
    # same rng stream for pose/background, so the difference outside the concept is the distractors
    outside = ~(mask | mask0)
    diff = np.abs(img.astype(int) - img0.astype(int)).sum(-1)
    assert (diff[outside] > 60).mean() > 0.01
    # distractors barely overlap the concept: the concept mask is not swallowed
    assert mask.sum() > 60


def test_style_transforms():
    cfg = tiny(image_size=128)
    idn = sample_identity(cfg, 0)
    photo = parse_template("A {} is wandering through a dense forest.", "living_creatures")
    sketch = parse_template("A charcoal sketch of a {} sitting on a rock.", "living_creatures")
    ink = parse_template("An ink drawing of a {} in a traditional setting.", "living_creatures")
    p, _, _, *_ = render_generated(cfg, idn, photo, np.random.default_rng(0))
    s, _, _, *_ = render_generated(cfg, idn, sketch, np.random.default_rng(0))
    k, _, _, *_ = render_generated(cfg, idn, ink, np.random.default_rng(0))
    chroma = lambda a: np.abs(a.astype(int) - a.mean(-1, keepdims=True)).mean()
    assert chroma(p) > 8 and chroma(s) < 1 and chroma(k) < 1
    assert np.isin(k, [15, 245]).all()
    for medium_text in (
        "An oil painting of a {} exploring a misty valley.",
        "A vintage poster featuring a {} in a classic nature scene.",
        "A photorealistic rendering of a {} in a peaceful landscape.",
    ):
        t = parse_template(medium_text, "living_creatures")
        a, _, _, *_ = render_generated(cfg, idn, t, np.random.default_rng(0))
        assert a.shape == p.shape and not np.array_equal(a, p)
    for t in templates_for("living_creatures", "coco"):
        a, _, _, *_ = render_generated(cfg, idn, t, np.random.default_rng(0))
        assert a.shape == p.shape
    # every medium of every template set has its own transform: no two give the same image of the same scene
    from itertools import combinations

    from ardetect.data.templates import GROUPS
    from ardetect.data.world_scenes import stylize

    media = sorted({t.medium for g in GROUPS for which in ("coco", "lvis") for t in templates_for(g, which)})
    assert len(media) >= 9
    styled = {m: np.asarray(stylize(Image.fromarray(p), m, np.random.default_rng(0))) for m in media}
    assert not [(a, b) for a, b in combinations(media, 2) if np.array_equal(styled[a], styled[b])]


def test_identities_differ():
    cfg = tiny(n_concepts=60)
    ids = [sample_identity(cfg, i) for i in range(60)]
    keys = {json.dumps(i, sort_keys=True) for i in ids}
    assert len(keys) == 60
    same = [i for i in ids if i["base_class"] == "cat"]
    assert len(same) >= 2
    assert same[0]["palette"] != same[1]["palette"]
    assert sample_identity(cfg, 5) == sample_identity(cfg, 5)
    assert sample_identity(cfg, 5) != sample_identity(tiny(seed=1), 5)


def test_exemplar_and_generated_share_identity_but_differ():
    cfg = tiny(image_size=128)
    idn = sample_identity(cfg, 2)
    ex, em, eb, *_ = render_exemplar(cfg, idn, np.random.default_rng(0))
    t = templates_for(idn["group"], "lvis")[0]
    g, gm, gb, *_ = render_generated(cfg, idn, t, np.random.default_rng(0))
    assert not np.array_equal(ex, g)
    # the primary colour of the identity is visible in both instances
    pal = np.array(idn["palette"][0])
    near = lambda img, m: (np.abs(img[m].astype(int) - pal).sum(-1) < 120).mean()
    assert near(ex, em) > 0.05 and near(g, gm) > 0.05


def test_objects_table_records_every_visible_object(tmp_path):
    from ardetect.data.schema import OBJECT_COLUMNS, OBJECT_ROLES

    cfg = tiny(image_size=128, distractors={"min_count": 2, "max_count": 4, "same_class_prob": 0.3})
    ex, gen, ex_obj, gen_obj = build(tmp_path, cfg, objects=True)
    for images, objects, in ((ex, ex_obj), (gen, gen_obj)):
        assert list(objects.columns) == list(OBJECT_COLUMNS)
        assert set(objects["image"]) == set(images["image"])
        assert set(objects["role"]) <= set(OBJECT_ROLES) and set(objects["base_class"]) <= set(WORLD_CLASSES)
        # one concept per image: the image's own concept, box and class
        concepts = objects[objects["role"] == "concept"].set_index("image")
        assert concepts.index.is_unique and len(concepts) == len(images)
        for r in images.itertuples(index=False):
            c = concepts.loc[r.image]
            assert c["concept_id"] == r.concept_id and np.allclose(list(c["box"]), list(r.box))
        assert objects.loc[objects["role"] == "distractor", "concept_id"].isna().all()
        assert (objects["role"] == "distractor").sum() >= len(images)  # at least 2 drawn per image, a few may be covered
        # every object's box bounds its visible mask exactly, and its area counts it
        for image, rows in objects.groupby("image"):
            labels = np.asarray(Image.open(tmp_path / rows["mask"].iloc[0]))
            assert labels.shape == (128, 128) and rows["mask"].nunique() == 1
            assert set(np.unique(labels)) - {0} == set(rows["object"]), image
            for o in rows.itertuples(index=False):
                m = labels == o.object
                assert _tight(m) == tuple(o.box) and int(m.sum()) == o.area > 0
    # the concept of a generated image is drawn last: nothing covers it
    g = gen.iloc[0]
    labels = np.asarray(Image.open(tmp_path / gen_obj[gen_obj["image"] == g.image]["mask"].iloc[0]))
    top = gen_obj[(gen_obj["image"] == g.image) & (gen_obj["role"] == "concept")].iloc[0]
    assert top["object"] == labels.max()


def test_a_retried_placement_lies_inside_the_image_as_the_first_does():
    """A distractor that overlaps the concept is placed again with the same pose: each try lands inside the image."""
    from ardetect.data.world import _make_pose, _object_parts, _pixel_box, _place

    cfg = tiny(image_size=96)
    rng = np.random.default_rng(0)
    for concept in range(6):
        identity = sample_identity(cfg, concept)
        pose, parts = _make_pose(identity, 96, 0.3, 0.2, False), _object_parts(identity)
        for _ in range(12):
            _place(parts, pose, 96, rng)
            x0, y0, x1, y1 = _pixel_box(parts, pose)
            assert x0 >= 2 - 1e-6 and y0 >= 2 - 1e-6 and x1 <= 94 + 1e-6 and y1 <= 94 + 1e-6, (concept, x0, y0, x1, y1)


def test_every_image_holds_the_distractors_it_was_given():
    """min_count = max_count = 2 small distractors beside the concept: both are drawn, inside the image."""
    cfg = tiny(image_size=96, distractors={"min_count": 2, "max_count": 2, "scale": [0.15, 0.2], "same_class_prob": 0.3})
    for concept in range(8):
        r = render_exemplar(cfg, sample_identity(cfg, concept), np.random.default_rng(concept))
        distractors = [o for o in r.objects if o["role"] == "distractor"]
        assert len(distractors) == 2, (concept, r.objects)
        for o in distractors:
            x0, y0, x1, y1 = o["box"]
            assert x0 >= 2 and y0 >= 2 and x1 <= 94 and y1 <= 94, (concept, o)
