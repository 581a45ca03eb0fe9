"""The ``world2`` stage: a second world, all test, that passes the main world's quality gate before it is written."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from ardetect.config import config_from_dict
from ardetect.stages import world2 as stage
from ardetect.stages.common import StageError

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

SMALL = {"world": {"image_size": 96, "workers": 1},
         "evaluate": {"generalisation_concepts": 12, "generalisation_queries_per_concept": 2, "generalisation_block": 6}}


def test_world2_is_checked_and_its_distractors_name_no_concept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = stage.build(config_from_dict(SMALL))
    root = tmp_path / "data" / "world2"
    checks = json.loads((root / "checks.json").read_text())
    assert checks["success"] is True and out["expectations"] == checks["expectations"] > 100
    objects = pd.read_parquet(root / "objects.parquet")
    distractors = objects[objects["role"] == "distractor"]
    assert len(distractors) >= 24 and distractors["concept_id"].isna().all()  # they read "w2_nan" before
    concepts = objects[objects["role"] == "concept"]
    assert concepts["concept_id"].str.fullmatch(r"w2_c\d{5}").all()
    tuples = pd.read_parquet(root / "tuples.parquet")
    negatives = pd.read_parquet(root / "negatives.parquet")
    assert len(tuples) == 24 and set(tuples["split"]) == {"test"}
    for path in [*tuples["query_image"], *tuples["train_image"], *negatives["neg_image"], *objects["mask"]]:
        assert path.startswith("world2/") and (tmp_path / "data" / path).is_file(), path  # written where the rows say
    assert not list((tmp_path / "data").glob(".world2*"))


def test_a_world2_that_fails_the_gate_is_not_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flat = config_from_dict({**SMALL, "validate": {"min_pixel_std": 250.0}})  # no image spreads its pixels that far
    with pytest.raises(StageError, match=r"world2 failed its quality gate(.|\n)*image_content"):
        stage.build(flat)
    assert not (tmp_path / "data" / "world2").exists() and not list((tmp_path / "data").glob(".world2*"))
