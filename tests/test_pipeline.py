"""End to end on the smoke profile: DVC stages, up-to-date checks, MLflow runs, failure handling."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from ardetect import tracking
from ardetect.stages import STAGES

from workspace import BIN, dvc, make_workspace, run_env

pytestmark = pytest.mark.slow


def ard(ws, *args, check=True):
    proc = subprocess.run([str(BIN / "ard"), *args], cwd=ws, env=run_env(ws), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"ard {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    """A smoke workspace run twice through `ard pipeline run`."""
    ws = make_workspace(tmp_path_factory.mktemp("pipe") / "repo")
    first = ard(ws, "pipeline", "run")
    second = ard(ws, "pipeline", "run")
    return ws, first, second


def test_pipeline_outputs_and_up_to_date(piped):
    ws, first, second = piped
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    t = pd.read_parquet(ws / "data/tuples/tuples.parquet")
    assert len(t) == 20 * 2 and set(t["split"]) == {"train", "val", "test"}
    assert (ws / "data/tuples/gallery.png").stat().st_size > 10_000
    assert (ws / "data/validation/report.md").is_file()
    status = dvc(ws, "status")
    assert "up to date" in status.stdout, status.stdout
    assert "Running stage" not in second.stdout
    assert "stages run: none (all up to date)" in second.stdout
    metrics = json.loads((ws / "reports/metrics.json").read_text())
    for world in ("test", "world2"):
        for method in ("ARD", "ARD-", "AbC", "chance", "ARD paper score", "ARD- paper score"):
            assert 0.0 <= metrics[world][method]["class_rprecision"] <= 1.0, (world, method)
    # the identity weight and pooling grid of each detector are fitted on the val split, from the params' grids
    weights = {"0", "1", "2", "5", "10", "20"}
    for name in ("ARD", "ARD-"):
        fit = metrics["identity_fit"][name]
        by_grid = fit["val_recall@10"]
        assert set(by_grid) == {"1x1", "2x2", "3x3", "4x4"} and set(by_grid["1x1"]) == weights
        assert all(set(by_grid[f"{g}x{g}"]) == weights - {"0"} for g in (2, 3, 4))
        assert fit["grid"] in (1, 2, 3, 4) and f"{fit['weight']:g}" in by_grid[f"{fit['grid']}x{fit['grid']}"]
        best = max(r for rs in by_grid.values() for r in rs.values())
        assert by_grid[f"{fit['grid']}x{fit['grid']}"][f"{fit['weight']:g}"] == best
        if fit["weight"] == 0:  # the paper's score: the two rows are the same ranking
            assert metrics["test"][name]["recall@10"] == metrics["test"][name + " paper score"]["recall@10"]
    report = (ws / "reports/results.md").read_text()
    assert "class_rprecision" in report and "Identity weight and pooling grid, fitted on" in report


def test_mlflow_parent_and_children(piped):
    ws, _, _ = piped
    runs = tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}")
    parents = runs[runs["tags.ard.kind"] == "pipeline"]
    assert len(parents) == 2  # one per execution
    first_parent = parents.sort_values("start_time").iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == first_parent["run_id"]]
    assert sorted(children["tags.ard.stage"]) == sorted(STAGES)
    assert first_parent["metrics.stages_run"] == len(STAGES)
    by_stage = children.set_index("tags.ard.stage")
    assert by_stage.loc["exemplars", "params.world.n_concepts"] == "20"
    assert by_stage.loc["exemplars", "params.profile"] == "smoke"
    assert by_stage.loc["exemplars", "metrics.exemplars"] == 20
    assert by_stage.loc["tuples", "metrics.tuples"] == 40
    assert by_stage.loc["tuples", "metrics.concepts_test"] >= 1
    assert by_stage.loc["validate", "metrics.success"] == 1.0
    assert (by_stage["status"] == "FINISHED").all()
    # the second execution ran no stage: its parent has no children
    second_parent = parents.sort_values("start_time").iloc[1]
    assert (runs["tags.mlflow.parentRunId"] == second_parent["run_id"]).sum() == 0
    assert second_parent["metrics.stages_run"] == 0


def _copy_ws(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_corrupted_box_fails_validate_and_touches_nothing(piped, tmp_path):
    ws = _copy_ws(piped[0], tmp_path / "repo")
    path = ws / "data/tuples/tuples.parquet"
    t = pd.read_parquet(path)
    bad_id = t["tuple_id"].iloc[3]
    t.at[3, "query_box"] = [50.0, 40.0, 10.0, 80.0]  # x1 < x0
    t.to_parquet(path, index=False)
    before = {p: digest(p) for p in (ws / "data").rglob("*") if p.is_file() and "validation" not in p.parts}
    proc = dvc(ws, "repro", "--downstream", "validate", check=False)
    assert proc.returncode != 0
    assert bad_id in proc.stdout + proc.stderr
    assert "box_ordered" in proc.stdout + proc.stderr
    after = {p: digest(p) for p in (ws / "data").rglob("*") if p.is_file() and "validation" not in p.parts}
    assert before == after  # earlier outputs untouched
    report = (ws / "data/validation/report.md").read_text()
    assert bad_id in report


def test_deleted_image_fails_validate_naming_it(piped, tmp_path):
    ws = _copy_ws(piped[0], tmp_path / "repo")
    t = pd.read_parquet(ws / "data/tuples/tuples.parquet")
    victim = t["query_image"].iloc[5]
    target = ws / "data" / victim
    target.unlink()
    proc = dvc(ws, "repro", "--downstream", "validate", check=False)
    assert proc.returncode != 0
    assert victim in proc.stdout + proc.stderr
    assert not target.exists()


def test_bad_param_stops_before_any_stage(tmp_path):
    # a key the smoke overlay does not set (the overlay wins over params.yaml)
    ws = make_workspace(tmp_path / "repo", overrides={"world.identity_drift": 5.0})
    proc = ard(ws, "pipeline", "run", check=False)
    assert proc.returncode != 0
    assert "world.identity_drift" in proc.stdout + proc.stderr
    assert not (ws / "data/exemplars").exists()


def test_prefect_flow_runs_stages_once_then_nothing(tmp_path):
    ws = make_workspace(tmp_path / "repo")
    env = run_env(ws)
    cmd = [sys.executable, "flows/pipeline.py"]
    first = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    log = first.stdout + first.stderr
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log
    assert "Finished in state Completed" in log
    assert "up to date" in dvc(ws, "status").stdout
    runs = tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}")
    parent = runs[runs["tags.ard.kind"] == "pipeline"]
    assert len(parent) == 1 and parent.iloc[0]["tags.ard.orchestrator"] == "prefect"
    assert (runs["tags.mlflow.parentRunId"] == parent.iloc[0]["run_id"]).sum() == len(STAGES)
    second = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Running stage" not in second.stdout + second.stderr  # DVC found everything up to date
    assert "Finished in state Completed" in second.stdout + second.stderr


def test_dvc_experiment_with_another_world_seed(piped, tmp_path):
    ws = _copy_ws(piped[0], tmp_path / "repo")
    proc = dvc(ws, "exp", "run", "-S", "world.seed=3", "--name", "seed3")
    assert "Running stage 'exemplars'" in proc.stdout  # the world changed, so its stages re-ran
    shown = dvc(ws, "exp", "show", "--csv").stdout
    row = next(line for line in shown.splitlines() if "seed3" in line)
    header = shown.splitlines()[0].split(",")
    assert row.split(",")[header.index("world.seed")] == "3"
