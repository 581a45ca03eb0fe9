"""Real exemplars: COCO/LVIS candidates, selection, GroundingDINO boxes and SAM masks in the synthetic world's record."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ardetect.data.coco import read_candidates, select_candidates
from ardetect.data.schema import EXEMPLAR_COLUMNS, OBJECT_COLUMNS
from ardetect.generation.exemplars import make_real_exemplars


def test_candidates_and_balanced_selection(sample_coco):
    cands = read_candidates(sample_coco["annotations"])
    assert len(cands) == 8 and {c.category for c in cands} == {"cat", "cup", "horse", "motorcycle", "person", "rocket"}
    for c in cands:
        x0, y0, x1, y1 = c.annotation_box
        assert 0 <= x0 < x1 <= c.width and 0 <= y0 < y1 <= c.height
    order = list(select_candidates(cands, None, seed=0))
    assert sorted(c.image_id for c in order) == sorted(c.image_id for c in cands)  # each image once
    first_round = [c.category for c in order[:6]]
    assert sorted(first_round) == ["cat", "cup", "horse", "motorcycle", "person", "rocket"]  # classes in turn
    assert [c.image_id for c in select_candidates(cands, None, seed=0)] == [c.image_id for c in order]
    only = list(select_candidates(cands, ["person"], seed=1))
    assert [c.category for c in only] == ["person", "person"]
    with pytest.raises(ValueError, match=r"exemplars\.real\.classes has \['zebra'\]"):
        select_candidates(cands, ["zebra"], seed=0)  # at the call, before the stage loads its detectors


def test_lvis_layout_and_bad_files(tmp_path):
    doc = {
        "images": [{"id": 7, "coco_url": "http://images.cocodataset.org/val2017/000000000007.jpg", "width": 64, "height": 48}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 10, 20], "area": 150},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [30, 2, 20, 20], "area": 300},
        ],
        "categories": [{"id": 3, "name": "bat_(animal)"}],
    }
    p = tmp_path / "lvis.json"
    p.write_text(json.dumps(doc))
    (c,) = read_candidates(p)
    assert c.file_name == "000000000007.jpg" and c.category == "bat_(animal)"
    assert c.annotation_id == 2 and c.annotation_box == (30.0, 2.0, 50.0, 22.0)  # the largest instance
    p.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"exemplars\.real\.annotations=.*lvis\.json.*no 'annotations' list"):
        read_candidates(p)
    with pytest.raises(FileNotFoundError, match=r"exemplars\.real\.annotations=.*missing\.json"):
        read_candidates(tmp_path / "missing.json")
    import gzip

    p.write_bytes(gzip.compress(json.dumps(doc).encode()))  # instances.json.gz given as it was downloaded
    with pytest.raises(ValueError, match=r"exemplars\.real\.annotations=.*lvis\.json.* is not valid JSON \(a gzipped file"):
        read_candidates(p)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(images={"7": {}}), r"'images' is a dict, not a list"),
        (lambda d: d["annotations"][1].pop("bbox"), r"entry 1 of 'annotations' has no 'bbox' key"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 10]), r"entry 0 of 'annotations' is malformed: not enough values"),
        (lambda d: d["annotations"][0].update(category_id=None), r"entry 0 of 'annotations' is malformed"),
        (lambda d: d["categories"][0].pop("name"), r"entry 0 of 'categories' has no 'name' key"),
        (lambda d: d["images"][0].pop("width"), r"the entry of image id 7 of 'images' has no 'width' key"),
        (lambda d: d["images"][0].pop("coco_url"), r"image 7 of the annotation file has neither file_name nor coco_url"),
        (lambda d: d["annotations"].__setitem__(1, [30, 2, 20, 20]), r"entry 1 of 'annotations' is a list, not an object"),
        (lambda d: d["annotations"].__setitem__(0, None), r"entry 0 of 'annotations' is a NoneType, not an object"),
        (lambda d: d["categories"].__setitem__(0, "bat"), r"entry 0 of 'categories' is a str, not an object"),
    ],
    ids=["images-not-a-list", "no-bbox", "short-bbox", "null-category", "nameless-category", "no-width", "no-file-name",
         "list-annotation", "null-annotation", "string-category"],
)
def test_a_malformed_entry_is_named_with_its_list_and_position(tmp_path, change, message):
    doc = {
        "images": [{"id": 7, "coco_url": "http://x/000000000007.jpg", "width": 64, "height": 48}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 10, 20]},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [30, 2, 20, 20]},
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [5, 5, 0, 20], "area": 9999},  # degenerate: passed over
        ],
        "categories": [{"id": 3, "name": "bat_(animal)"}],
    }
    p = tmp_path / "instances.json"
    p.write_text(json.dumps(doc))
    (c,) = read_candidates(p)
    assert c.annotation_id == 2  # the degenerate third box, its recorded area the largest, is no candidate
    change(doc)
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"exemplars\.real\.annotations=.*instances\.json.*" + message):
        read_candidates(p)


def _check_record(res, root):
    t, o = res.table, res.objects
    assert list(t.columns) == list(EXEMPLAR_COLUMNS) and list(o.columns) == list(OBJECT_COLUMNS)
    assert t["concept_id"].is_unique and set(t["source"]) == {"coco"}
    for r in t.itertuples(index=False):
        with Image.open(root / r.image) as im:
            assert im.size == (r.width, r.height) and im.mode == "RGB"
        mask = np.asarray(Image.open(root / r.mask)) == 255
        concept = o[(o["image"] == r.image) & (o["role"] == "concept")]
        assert len(concept) == 1 and concept.iloc[0]["concept_id"] == r.concept_id
        labels = np.asarray(Image.open(root / concept.iloc[0]["mask"]))
        assert ((labels == 1) == mask).all()
        ys, xs = np.nonzero(mask)
        assert list(r.box) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # R_X is the mask's box
        assert list(concept.iloc[0]["box"]) == list(r.box)
        ident = json.loads(r.identity)
        assert ident["category"] == r.base_class and len(ident["detection_box"]) == 4
    for ob in o.itertuples(index=False):  # every object's box bounds its visible label region, area counts it
        labels = np.asarray(Image.open(root / ob.mask))
        ys, xs = np.nonzero(labels == ob.object)
        assert ob.area == len(xs) > 0
        assert list(ob.box) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert (ob.role == "concept") == (not pd.isna(ob.concept_id))


def test_real_exemplars_record(real_config, tmp_path):
    out = tmp_path / "exemplars"
    res = make_real_exemplars(real_config(), out, tmp_path)
    assert len(res.table) == 8 and res.skipped == []
    assert set(res.table["group"]) == {"living_creatures", "food_drink", "transportation", "misc_objects"}
    assert res.table.set_index("base_class").loc["horse", "group"] == "living_creatures"
    _check_record(res, tmp_path)
    again = make_real_exemplars(real_config(), tmp_path / "again", tmp_path)
    pd.testing.assert_frame_equal(res.table.drop(columns=["image", "mask"]), again.table.drop(columns=["image", "mask"]))


def test_a_16_bit_photo_is_scaled_to_8_bits_in_its_stored_orientation(real_config, sample_coco, tmp_path):
    """`convert("RGB")` clipped a 16-bit image to white (then skipped as `no_detection`, or kept white)."""
    images = tmp_path / "images"
    shutil.copytree(sample_coco["images"], images)
    res = make_real_exemplars(real_config(images=str(images)), tmp_path / "plain", tmp_path)
    src = images / json.loads(res.table.iloc[0]["identity"])["file_name"]  # a photo the plain run accepted
    grey = np.asarray(Image.open(src).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(src)  # the same photo, 16 bits a pixel
    assert Image.open(src).mode.startswith("I")
    deep = make_real_exemplars(real_config(images=str(images)), tmp_path / "deep", tmp_path)
    row = deep.table[[json.loads(r).get("file_name") == src.name for r in deep.table["identity"]]]
    assert len(row) == 1, deep.skipped
    stored = np.asarray(Image.open(tmp_path / row.iloc[0]["image"]).convert("L"), dtype=np.int16)
    assert (stored == 255).mean() < 0.5 and np.abs(stored - grey // 257).max() <= 1  # scaled, not clipped


def test_skipped_exemplars_are_counted_with_reasons(real_config, sample_coco, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(sample_coco["images"], images)
    (images / "coffee.png").unlink()
    horse = next(images.glob("horse*.png"))
    horse.write_bytes(horse.read_bytes()[: horse.stat().st_size // 2])  # a truncated download
    res = make_real_exemplars(real_config(images=str(images)), tmp_path / "ex", tmp_path)
    assert len(res.table) == 6 and res.skip_counts == {"image_missing": 1, "image_unreadable": 1}
    missing, unreadable = sorted(res.skipped, key=lambda r: r["reason"])
    assert missing["file_name"] == "coffee.png" and "coffee.png" in missing["detail"]
    assert unreadable["file_name"] == horse.name and "cannot be decoded" in unreadable["detail"], unreadable
    assert not {"cup", "horse"} & set(res.table["base_class"])
    few = make_real_exemplars(real_config(max_exemplars=3), tmp_path / "few", tmp_path)
    assert len(few.table) == 3 and list(few.table["concept_id"]) == ["c00000", "c00001", "c00002"]
    with pytest.raises(ValueError, match=r"no exemplar accepted .*8 candidates skipped: \{'no_detection': 8\}"):
        make_real_exemplars(real_config(box_threshold=1.0), tmp_path / "none", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"exemplars\.real\.images=.*nowhere"):
        make_real_exemplars(real_config(images=str(tmp_path / "nowhere")), tmp_path / "x", tmp_path)
