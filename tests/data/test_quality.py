"""Great Expectations data-quality checks: a valid set passes; each planted fault is caught and named."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from ardetect.config import SplitConfig, ValidateConfig
from ardetect.data.quality import (
    FAMILIES,
    ValidationFailed,
    ValidationResult,
    assert_valid,
    build_specs,
    validate_tuples,
)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

CFG = ValidateConfig()
SPLIT = SplitConfig()


def run(data, cfg: ValidateConfig = CFG, **kw) -> ValidationResult:
    return validate_tuples(data.tuples, data.negatives, data.root, cfg, SPLIT, **kw)


def assert_only(result: ValidationResult, family: str, *named: str) -> str:
    """The run failed, in ``family`` alone, and its message names every string in ``named``."""
    assert not result.success
    assert result.failed_families == [family], result.message()
    assert all(f.family == family for f in result.failures)
    msg = result.message()
    for s in named:
        assert s in msg, f"{s!r} not named in:\n{msg}"
    return msg


def row_of(data, tuple_id: str) -> int:
    return int(np.flatnonzero(data.tuples["tuple_id"].to_numpy() == tuple_id)[0])


def set_box(data, tuple_id: str, column: str, box) -> None:
    i = row_of(data, tuple_id)
    boxes = data.tuples[column].tolist()
    boxes[i] = box
    data.tuples[column] = boxes


def objects(df: pd.DataFrame) -> pd.DataFrame:
    """Negatives with plain object columns, so rows with new values can be added."""
    return df.astype(object)


@pytest.fixture(scope="module")
def valid_result(tuple_data) -> ValidationResult:
    return run(tuple_data)


# --------------------------------------------------------------------------- the valid set


def test_valid_data_passes_every_family(valid_result, tuple_data, tmp_path):
    r = valid_result
    assert r.success, r.message()
    assert r.families == {f: True for f in FAMILIES}
    assert r.failures == []
    # no objects, exemplars or generated table given: those families have no checks
    assert {c.family for c in r.checks} == set(FAMILIES) - {"objects", "box_covers_object", "records_agree"}
    assert len(r.checks) == len(build_specs(CFG))
    assert r.counts["tuples"] == len(tuple_data.tuples) == 40
    assert r.counts["images"] == 60  # 20 training + 40 query images
    assert r.counts["concepts_per_split"] == {"train": 16, "val": 2, "test": 2}
    assert_valid(r)  # does not raise
    assert "passed" in r.message()

    paths = r.write_report(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.md", "summary.json"]
    summary = json.loads(paths["summary"].read_text())
    assert summary["success"] is True and summary["tuples"] == 40
    assert summary["families"] == {f: True for f in FAMILIES}
    assert summary["counts"]["per_class"] == {"car": 10, "cat": 10, "dog": 10, "mug": 10}
    assert len(summary["checks"]) == len(r.checks)
    report = paths["report"].read_text()
    assert "**Status: PASSED**" in report
    for c in r.checks:
        assert c.expectation in report
    # the summary (the validate stage's tracked checks.json) is the same file for the same data: no run time in it
    again = run(tuple_data).write_report(tmp_path / "again")["summary"]
    assert again.read_bytes() == paths["summary"].read_bytes()
    assert f"checked in {r.runtime_s:.1f} s" in report


def test_placeholder_template_checked_when_given(tuple_data):
    assert run(tuple_data, placeholder="V* {}").success
    r = run(tuple_data, placeholder="<asset0> {}")
    assert_only(r, "prompt_concept", "phrase_matches_placeholder", "t00000_00")
    assert r.failures[0].unexpected_count == 40


def test_a_placeholder_with_braces_is_checked_as_the_generation_fills_it(tuple_data):
    """world.placeholder '{V*} {}' is accepted: the phrase is its '{}' replaced, other braces kept (not str.format)."""
    data = tuple_data.copy()
    for col in ("prompt", "concept_phrase"):
        data.tuples[col] = data.tuples[col].str.replace("V* ", "{V*} ", regex=False)
    assert run(data, placeholder="{V*} {}").success
    assert_only(run(data, placeholder="V* {}"), "prompt_concept", "phrase_matches_placeholder")


# --------------------------------------------------------------------------- one family per planted fault


@pytest.mark.parametrize(
    "box", [[2.0, float("nan"), 20.0, 25.0], [2.0, 3.0, float("inf"), 25.0], [2.0, 3.0, 20.0], None],
    ids=["nan", "inf", "three-values", "missing"],
)
def test_box_finite(tuple_data, box):
    d = tuple_data.copy()
    set_box(d, "t00003_01", "query_box", box)
    r = run(d)
    assert_only(r, "box_finite", "t00003_01", "query_box")
    assert sum(f.unexpected_count for f in r.failures) >= 1
    assert {ex["tuple_id"] for f in r.failures for ex in f.examples} == {"t00003_01"}


def test_box_ordered(tuple_data):
    d = tuple_data.copy()
    set_box(d, "t00005_00", "train_box", [24.0, 4.5, 4.0, 30.0])  # x1 < x0
    r = run(d)
    msg = assert_only(r, "box_ordered", "t00005_00", "train_box_x1", "[24, 4.5, 4, 30]")
    (f,) = r.failures
    assert f.expectation == "expect_column_pair_values_a_to_be_greater_than_b"
    assert f.unexpected_count == 1 and f.examples[0]["tuple_id"] == "t00005_00"
    assert "x1 > x0" in msg


@pytest.mark.parametrize(
    "box, edge", [([2.0, 3.0, 37.0, 25.0], "x1 <= query_width"), ([-1.5, 3.0, 20.0, 25.0], "x0 >= 0")]
)
def test_box_inside_image(tuple_data, box, edge):
    d = tuple_data.copy()
    set_box(d, "t00007_00", "query_box", box)
    r = run(d)
    assert_only(r, "box_inside_image", "t00007_00", edge)
    (f,) = r.failures
    assert f.examples[0]["query_width"] == 32


@pytest.mark.parametrize(
    "box, what", [([5.0, 5.0, 6.0, 6.0], "shorter side"), ([5.0, 5.0, 10.0, 17.0], "area")], ids=["1px", "area"]
)
def test_box_min_size(tuple_data, box, what):
    d = tuple_data.copy()
    set_box(d, "t00002_01", "query_box", box)
    r = run(d)
    assert_only(r, "box_min_size", "t00002_01", what)
    assert r.failures[0].unexpected_count == 1


def test_box_min_size_uses_params(tuple_data):
    r = run(tuple_data, ValidateConfig(min_box_side=25.0, min_box_area=64.0))
    assert_only(r, "box_min_size", "query_box_min_side")
    assert r.failures[0].unexpected_count == 40  # every 32-px query box is ~20 px tall


def test_image_deleted(tuple_data, tmp_path):
    d = tuple_data.copy(tmp_path / "data")
    path = d.tuples.loc[row_of(d, "t00004_01"), "query_image"]
    (d.root / path).unlink()
    r = run(d)
    assert_only(r, "image_files", "t00004_01", path, "image file exists")
    (f,) = r.failures
    assert f.unexpected_count == 1


def test_training_image_deleted_named_for_tuples_and_negatives(tuple_data, tmp_path):
    d = tuple_data.copy(tmp_path / "data")
    path = "exemplars/images/c00001.png"
    (d.root / path).unlink()
    r = run(d)
    assert_only(r, "image_files", path)
    roles = {ex["role"] for f in r.failures for ex in f.examples}
    assert roles == {"train_image", "neg_image"}


def test_image_path_must_be_relative_png(tuple_data):
    d = tuple_data.copy()
    i = row_of(d, "t00010_01")
    absolute = str(d.root / d.tuples.loc[i, "query_image"])  # exists, decodes, right size: only the path is wrong
    d.tuples.loc[i, "query_image"] = absolute
    r = run(d)
    assert_only(r, "image_files", "t00010_01", absolute, "relative to the data root")
    assert [f.name for f in r.failures] == ["image_files:images:image_path"]


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_image_does_not_decode(tuple_data, tmp_path, how):
    d = tuple_data.copy(tmp_path / "data")
    path = d.tuples.loc[row_of(d, "t00009_00"), "query_image"]
    f = d.root / path
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x89PNG not really" + data[40:80])
    r = run(d)
    assert_only(r, "image_files", "t00009_00", path, "decodes")
    (fail,) = r.failures
    assert fail.column == "decodes" and fail.examples[0]["error"]


def test_image_recorded_size_wrong(tuple_data):
    d = tuple_data.copy()
    d.tuples.loc[row_of(d, "t00011_01"), "query_width"] = 40  # the file is 32 px wide
    r = run(d)
    assert_only(r, "image_files", "t00011_01", "recorded width")
    (f,) = r.failures
    assert f.examples[0]["recorded_width"] == 40 and f.examples[0]["width"] == 32


@pytest.mark.parametrize(
    "prompt, phrase, check",
    [
        ("A photo of a cat sitting on a rock.", None, "prompt holds its concept_phrase"),
        ("A photo of a V* kitten on a rock.", "V* kitten", "concept_phrase holds its base_class"),
        ("A photo of a cat on a rock.", "cat", "placeholder besides the base_class"),
    ],
    ids=["prompt-without-phrase", "phrase-without-class", "phrase-without-placeholder"],
)
def test_prompt_concept(tuple_data, prompt, phrase, check):
    d = tuple_data.copy()
    i = row_of(d, "t00000_01")
    assert d.tuples.loc[i, "base_class"] == "cat"
    d.tuples.loc[i, "prompt"] = prompt
    if phrase is not None:
        d.tuples.loc[i, "concept_phrase"] = phrase
    r = run(d)
    assert_only(r, "prompt_concept", "t00000_01", check, prompt)
    assert r.failures[0].unexpected_count == 1


def test_duplicate_tuple_id(tuple_data):
    d = tuple_data.copy()
    d.tuples.loc[row_of(d, "t00006_01"), "tuple_id"] = "t00006_00"
    r = run(d)
    assert_only(r, "ids_unique", "t00006_00", "tuple_id is unique")
    names = {f.name for f in r.failures}
    assert "ids_unique:tuples:tuple_id" in names
    # the negatives of the renamed tuple now point at no tuple
    assert "t00006_01" in r.message()


def test_negatives_of_unknown_tuple(tuple_data):
    d = tuple_data.copy()
    neg = objects(d.negatives)
    neg.loc[len(neg)] = {"tuple_id": "t99999_00", "neg_concept_id": "c00001", "neg_image": "exemplars/images/c00001.png"}
    d = d.with_tables(negatives=neg)
    r = run(d)
    assert_only(r, "ids_unique", "t99999_00", "is a tuple")


def test_split_leakage(tuple_data):
    d = tuple_data.copy()
    tid = d.tuples.loc[d.tuples["split"] == "train", "tuple_id"].iloc[0]
    image = d.tuples.loc[row_of(d, tid), "train_image"]
    d.tuples.loc[row_of(d, tid), "split"] = "val"  # one tuple of a train concept moved to val
    r = run(d)
    msg = assert_only(r, "split_leakage", tid, image, "a training image is in one split", "a concept is in one split")
    assert "train, val" in msg


def test_negative_is_own_training_image(tuple_data):
    d = tuple_data.copy()
    neg = objects(d.negatives)
    tid = "t00008_00"
    own = d.tuples.loc[row_of(d, tid), "train_image"]
    i = int(np.flatnonzero(neg["tuple_id"].to_numpy() == tid)[0])
    neg.loc[i, "neg_image"] = own  # a negative row of another concept now holds the tuple's own image
    r = run(d.with_tables(negatives=neg))
    assert r.failed_families == ["ids_unique", "negatives_own_image"], r.message()
    assert [f.name for f in r.failures] == ["ids_unique:neg_per_tuple:n_image_not_concept",
                                            "negatives_own_image:neg_per_tuple:n_own_image"]
    assert tid in r.message() and own in r.message() and "own training image" in r.message()


def test_a_negative_image_from_another_split_is_a_leak_whatever_its_concept_says(tuple_data):
    d = tuple_data.copy()
    neg = objects(d.negatives)
    tid = d.tuples.loc[d.tuples["split"] == "test", "tuple_id"].iloc[0]
    val_image = d.tuples.loc[d.tuples["split"] == "val", "train_image"].iloc[0]
    i = int(np.flatnonzero(neg["tuple_id"].to_numpy() == tid)[0])
    concept = neg.loc[i, "neg_concept_id"]
    neg.loc[i, "neg_image"] = val_image  # the concept column still names a test concept; the image is val's
    r = run(d.with_tables(negatives=neg))
    assert r.failed_families == ["ids_unique", "split_leakage"], r.message()
    assert [f.name for f in r.failures] == ["ids_unique:neg_per_tuple:n_image_not_concept",
                                            "split_leakage:neg_per_tuple:n_cross_split"]
    assert f"{concept} (test) {val_image} (val)" in r.message()
    assert "neg_image is its neg_concept_id's training image" in r.message()


def test_negative_of_own_concept(tuple_data):
    d = tuple_data.copy()
    neg = objects(d.negatives)
    tid = "t00008_01"
    row = d.tuples.loc[row_of(d, tid)]
    neg.loc[len(neg)] = {"tuple_id": tid, "neg_concept_id": row["concept_id"], "neg_image": row["train_image"]}
    r = run(d.with_tables(negatives=neg))
    assert_only(r, "negatives_own_image", tid, row["train_image"])
    assert len(r.failures) == 2  # own image and own concept


def test_min_negatives(tuple_data):
    d = tuple_data.copy()
    tid = d.tuples.loc[d.tuples["split"] == "test", "tuple_id"].iloc[0]
    neg = d.negatives[d.negatives["tuple_id"].astype(str) != tid]
    r = run(d.with_tables(negatives=neg))
    assert_only(r, "min_negatives", tid, "at least 1 negatives")
    assert r.failures[0].unexpected_count == 1
    # the parameter is honoured: 16 train concepts give train tuples 15 negatives, val/test 1
    r = run(tuple_data, ValidateConfig(min_negatives=2))
    assert_only(r, "min_negatives")
    assert r.failures[0].unexpected_count == 8  # the 4 val and 4 test tuples


def test_class_balance(tuple_data):
    d = tuple_data.copy()
    t = d.tuples
    dogs = sorted(t.loc[t["base_class"] == "dog", "concept_id"].unique())[:4]  # 4 of the 5 dog concepts become cats
    m = t["concept_id"].isin(dogs)
    for col in ("base_class", "concept_phrase", "prompt"):
        t.loc[m, col] = t.loc[m, col].str.replace("dog", "cat")
    r = run(d)
    assert_only(r, "class_balance", "base_class=dog")
    (f,) = r.failures
    assert f.examples == [{"base_class": "dog", "n_tuples": 2, "most_frequent": 18, "imbalance": 9.0}]
    assert run(d, ValidateConfig(class_balance_tolerance=10.0)).success


def test_split_balance(tuple_data):
    d = tuple_data.copy()
    t = d.tuples
    movers = sorted(t.loc[t["split"] == "train", "concept_id"].unique())[:4]  # whole concepts: no leakage
    t.loc[t["concept_id"].isin(movers), "split"] = "test"
    d = d.with_tables(tuples=t, negatives=d.negatives_for(t))
    r = run(d)
    msg = assert_only(r, "split_balance", "split=test", "split=train")
    assert {ex["split"] for ex in r.failures[0].examples} == {"train", "test"}
    assert "share" in msg
    assert run(d, ValidateConfig(split_tolerance=0.25)).success


@pytest.mark.parametrize("table", ["tuples-missing", "tuples-extra", "negatives-missing"])
def test_schema(tuple_data, table):
    d = tuple_data.copy()
    if table == "tuples-missing":
        d = d.with_tables(tuples=d.tuples.drop(columns=["medium"]))
        named = "medium"
    elif table == "tuples-extra":
        d.tuples["notes"] = "x"
        named = "notes"
    else:
        d = d.with_tables(negatives=d.negatives.rename(columns={"neg_concept_id": "concept"}))
        named = "neg_concept_id"
    r = run(d)
    assert not r.success
    assert "schema" in r.failed_families
    assert any(f.family == "schema" and f.expectation == "expect_table_columns_to_match_set" for f in r.failures)
    assert named in r.message()
    if table != "negatives-missing":
        assert r.failed_families == ["schema"], r.message()


def test_split_value_outside_the_domain(tuple_data):
    d = tuple_data.copy()
    d.tuples.loc[d.tuples["concept_id"] == "c00010", "split"] = "training"
    r = run(d.with_tables(negatives=d.negatives_for(d.tuples)))
    assert "schema" in r.failed_families
    assert "training" in r.message() and "split is one of" in r.message()


# --------------------------------------------------------------------------- the stage's contract


def test_box_corruption_and_deleted_image_fail_naming_both(tuple_data, tmp_path):
    d = tuple_data.copy(tmp_path / "data")
    set_box(d, "t00012_00", "train_box", [4.0, float("nan"), 20.0, 30.0])
    path = d.tuples.loc[row_of(d, "t00013_01"), "query_image"]
    (d.root / path).unlink()
    r = run(d)
    assert r.failed_families == ["box_finite", "image_files"]
    with pytest.raises(ValidationFailed) as info:
        assert_valid(r)
    assert info.value.result is r
    text = str(info.value)
    assert "t00012_00" in text and "t00013_01" in text and path in text
    assert text.startswith("data validation FAILED: 2 of")

    paths = r.write_report(tmp_path / "report")
    report = paths["report"].read_text()
    assert "**Status: FAILED**" in report and "t00012_00" in report and path in report
    summary = json.loads(paths["summary"].read_text())  # strict JSON: NaN written as a string
    assert summary["success"] is False
    assert summary["failed_families"] == ["box_finite", "image_files"]
    ex = summary["failures"][0]["examples"][0]
    assert ex["tuple_id"] == "t00012_00" and "nan" in ex["train_box"]
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.endswith(".tmp")]


def test_data_docs_optional(valid_result, tmp_path):
    paths = valid_result.write_report(tmp_path / "out", data_docs=True)
    index = paths["data_docs"]
    assert index == tmp_path / "out" / "data_docs" / "index.html" and index.is_file()
    pages = list((index.parent / "validations").rglob("*.html"))
    assert pages and any("ardetect_tuples" in p.read_text() for p in pages)
    valid_result.write_report(tmp_path / "out", data_docs=True)  # again: replaced whole
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data_docs", "report.md", "summary.json"]


def test_examples_capped_by_max_examples(tuple_data):
    d = tuple_data.copy()
    d.tuples["prompt"] = "A photo of a thing."
    r = run(d, ValidateConfig(max_examples=3))
    assert_only(r, "prompt_concept")
    (f,) = r.failures
    assert f.unexpected_count == 40 and len(f.examples) == 3
    assert "... and 37 more" in r.message()


# --------------------------------------------------------------------------- the objects table


@pytest.fixture(scope="module")
def world_objects(tmp_path_factory):
    """A tiny rendered world: its tuples, negatives and objects table, on disk."""
    from ardetect.config import WorldConfig
    from ardetect.data.tuples import assign_splits, build_negatives, build_tuples
    from ardetect.data.world import make_exemplars, make_generated

    root = tmp_path_factory.mktemp("objects_world")
    cfg = WorldConfig(n_concepts=10, queries_per_concept=2, image_size=96, workers=1)
    ex, ex_obj = make_exemplars(cfg, root / "exemplars", root)
    gen, gen_obj = make_generated(cfg, ex, root / "generated", root)
    splits = assign_splits(ex, SPLIT, 0)
    tuples = build_tuples(ex, gen, splits)
    return root, tuples, build_negatives(tuples, ex, splits), pd.concat([ex_obj, gen_obj], ignore_index=True)


def run_objects(world_objects, objects=None, root=None) -> ValidationResult:
    r0, tuples, negatives, obj = world_objects
    return validate_tuples(tuples, negatives, root or r0, CFG, SPLIT, objects=obj if objects is None else objects)


def failed_objects_checks(result: ValidationResult) -> set[str]:
    return {f.description for f in result.failures if f.family == "objects"}


def test_objects_table_of_a_rendered_world_passes(world_objects):
    r = run_objects(world_objects)
    n = len(build_specs(CFG, objects=True)) - len(build_specs(CFG))
    with_objects = ("objects", "box_covers_object", "records_agree")  # records_agree: the object's concept_id
    assert n >= 15 and sum(c.family in with_objects for c in r.checks) == n
    for family in (*with_objects, "image_content", "copies"):  # (1 val and 1 test concept: no negatives there)
        assert r.families[family], r.message()
    assert r.counts["objects"] == len(world_objects[3]) and r.summary()["objects"] == len(world_objects[3])


def test_objects_faults_are_caught_and_named(world_objects, tmp_path):
    obj = world_objects[3]
    # a box one pixel off its mask; a distractor that names a concept; an unknown role; a second concept object
    bad = obj.copy(deep=True).astype({"concept_id": object})
    d = int(np.flatnonzero(bad["role"].to_numpy() == "distractor")[0])
    boxes = bad["box"].tolist()
    boxes[0] = [boxes[0][0] + 1.0, *boxes[0][1:]]
    bad["box"] = boxes
    bad.loc[d, "concept_id"] = "c00000"
    bad.loc[d + 1, "role"] = "background"
    extra = bad[bad["role"] == "concept"].iloc[[3]].assign(object=99)
    bad = pd.concat([bad, extra], ignore_index=True)
    r = run_objects(world_objects, bad)
    failed = failed_objects_checks(r)
    assert "the box bounds the object's visible mask exactly" in failed
    assert "a concept object names its concept_id, a distractor none" in failed
    assert "role is one of concept, distractor" in failed
    assert "every tuple image has exactly one concept object" in failed
    assert "box_covers_object" not in r.failed_families  # the tuple boxes are measured on the label maps
    # a deleted label map: its objects' masks do not read
    root = tmp_path / "copy"
    import shutil

    shutil.copytree(world_objects[0], root)
    (root / obj["mask"].iloc[0]).unlink()
    r = run_objects(world_objects, root=root)
    assert failed_objects_checks(r) == {"the object's label map exists and decodes"}, r.message()
    assert not r.families["objects"]


def test_images_without_their_distractors_fail_the_world_count(world_objects):
    """A synthetic world draws world.distractors.min_count to max_count distractors an image; a placement that
    loses them (the retries that once landed off the image) leaves images with none, which the record alone
    cannot tell from a world drawn so. A few images may lack one (covered whole by the concept)."""
    r0, tuples, negatives, obj = world_objects
    lo_hi = (1, 3)
    ok = validate_tuples(tuples, negatives, r0, CFG, SPLIT, objects=obj, distractors=lo_hi)
    assert ok.families["objects"], ok.message()
    assert ok.params["distractors"] == [1, 3]
    n = len(tuples["query_image"].unique()) + len(tuples["train_image"].unique())
    assert n == 30  # so all but 2 of them: 93 %
    described = "at least 93% of tuple images show 1 to 3 distractors (world.distractors)"
    assert described in {c.description for c in ok.checks}
    assert described not in {c.description for c in validate_tuples(tuples, negatives, r0, CFG, SPLIT, objects=obj).checks}
    images = sorted(set(obj.loc[obj["role"] == "distractor", "image"]))
    assert len(images) >= 20
    stripped = obj[~(obj["image"].isin(images[::4]) & (obj["role"] == "distractor"))]  # a quarter lose theirs
    bad = validate_tuples(tuples, negatives, r0, CFG, SPLIT, objects=stripped, distractors=lo_hi)
    assert failed_objects_checks(bad) == {described}, bad.message()
    three = validate_tuples(tuples, negatives, r0, CFG, SPLIT, objects=obj, distractors=(3, 3))
    assert failed_objects_checks(three) == {described.replace("1 to 3", "3 to 3")}, three.message()
