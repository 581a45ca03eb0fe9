import json
import os

import pytest

from ardetect import tracking


def test_parent_and_child_runs(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    with tracking.pipeline_run("exp-test", uri, run_name="pipeline [smoke]") as parent:
        assert os.environ[tracking.PARENT_ENV] == parent.info.run_id
        with tracking.stage_run("tuples", "exp-test", uri, params={"tuples": {"split": {"train": 0.8}}, "x": None}):
            tracking.log_metrics({"tuples": 40, "per": {"train": 32}, "flag": True})
    assert tracking.PARENT_ENV not in os.environ
    runs = tracking.find_runs("exp-test", uri)
    assert len(runs) == 2
    child = runs[runs["tags.ard.stage"] == "tuples"].iloc[0]
    assert child["tags.mlflow.parentRunId"] == parent.info.run_id
    assert child["params.tuples.split.train"] == "0.8" and child["params.x"] == "null"
    assert child["metrics.tuples"] == 40 and child["metrics.per.train"] == 32
    assert "metrics.flag" not in runs.columns  # booleans are not metrics


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.tracking_uri("sqlite:////x.db", tmp_path) == "sqlite:////x.db"
    # a relative sqlite path in params.yaml is the root's, from whichever folder; other URIs are kept as given
    assert tracking.tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.tracking_uri("sqlite:///runs/m.db?timeout=30", tmp_path) == f"sqlite:///{tmp_path / 'runs/m.db'}?timeout=30"
    for kept in ("sqlite:///:memory:", "http://localhost:5000", "databricks"):
        assert tracking.tracking_uri(kept, tmp_path) == kept
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////env.db")
    assert tracking.tracking_uri("sqlite:////x.db", tmp_path) == "sqlite:////env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")  # the caller's own: relative to the working directory
    assert tracking.tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///env.db"


def test_the_store_and_the_cli_find_the_same_repository_root(tmp_path, monkeypatch):
    """One rule for both: params.yaml here, else the nearest folder above with params.yaml beside dvc.yaml.
    A folder that holds only a dvc.yaml (or a params.yaml) is not taken for the root from below it."""
    from ardetect.cli import _params_file

    repo = tmp_path / "repo"
    (repo / "data" / "only_dvc" / "deep").mkdir(parents=True)
    (repo / "notes" / "draft").mkdir(parents=True)
    for f in ("params.yaml", "dvc.yaml"):
        (repo / f).write_text("{}\n")
    (repo / "data" / "only_dvc" / "dvc.yaml").write_text("{}\n")  # a nested DVC project's file, no params.yaml
    (repo / "notes" / "params.yaml").write_text("{}\n")  # a stray params.yaml, no dvc.yaml beside it
    for where, root in [
        (repo, repo),
        (repo / "data" / "only_dvc" / "deep", repo),
        (repo / "notes", repo / "notes"),  # params.yaml in the working directory is taken as given
        (repo / "notes" / "draft", repo),
    ]:
        monkeypatch.chdir(where)
        assert tracking.repo_root() == root, where
        assert _params_file(None).resolve() == root / "params.yaml", where
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert tracking.tracking_uri(None, tracking.repo_root()) == f"sqlite:///{root / 'mlflow.db'}"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    monkeypatch.chdir(outside)
    assert tracking.find_root() is None and tracking.repo_root() == outside.resolve()


def test_write_json_atomic_leaves_no_temp(tmp_path):
    p = tracking.write_json_atomic({"a": 1}, tmp_path / "s.json")
    assert json.loads(p.read_text()) == {"a": 1} and [f.name for f in tmp_path.iterdir()] == ["s.json"]


def test_pipeline_run_logs_the_config_as_params_and_tags(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    params = {"profile": "smoke", "world": {"seed": 3, "base_classes": ["cat", "dog"]}, "evaluate": {"max_queries": None}}
    params.update({f"extra{i}": {"v": i} for i in range(150)})  # more than one MLflow batch of 100
    with tracking.pipeline_run("exp-p", uri, run_name="pipeline [smoke]", params=params) as parent:
        tracking.set_tags({"ard.stages_ran": "a,b", "ard.flag": True})
    run = tracking.get_run(uri, parent.info.run_id)
    assert run.data.params["world.seed"] == "3" and run.data.params["world.base_classes"] == '["cat", "dog"]'
    assert run.data.params["evaluate.max_queries"] == "null" and run.data.params["extra149.v"] == "149"
    assert len(run.data.params) == 4 + 150
    assert run.data.tags["ard.kind"] == "pipeline" and run.data.tags["ard.stages_ran"] == "a,b"
    assert run.data.tags["ard.flag"] == "True"


def test_resolve_run_by_prefix(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    ids = []
    while True:  # runs until two share a first character (16 hex digits: at most 17 runs)
        with tracking.pipeline_run("exp-r", uri) as run:
            ids.append(run.info.run_id)
        shared = [c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) > 1]
        if shared:
            break
    for run_id in ids:
        assert tracking.resolve_run("exp-r", uri, run_id) == run_id
        assert tracking.resolve_run("exp-r", uri, run_id[:12].upper()) == run_id
    with pytest.raises(tracking.RunNotFound, match="ambiguous"):
        tracking.resolve_run("exp-r", uri, shared[0])
    with pytest.raises(tracking.RunNotFound, match="'zz'"):
        tracking.resolve_run("exp-r", uri, "zz")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_is_named_at_once(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time
    from pathlib import Path

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    with pytest.raises(tracking.TrackingUnreachable, match=rf"the MLflow tracking server {uri} \(tracking.tracking_uri\) does not answer"):
        with tracking.stage_run("tuples", "exp-test", uri):
            pass
    assert time.perf_counter() - start < 10  # not MLflow's minutes of retries
    # a stage process: a one-line message and exit 1, before any work
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "params.yaml").write_text((repo / "params.yaml").read_text())
    (tmp_path / "profiles").symlink_to(repo / "profiles")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(repo / "src")}
    run = subprocess.run([sys.executable, "-m", "ardetect.stages.tuples"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert f"[tuples] FAILED: the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "data").exists()


def test_a_tracking_server_that_answers_passes_the_check():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}")
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}/prefix")  # a 404 is an answer too
    finally:
        server.shutdown()
    tracking.check_reachable("sqlite:////nowhere/mlflow.db")  # nothing to reach


