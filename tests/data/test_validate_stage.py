"""The ``validate`` stage: on a clean world it writes its report, Data Docs and exclusions and logs
them; on each content fault it fails (so nothing downstream runs) and leaves the earlier outputs as
they were."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ardetect import tracking
from ardetect.config import config_from_dict
from ardetect.data.schema import EXCLUSION_COLUMNS, write_parquet_atomic
from ardetect.stages import validate as stage
from ardetect.stages.common import StageError

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

CFG = config_from_dict({"tuples": {"split": {"train": 0.6, "val": 0.2, "test": 0.2}}})


@pytest.fixture
def workspace(world, tmp_path, monkeypatch):
    """The world laid out as the earlier stages write it, under ``data/``, with MLflow calls recorded."""
    w = world.copy(tmp_path / "data")
    is_exemplar = w.objects["image"].str.startswith("exemplars/")
    for table, path in ((w.exemplars, "exemplars/exemplars.parquet"), (w.objects[is_exemplar], "exemplars/objects.parquet"),
                        (w.generated, "generated/generated.parquet"), (w.objects[~is_exemplar], "generated/objects.parquet"),
                        (w.tuples, "tuples/tuples.parquet"), (w.negatives, "tuples/negatives.parquet")):
        write_parquet_atomic(table.reset_index(drop=True), w.root / path)
    monkeypatch.chdir(tmp_path)
    logged: list[str] = []
    monkeypatch.setattr(tracking, "log_artifact", lambda path, artifact_path=None: logged.append(f"{artifact_path}/{os.path.basename(path)}"))
    monkeypatch.setattr(tracking, "log_metrics", lambda metrics, step=None: logged.append(f"metrics:{sorted(metrics)}"))
    return w, logged


def digests(root) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file() and "validation" not in p.parts}


def test_clean_world_writes_report_data_docs_and_exclusions(workspace):
    w, logged = workspace
    out = stage.build(CFG)
    assert out["success"] == 1.0 and out["memorisation_events"] == 0.0
    v = w.root / "validation"
    assert {p.name for p in v.iterdir()} == {"report.md", "checks.json", "summary.json", "exclusions.parquet", "data_docs"}
    ex = pd.read_parquet(v / "exclusions.parquet")
    assert list(ex.columns) == list(EXCLUSION_COLUMNS) and ex.empty
    index = v / "data_docs" / "index.html"
    assert index.is_file()
    pages = [p.read_text() for p in (v / "data_docs" / "validations").rglob("*.html")]
    assert any("ardetect_object_images" in p for p in pages) and any("ardetect_image_boxes" in p for p in pages)
    assert "validation/data_docs/index.html" in logged and "validation/report.md" in logged
    assert any(x.startswith("metrics:") and "family_copies" in x for x in logged)


def _box_on_distractor(w) -> str:
    o = w.objects
    d = o[(o["role"] == "distractor") & (o["area"] >= 150) & o["image"].str.startswith("generated/")]
    t = pd.read_parquet(w.root / "tuples/tuples.parquet")
    g = pd.read_parquet(w.root / "generated/generated.parquet")
    for img, box in zip(d["image"], d["box"]):
        b = [float(v) for v in box]
        if min(b[2] - b[0], b[3] - b[1]) >= 10:
            i = int(np.flatnonzero(t["query_image"].to_numpy() == img)[0])
            t.at[i, "query_box"], g.at[int(np.flatnonzero(g["image"].to_numpy() == img)[0]), "box"] = b, b
            write_parquet_atomic(t, w.root / "tuples/tuples.parquet")
            write_parquet_atomic(g, w.root / "generated/generated.parquet")
            return t.at[i, "tuple_id"]
    raise AssertionError("no usable distractor")


def _other_prompt(w) -> str:
    t = pd.read_parquet(w.root / "tuples/tuples.parquet")
    t.loc[0, "prompt"] = t.loc[1, "prompt"]
    write_parquet_atomic(t, w.root / "tuples/tuples.parquet")
    return t.at[0, "tuple_id"]


def _blank(w) -> str:
    Image.new("RGB", (96, 96), (128, 128, 128)).save(w.root / w.tuples.at[3, "query_image"])
    return w.tuples.at[3, "tuple_id"]


def _duplicate(w) -> str:
    a, b = w.exemplars.at[0, "image"], w.exemplars.at[7, "image"]
    arr = np.asarray(Image.open(w.root / a).convert("RGB")).astype(int) + 2
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(w.root / b)
    return b


@pytest.mark.parametrize("plant, family", [(_box_on_distractor, "box_covers_object"), (_other_prompt, "records_agree"),
                                           (_blank, "image_content"), (_duplicate, "copies")],
                         ids=["box", "records", "blank", "duplicate"])
def test_each_content_fault_stops_the_stage_and_touches_nothing_before_it(workspace, plant, family):
    w, _ = workspace
    named = plant(w)
    before = digests(w.root)
    with pytest.raises(StageError, match=family):
        stage.build(CFG)
    assert digests(w.root) == before
    report = (w.root / "validation" / "report.md").read_text()
    assert "**Status: FAILED**" in report and named in report
    assert (w.root / "validation" / "data_docs" / "index.html").is_file()
    if family in ("box_covers_object", "records_agree"):  # the Data Docs name the failing tuple too
        pages = "".join(p.read_text() for p in (w.root / "validation" / "data_docs" / "validations").rglob("*.html"))
        assert named in pages


def test_real_path_without_second_detections_says_what_is_missing(workspace):
    cfg = config_from_dict({"exemplars": {"source": "coco"}, "generate": {"backend": "break_a_scene"}})
    with pytest.raises(StageError, match="detections.parquet does not exist.*detect_phrases"):
        stage.read_detections(cfg)
    assert stage.read_detections(CFG) is None


class _Reached(Exception):
    """Raised by a stand-in for a stage's training call, carrying the tuples it was given."""

    def __init__(self, tuples):
        super().__init__("training reached")
        self.tuples = tuples


@pytest.mark.parametrize("name, target, position", [
    ("pretrain", "ardetect.train.pretrain.run_pretrain", 2),
    ("train_phase1", "ardetect.train.phases.run_phase1", 1),
    ("train_phase2", "ardetect.train.phases.run_phase2", 2),
    ("train_abc", "ardetect.evaluation.abc.fit_abc", 1),
])
def test_training_stages_leave_out_the_excluded_tuples(workspace, monkeypatch, name, target, position):
    import importlib

    w, _ = workspace
    excluded = w.tuples["tuple_id"].iloc[[0, 5]].tolist()
    write_parquet_atomic(pd.DataFrame({"tuple_id": excluded, "reason": "memorisation", "detail": "planted"}),
                         w.root / "validation" / "exclusions.parquet")
    module, attr = target.rsplit(".", 1)

    def reached(*args, **kwargs):
        raise _Reached(args[position])

    monkeypatch.setattr(importlib.import_module(module), attr, reached)
    with pytest.raises(_Reached) as info:
        importlib.import_module(f"ardetect.stages.{name}").build(CFG)
    got = set(info.value.tuples["tuple_id"])
    assert got == set(w.tuples["tuple_id"]) - set(excluded)
