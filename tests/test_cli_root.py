"""`ard` run from a folder inside the repository finds its params.yaml above, as git and DVC find theirs (it used to
say "params file params.yaml not found", and `ard serve` made an empty MLflow store in that folder); outside any
repository the registry's default store is not made where the command happens to run."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import ardetect.cli as cli
from ardetect.cli import app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository (params.yaml beside dvc.yaml) with a folder two levels down; the default tracking store."""
    root = tmp_path / "repo"
    (root / "reports" / "deep").mkdir(parents=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["world"]["seed"] = 11  # told apart from any other params file
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    (root / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(cli, "_listening_socket", lambda host, port: socket.socket())  # no port is bound
    return root


def test_config_show_from_a_folder_inside_the_repository(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(repo / "reports" / "deep")
    shown = CliRunner().invoke(app, ["config", "show"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["world"]["seed"] == 11
    # a params.yaml with no dvc.yaml beside it is not taken for a repository's
    loose = tmp_path / "loose"
    (loose / "sub").mkdir(parents=True)
    (loose / "params.yaml").write_text((repo / "params.yaml").read_text())
    monkeypatch.chdir(loose / "sub")
    refused = CliRunner().invoke(app, ["config", "show"])
    assert refused.exit_code == 2 and "params file params.yaml not found" in refused.output, refused.output
    # a --params given is taken as it is, relative to the working directory
    given = CliRunner().invoke(app, ["config", "show", "--params", "../params.yaml"])
    assert given.exit_code == 0 and json.loads(given.stdout)["world"]["seed"] == 11, given.output


def test_serve_from_a_folder_inside_the_repository_uses_its_store(repo, monkeypatch):
    monkeypatch.chdir(repo / "reports")
    served = CliRunner().invoke(app, ["serve"])
    assert served.exit_code == 1
    assert f"there is no MLflow store at {repo / 'mlflow.db'}" in served.output, served.output
    assert not (repo / "reports" / "mlflow.db").exists() and not (repo / "mlflow.db").exists()


def test_serve_outside_any_repository_makes_no_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(cli, "_listening_socket", lambda host, port: socket.socket())
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    served = CliRunner().invoke(app, ["serve"])
    assert served.exit_code == 1
    assert f"there is no MLflow store at {here / 'mlflow.db'}" in served.output and "give an export folder" in served.output
    assert list(here.iterdir()) == []  # MLflow used to make mlflow.db here, then find no model in it


def test_export_defaults_are_at_the_repository_root(repo, monkeypatch):
    monkeypatch.chdir(repo / "reports" / "deep")
    done = CliRunner().invoke(app, ["export", "--phase2", "model.pt", "--out", "out"])
    assert done.exit_code == 1
    assert f"{repo / 'reports' / 'details.json'} not found" in done.output, done.output
    (repo / "reports" / "details.json").write_text(json.dumps({"identity_fit": {"ARD": {"weight": 3, "grid": 2}}}))
    done = CliRunner().invoke(app, ["export", "--phase2", "model.pt", "--out", "out"])
    assert done.exit_code == 1  # on to the tuples, read from the repository's data folder
    assert str(repo / "data" / "tuples" / "tuples.parquet") in done.output, done.output
    assert not (repo / "reports" / "deep" / "out").exists()


def test_a_registry_uri_over_an_absent_sqlite_store_is_refused_without_making_it(tmp_path):
    from ardetect.serve.loader import ModelNotFound, load_model

    store = tmp_path / "none" / "mlflow.db"
    store.parent.mkdir()
    with pytest.raises(ModelNotFound, match=f"there is no MLflow store at {store}"):
        load_model("models:/ardetect-detector@champion", tracking_uri=f"sqlite:///{store}")
    assert not store.exists()


def test_pipeline_run_refuses_a_params_file_the_stages_would_not_read(repo, monkeypatch):
    """The stages read params.yaml under DVC: `ard pipeline run --params exp.yaml` checked and logged exp.yaml's settings
    and ran params.yaml's."""
    (repo / "exp.yaml").write_text((repo / "params.yaml").read_text())
    monkeypatch.chdir(repo)
    refused = CliRunner().invoke(app, ["pipeline", "run", "--params", "exp.yaml"])
    assert refused.exit_code == 2
    assert "--params exp.yaml: the stages read params.yaml in the repository root" in refused.output, refused.output
    assert not (repo / "mlflow.db").exists()  # refused before any run


def test_pipeline_run_refuses_a_params_file_without_a_dvc_yaml_beside_it_and_makes_nothing(repo, tmp_path, monkeypatch):
    """It made the folder a git repository, then ended in a FileNotFoundError traceback for dvc.yaml."""
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "params.yaml").write_text((repo / "params.yaml").read_text())
    monkeypatch.chdir(repo)
    refused = CliRunner().invoke(app, ["pipeline", "run", "--params", str(lone / "params.yaml")])
    assert refused.exit_code == 2, refused.output
    assert f"no dvc.yaml beside it in {lone.resolve()}" in refused.output
    assert sorted(p.name for p in lone.iterdir()) == ["params.yaml"]  # no .git, no store, no lock


def test_a_relative_sqlite_store_in_params_is_the_roots_from_a_subfolder(repo, monkeypatch):
    """`cd reports && ard runs list` with `tracking_uri: sqlite:///mlflow.db` read reports/mlflow.db."""
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["tracking"]["tracking_uri"] = "sqlite:///runs.db"
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(repo / "reports" / "deep")
    uri = f"sqlite:///{repo.resolve() / 'runs.db'}"
    assert cli._serve_settings(None)[1] == uri
    listed = CliRunner().invoke(app, ["runs", "list"])
    assert listed.exit_code == 0 and "no pipeline runs yet" in listed.output, listed.output
    assert not (repo / "reports" / "deep" / "runs.db").exists() and not (repo / "runs.db").exists()  # read only: nothing made
    from ardetect import tracking

    with tracking.pipeline_run("ardetect", uri, run_name="pipeline [seen from below]", tags={}, params={"profile": "default"}) as run:
        pass
    listed = CliRunner().invoke(app, ["runs", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and run.info.run_id[:8] in listed.output, listed.output
    assert not (repo / "reports" / "deep" / "runs.db").exists()
