"""The content checks of the quality gate, on a rendered world: boxes against their object's mask
and a second detection, records against their source tables, blank images and flat boxes, copies
and near-duplicates. Each planted fault fails its own family alone and names its row; the stage
stops on each one and leaves the earlier outputs as they were."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ardetect.config import ValidateConfig, WorldConfig
from ardetect.data.content import detect_phrases, nearest_other
from ardetect.data.quality import ValidationResult, build_specs, validate_tuples
from ardetect.data.schema import DETECTION_COLUMNS, EXCLUSION_COLUMNS, drop_excluded, write_parquet_atomic

from content_world import WORLD_SPLIT, World, negatives_for

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

CFG = ValidateConfig()
PLACEHOLDER = WorldConfig().placeholder
CONTENT_FAMILIES = ("box_covers_object", "records_agree", "image_content", "copies")


def run(w: World, cfg: ValidateConfig = CFG, detections: pd.DataFrame | None = None) -> ValidationResult:
    return validate_tuples(w.tuples, w.negatives, w.root, cfg, WORLD_SPLIT, placeholder=PLACEHOLDER, objects=w.objects,
                           exemplars=w.exemplars, generated=w.generated, detections=detections)


def assert_only(result: ValidationResult, family: str, *named: str) -> str:
    """The run failed, in ``family`` alone, and its message names every string in ``named``."""
    assert not result.success
    assert result.failed_families == [family], result.message()
    msg = result.message()
    for s in named:
        assert s in msg, f"{s!r} not named in:\n{msg}"
    return msg


def _digest(image: Image.Image) -> str:
    return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def stub_detector(w: World, moved: dict[str, list[float]] | None = None):
    """A stand-in for GroundingDINO: finds each generated image by its pixels and answers its recorded
    box (or the box in ``moved``), beside a weak detection in the corner."""
    boxes = {}
    for img, box in zip(w.generated["image"], w.generated["box"]):
        with Image.open(w.root / img) as im:
            boxes[_digest(im)] = (moved or {}).get(img, [float(v) for v in box])
    calls = []

    def detect(image, text):
        calls.append(text)
        box = boxes.get(_digest(image))
        return [([0.0, 0.0, 12.0, 12.0], 0.2)] + ([(box, 0.9)] if box is not None else [])

    return detect, calls


def row(w: World, tuple_id: str) -> int:
    return int(np.flatnonzero(w.tuples["tuple_id"].to_numpy() == tuple_id)[0])


def set_cell(df: pd.DataFrame, i: int, column: str, value) -> None:
    values = df[column].tolist()
    values[i] = value
    df[column] = values


def distractor_of(w: World, image_col: str) -> tuple[int, list[float]]:
    """A tuple row whose ``image_col`` image shows a distractor big enough to be a valid box, and its box."""
    o = w.objects
    d = o[(o["role"] == "distractor") & (o["area"] >= 150)]
    for i, img in enumerate(w.tuples[image_col]):
        hit = d[d["image"] == img]
        for box in hit["box"]:
            b = [float(v) for v in box]
            if min(b[2] - b[0], b[3] - b[1]) >= 10:
                return i, b
    raise AssertionError("no tuple image with a usable distractor")


def background_box(w: World, image: str, mask: str, side: int = 16) -> list[float]:
    """A box on background only (label 0) whose pixels are not flat."""
    labels = np.asarray(Image.open(w.root / mask))
    grey = np.asarray(Image.open(w.root / image).convert("L"), dtype=float)
    for y in range(0, labels.shape[0] - side, 4):
        for x in range(0, labels.shape[1] - side, 4):
            if not labels[y:y + side, x:x + side].any() and grey[y:y + side, x:x + side].std() > 10:
                return [float(x), float(y), float(x + side), float(y + side)]
    raise AssertionError(f"no background window in {image}")


@pytest.fixture(scope="module")
def clean(world) -> tuple[ValidationResult, list[str]]:
    detect, calls = stub_detector(world)
    detections = detect_phrases(world.tuples, world.root, detect)
    return run(world, detections=detections), calls


# --------------------------------------------------------------------------- the clean world


def test_clean_world_passes_every_family_with_all_inputs(clean, world):
    r, calls = clean
    assert r.success, r.message()
    assert {c.family for c in r.checks} >= set(CONTENT_FAMILIES)
    assert len(r.checks) == len(build_specs(CFG, placeholder=PLACEHOLDER, objects=True, records=True, detections=True))
    assert any(c.name == "box_covers_object:tuples:detection_iou" for c in r.checks)
    assert sorted(calls) == sorted(world.tuples["base_class"])  # each query image detected once, for its base class
    assert r.counts["detections"] == 2 * len(world.tuples)
    assert r.memorisation.empty and r.counts["memorisation_events"] == 0
    ex = r.exclusions()
    assert list(ex.columns) == list(EXCLUSION_COLUMNS) and ex.empty


def test_detect_phrases_checks_the_detector_answer(world):
    with pytest.raises(ValueError, match="expected 4 xyxy values"):
        detect_phrases(world.tuples.head(1), world.root, lambda image, text: [([1.0, 2.0, 3.0], 0.5)])
    d = detect_phrases(world.tuples.head(2), world.root, lambda image, text: [([1, 2, 30, 40], 0.5)])
    assert list(d.columns) == list(DETECTION_COLUMNS) and d["box"].iloc[0] == [1.0, 2.0, 30.0, 40.0]


# --------------------------------------------------------------------------- box_covers_object


@pytest.mark.parametrize("onto", ["distractor", "background"])
def test_query_box_on_something_else_fails_box_covers_object(world, onto):
    w = world.copy()
    if onto == "distractor":
        i, box = distractor_of(w, "query_image")
    else:
        i = 3
        img = w.tuples.at[i, "query_image"]
        mask = w.objects.loc[w.objects["image"] == img, "mask"].iloc[0]
        box = background_box(w, img, mask)
    tid, img = w.tuples.at[i, "tuple_id"], w.tuples.at[i, "query_image"]
    set_cell(w.tuples, i, "query_box", box)  # the detector boxed something else, and the record carried it along
    set_cell(w.generated, int(np.flatnonzero(w.generated["image"].to_numpy() == img)[0]), "box", box)
    r = run(w)
    assert_only(r, "box_covers_object", tid, img, "IoU >= 0.7")
    (f,) = [f for f in r.failures if f.column == "box_iou"]
    assert f.unexpected_count == 1 and f.examples[0]["tuple_id"] == tid
    if onto == "distractor":
        assert "distractor" in f.examples[0]["box_covers"]


def test_training_box_on_a_distractor_fails_box_covers_object(world):
    w = world.copy()
    i, box = distractor_of(w, "train_image")
    cid = w.tuples.at[i, "concept_id"]
    for j in np.flatnonzero(w.tuples["concept_id"].to_numpy() == cid):
        set_cell(w.tuples, int(j), "train_box", box)
    set_cell(w.exemplars, int(np.flatnonzero(w.exemplars["concept_id"].to_numpy() == cid)[0]), "box", box)
    r = run(w)
    assert_only(r, "box_covers_object", w.tuples.at[i, "train_image"], "train_image")


def test_box_in_hull_param(world):
    r = run(world, ValidateConfig(box_in_hull_min=1.0))  # no object fills its whole box
    msg = assert_only(r, "box_covers_object", "convex hull")
    assert {f.column for f in r.failures} == {"box_in_hull"}
    assert "box_in_hull" in msg


def test_second_detection_elsewhere_fails_box_covers_object(world):
    img = world.tuples.at[5, "query_image"]
    detect, _ = stub_detector(world, moved={img: [60.0, 60.0, 90.0, 90.0]})
    r = run(world, detections=detect_phrases(world.tuples, world.root, detect))
    assert_only(r, "box_covers_object", world.tuples.at[5, "tuple_id"], "second detection", "[60, 60, 90, 90]")
    assert [f.column for f in r.failures] == ["detection_iou"]


# --------------------------------------------------------------------------- records_agree


def test_prompt_of_another_row_fails_records_agree(world):
    w = world.copy()
    a, b = row(w, w.tuples["tuple_id"].iloc[0]), 1  # two queries of one concept, other templates
    assert w.tuples.at[a, "concept_id"] == w.tuples.at[b, "concept_id"]
    w.tuples.loc[a, "prompt"] = w.tuples.at[b, "prompt"]  # a join picked the neighbouring row's prompt
    r = run(w)
    assert_only(r, "records_agree", w.tuples.at[a, "tuple_id"], "prompt and concept_phrase are the generated row's")
    assert r.failures[0].unexpected_count == 1


def test_training_image_of_another_concept_fails_records_agree(world):
    w = world.copy()
    t = w.tuples
    a, b = sorted(t.loc[t["split"] == "train", "concept_id"].unique())[:2]
    ia, ib = (np.flatnonzero(t["concept_id"].to_numpy() == c) for c in (a, b))
    for col in ("train_image", "train_box", "train_width", "train_height"):  # the two concepts' training sides swapped
        va, vb = t.at[int(ia[0]), col], t.at[int(ib[0]), col]
        for j in ia:
            set_cell(t, int(j), col, vb)
        for j in ib:
            set_cell(t, int(j), col, va)
    w = World(w.root, w.exemplars, w.generated, w.objects, t, negatives_for(t))
    r = run(w)
    msg = assert_only(r, "records_agree", t.at[int(ia[0]), "tuple_id"], t.at[int(ib[0]), "tuple_id"],
                      "train_image is its concept's exemplar image", "the image's concept object has the tuple's concept_id")
    assert t.at[int(ia[0]), "train_image"] in msg


def test_image_path_shared_by_two_concepts_fails_records_agree(world):
    w = world.copy()
    shared = w.exemplars.at[0, "image"]
    w.exemplars.loc[1, "image"] = shared
    r = run(w)
    assert_only(r, "records_agree", shared, "belongs to one concept", "c00000, c00001")


# --------------------------------------------------------------------------- image_content


def test_blank_query_image_fails_image_content(world, tmp_path):
    w = world.copy(tmp_path / "data")
    i = 4
    img = w.tuples.at[i, "query_image"]
    Image.new("RGB", (96, 96), (120, 130, 140)).save(w.root / img)
    r = run(w)
    assert_only(r, "image_content", img, w.tuples.at[i, "tuple_id"], "not blank", "box region is not flat")


def test_flat_query_box_fails_image_content(world, tmp_path):
    w = world.copy(tmp_path / "data")
    i = 6
    img, box = w.tuples.at[i, "query_image"], w.tuples.at[i, "query_box"]
    arr = np.asarray(Image.open(w.root / img).convert("RGB")).copy()
    x0, y0, x1, y1 = (int(v) for v in box)
    arr[y0:y1, x0:x1] = 90
    Image.fromarray(arr).save(w.root / img)
    r = run(w)
    assert_only(r, "image_content", img, w.tuples.at[i, "tuple_id"], "box region is not flat")
    assert [f.table for f in r.failures] == ["image_boxes"]


# --------------------------------------------------------------------------- copies


def near_copy(src, dest, seed: int) -> None:
    arr = np.asarray(Image.open(src).convert("RGB")).astype(int)
    arr = arr + np.random.default_rng(seed).integers(-4, 5, size=arr.shape) + 3  # re-encoded, brighter
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(dest)


def test_query_copying_its_training_image_is_excluded_and_counted(world, tmp_path):
    w = world.copy(tmp_path / "data")
    i = 2
    tid, img = w.tuples.at[i, "tuple_id"], w.tuples.at[i, "query_image"]
    near_copy(w.root / w.tuples.at[i, "train_image"], w.root / img, seed=1)
    r = run(w)
    assert r.success, r.message()  # 1 of 20 queries: within max_copy_share
    assert list(r.memorisation["tuple_id"]) == [tid] and r.memorisation["hash_distance"].iloc[0] <= CFG.copy_max_distance
    assert r.counts["memorisation_events"] == 1 and r.summary()["memorisation_events"] == 1
    ex = r.exclusions()
    assert list(ex["tuple_id"]) == [tid] and list(ex["reason"]) == ["memorisation"] and img in ex["detail"].iloc[0]
    report = r.markdown()
    assert "## Memorisation events" in report and tid in report

    # kept out of training and evaluation: the stages read the tuples through the exclusions table
    path = write_parquet_atomic(ex, tmp_path / "exclusions.parquet")
    kept = drop_excluded(w.tuples, path)
    assert len(kept) == len(w.tuples) - 1 and tid not in set(kept["tuple_id"])
    from ardetect.data.datasets import TupleDataset

    split = w.tuples.at[i, "split"]
    ds = TupleDataset(kept, w.root, split, 32, train=False)
    assert tid not in set(ds.rows["tuple_id"]) and len(ds) == int((w.tuples["split"] == split).sum()) - 1

    # over the share the gate allows, the copies family fails, naming the copy
    r = run(w, ValidateConfig(max_copy_share=0.0))
    assert_only(r, "copies", tid, img, "near-copies of their own training image")


def test_near_duplicate_training_images_of_two_concepts_fail_copies(world, tmp_path):
    w = world.copy(tmp_path / "data")
    a, b = w.exemplars.at[0, "image"], w.exemplars.at[7, "image"]
    near_copy(w.root / a, w.root / b, seed=2)
    r = run(w)
    assert_only(r, "copies", a, b, "near-duplicate of another concept's")
    (f,) = r.failures
    assert f.unexpected_count == 2  # both images named, each with the other as its nearest
    assert r.memorisation.empty


def test_nearest_other_is_exact_against_all_pairs():
    rng = np.random.default_rng(0)
    bits = rng.random((300, 256)) < 0.5
    bits[17] = bits[5]
    bits[17, :7] ^= True  # 7 bits from 5
    bits[41] = bits[40]
    bits[41, 100:120] ^= True  # 20 bits from 40: beyond the radius
    bits[60] = bits[61]  # identical, but one group
    hashes = [np.packbits(b).tobytes() for b in bits]
    groups = list(range(300))
    groups[60] = 61
    dist, idx = nearest_other(hashes, groups, 16)
    brute = (bits[:, None, :] != bits[None, :, :]).sum(2)
    brute[np.arange(300), np.arange(300)] = 999
    brute[60, 61] = brute[61, 60] = 999
    expect = np.where(brute.min(1) <= 16, brute.min(1), np.nan)
    np.testing.assert_array_equal(dist, expect)
    assert idx[5] == 17 and idx[17] == 5 and np.isnan(dist[40]) and np.isnan(dist[60])


def test_a_box_out_of_order_is_left_to_its_own_family(world):
    w = world.copy()
    i = 7
    box = w.tuples.at[i, "query_box"]
    bad = [box[2], box[1], box[0], box[3]]  # x0 and x1 swapped, in the tuple and its generated row alike
    set_cell(w.tuples, i, "query_box", bad)
    set_cell(w.generated, int(np.flatnonzero(w.generated["image"].to_numpy() == w.tuples.at[i, "query_image"])[0]), "box", bad)
    assert_only(run(w), "box_ordered", w.tuples.at[i, "tuple_id"])