def test_pipeline_run_refuses_an_unreachable_tracking_server_before_any_stage(tmp_path, monkeypatch):
    from pathlib import Path

    from typer.testing import CliRunner

    import ardetect.pipeline as pipeline
    from ardetect.cli import app

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "params.yaml").write_text((repo / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text((repo / "dvc.yaml").read_text())
    (tmp_path / "profiles").symlink_to(repo / "profiles")
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = []
    monkeypatch.setattr(pipeline, "repro_with_retries", lambda *a, **k: started.append(a))
    result = CliRunner().invoke(app, ["pipeline", "run", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2 and not started
    assert f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer" in result.output


def _stage_dir(tmp_path, profile: str = "smoke"):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "params.yaml").write_text((repo / "params.yaml").read_text().replace("profile: default", f"profile: {profile}", 1))
    (tmp_path / "profiles").symlink_to(repo / "profiles")
    return repo


@pytest.mark.slow
def test_tracking_off_runs_a_stage_without_mlflow_and_a_bad_value_is_refused(tmp_path):
    import subprocess
    import sys

    import pandas as pd

    repo = _stage_dir(tmp_path)
    uri = f"http://127.0.0.1:{_closed_port()}"  # a stage that tracked would stop at once on it
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(repo / "src"), tracking.TRACKING_ENV: "maybe"}
    cmd = [sys.executable, "-m", "ardetect.stages.exemplars"]
    bad = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "[exemplars] FAILED: ARD_TRACKING='maybe': use 'on' or 'off'" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "data").exists()
    run = subprocess.run(cmd, cwd=tmp_path, env={**env, tracking.TRACKING_ENV: "off"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(pd.read_parquet(tmp_path / "data" / "exemplars" / "exemplars.parquet")) == 20  # the smoke world's concepts
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_pipeline_run_refuses_tracking_off_before_any_stage(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import ardetect.pipeline as pipeline
    from ardetect.cli import app

    repo = _stage_dir(tmp_path, "default")
    (tmp_path / "dvc.yaml").write_text((repo / "dvc.yaml").read_text())
    monkeypatch.setenv(tracking.TRACKING_ENV, "off")
    started = []
    monkeypatch.setattr(pipeline, "repro_with_retries", lambda *a, **k: started.append(a))
    result = CliRunner().invoke(app, ["pipeline", "run", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2 and not started
    assert "ARD_TRACKING=off, but ard pipeline run records every run to MLflow" in result.output
    monkeypatch.setenv(tracking.TRACKING_ENV, "on")
    with tracking.stage_run("tuples", "exp-test", f"sqlite:///{tmp_path / 'mlflow.db'}") as run:  # on: it tracks again
        assert run is not None


def test_a_new_experiments_artifacts_sit_beside_its_sqlite_database_wherever_the_command_runs(tmp_path, monkeypatch):
    """MLflow puts a new experiment's artifacts in ``mlruns`` of the folder the process ran in; a command run from a
    subfolder (or a test run from the checkout) scattered them there. They go beside the database file."""
    db_folder, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    db_folder.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    uri = f"sqlite:///{db_folder / 'mlflow.db'}"
    (tmp_path / "note.txt").write_text("kept")
    with tracking.stage_run("tuples", "exp-where", uri) as run:
        tracking.log_artifact(tmp_path / "note.txt", "notes")
    assert (db_folder / "mlruns").is_dir() and not (elsewhere / "mlruns").exists()
    logged = list((db_folder / "mlruns").rglob("note.txt"))
    assert len(logged) == 1 and logged[0].read_text() == "kept" and run.info.run_id in logged[0].parts
    # a relative database path is the folder the command runs in, as SQLAlchemy opens it
    monkeypatch.chdir(db_folder)
    assert tracking.artifact_location("sqlite:///mlflow.db") == (db_folder / "mlruns").as_uri()
    assert tracking.artifact_location("http://127.0.0.1:5000") is None  # a server decides for itself


def test_an_experiment_made_before_keeps_its_own_artifact_folder(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("exp-old", artifact_location=(tmp_path / "theirs").as_uri())
    with tracking.stage_run("tuples", "exp-old", uri):
        tracking.log_dict({"a": 1}, "a.json")
    assert list((tmp_path / "theirs").rglob("a.json")) and not (tmp_path / "mlruns").exists()
