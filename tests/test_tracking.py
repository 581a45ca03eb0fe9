import os

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
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////env.db")
    assert tracking.tracking_uri("sqlite:////x.db", tmp_path) == "sqlite:////env.db"


def test_write_json_atomic_leaves_no_temp(tmp_path):
    p = tracking.write_json_atomic({"a": 1}, tmp_path / "s.json")
    assert p.read_text().strip().startswith("{") and [f.name for f in tmp_path.iterdir()] == ["s.json"]
