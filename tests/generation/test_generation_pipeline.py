"""The real path through DVC on the tiny profile: exemplars -> generate -> tuples -> validate from a fresh workspace."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from workspace import dvc, make_workspace


@pytest.mark.slow
def test_tiny_real_profile_passes_validate(tmp_path):
    ws = make_workspace(tmp_path / "repo", profile="default")
    dvc(ws, "exp", "run", "-S", "profile=tiny_real", "validate")
    ex = pd.read_parquet(ws / "data/exemplars/exemplars.parquet")
    gen = pd.read_parquet(ws / "data/generated/generated.parquet")
    tuples = pd.read_parquet(ws / "data/tuples/tuples.parquet")
    assert len(ex) == 8 and set(ex["source"]) == {"coco"}
    assert set(gen["backend"]) == {"break_a_scene"} and len(gen) >= 12
    assert set(tuples["generator"]) == {"break_a_scene"} and set(tuples["split"]) == {"train", "val", "test"}
    skipped = json.loads((ws / "data/exemplars/skipped.json").read_text())
    drops = json.loads((ws / "data/generated/drops.json").read_text())
    assert len(ex) + len(skipped["skipped"]) == 8 and len(gen) + len(drops["drops"]) == 3 * len(ex)
    report = (ws / "data/validation/report.md").read_text()
    assert "FAILED" not in report.upper().split("\n", 3)[0] and "objects" in report
    # every generated image detected a second time, by its final path: the gate held each R_Q against it
    det = pd.read_parquet(ws / "data/generated/detections.parquet")
    assert set(det["image"]) == set(gen["image"]) and (det["score"] > 0).all()
    assert "box_covers_object" in report
    import mlflow  # the generate stage's run holds one child run per batch of exemplars

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ardetect"], filter_string="tags.`ard.kind` = 'generate_batch'",
                              output_format="list")
    assert len(runs) == 1 and runs[0].data.metrics["exemplars"] == 8
    assert runs[0].data.metrics["kept"] == len(gen) and runs[0].data.metrics["seconds_customize_joint"] > 0
