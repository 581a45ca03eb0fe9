"""The registry: champion moves only on a better test Recall@10; `ard models list` and `promote`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ardetect import tracking
from ardetect.cli import app
from ardetect.export.registry import RegistryError, list_versions, log_and_register, promote

pytestmark = pytest.mark.slow


def register(folder, uri, value):
    import mlflow

    tracking.use_experiment(uri, "registry-test")
    with mlflow.start_run() as run:
        reg = log_and_register(folder, uri, {"test_recall_at_10": value, "test_paper_recall_at_10": value / 2}, name="det")
    return reg, run.info.run_id


def test_champion_moves_only_on_improvement(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"made_up": True}))  # the alias rule never reads the graphs
    first, _ = register(folder, uri, 0.50)
    assert (first.version, first.alias) == ("1", "champion") and "first version" in first.reason
    second, run2 = register(folder, uri, 0.40)
    assert (second.version, second.alias) == ("2", "challenger")
    assert "0.4000 <= champion v1's 0.5000" in second.reason
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias("det", "champion").version) == "1"
    assert mlflow.get_run(run2).data.tags["ard.alias_reason"] == second.reason  # the run records why
    assert client.get_model_version("det", "2").tags["ard.alias_reason"] == second.reason
    equal, _ = register(folder, uri, 0.50)  # not higher: stays challenger
    assert equal.alias == "challenger"
    third, _ = register(folder, uri, 0.61)
    assert third.alias == "champion" and str(client.get_model_version_by_alias("det", "champion").version) == "4"
    table = list_versions(uri, "det")
    assert list(table["version"]) == [4, 3, 2, 1]
    assert dict(zip(table["version"], table["aliases"]))[4] == "champion"
    assert dict(zip(table["version"], table["test_recall_at_10"]))[2] == "0.4"
    # by hand
    assert "champion was v4" in promote(uri, "2", "det")
    assert str(client.get_model_version_by_alias("det", "champion").version) == "2"
    with pytest.raises(RegistryError, match="no version '9'"):
        promote(uri, "9", "det")
    with pytest.raises(RegistryError, match="no registered model 'other'"):
        list_versions(uri, "other")
    # the CLI over the same store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runner = CliRunner()
    shown = runner.invoke(app, ["models", "list", "--name", "det"])
    assert shown.exit_code == 0, shown.output
    assert "champion" in shown.output and "challenger" in shown.output and "0.61" in shown.output
    moved = runner.invoke(app, ["models", "promote", "4", "--name", "det"])
    assert moved.exit_code == 0 and "version 4 is champion" in moved.output
    assert str(client.get_model_version_by_alias("det", "champion").version) == "4"
    bad = runner.invoke(app, ["models", "promote", "77", "--name", "det"])
    assert bad.exit_code == 1 and "no version '77'" in bad.output


def test_registered_model_ranks_like_the_export(trained, tmp_path):
    """The pyfunc model of a real export, with its signature and input example, ranks a query's candidates."""
    import mlflow

    from ardetect.export.build import ExportOptions, build_export

    tuples, negatives, root, p1, p2 = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.use_experiment(uri, "registry-test")
    with mlflow.start_run():
        done = build_export(p2, tmp_path / "det-export", ExportOptions(5.0, 2, 3, parity_queries=2, fp16=False, int8=False), tuples=tuples,
                            negatives=negatives, data_root=root, metrics={"test_recall_at_10": 0.3}, register=True, uri=uri, model_name="det")
    reg = done["registration"]
    assert reg.alias == "champion"
    model = mlflow.pyfunc.load_model("models:/det@champion")
    assert model.metadata.signature is not None
    assert {"query_image", "candidates", "prompt"} <= set(model.metadata.signature.inputs.input_names())
    from ardetect.export.build import input_example

    example = input_example(tuples, negatives, root)
    out = model.predict(example)
    assert list(out["rank"]) == [1, 2] and set(out["candidate"]) == set(example.iloc[0]["candidates"])
    assert (out["score"].diff().dropna() <= 0).all()  # ranked by score
    # each row's score is its own candidate's: the export scores each candidate alone to the same value
    import numpy as np

    from ardetect.export.runtime import OnnxDetector, prepare_image

    det, q = OnnxDetector(tmp_path / "det-export"), example.iloc[0]
    query = det.encode_query(q["query_image"], [q["x0"], q["y0"], q["x1"], q["y1"]], q["prompt"], q["concept_phrase"])
    for r in out.itertuples(index=False):
        image, size = prepare_image(r.candidate, det.size)
        alone = det.score(det.encode_images(image[None]), query, np.array([size]))["scores"][0]
        assert abs(r.score - float(alone)) < 1e-5, (r.candidate, r.score, alone)
    assert out["score"].iloc[0] != out["score"].iloc[1]  # two different scores: swapping the candidates would show
    from PIL import Image

    for r in out.itertuples(index=False):  # each region in its candidate, as the service answers
        with Image.open(r.candidate) as im:
            assert 0 <= r.x0 < r.x1 <= im.width and 0 <= r.y0 < r.y1 <= im.height, r
    # the logged folder is named "export", not after the build's temporary folder
    logged = Path(mlflow.artifacts.download_artifacts("models:/det@champion", dst_path=str(tmp_path / "logged")))
    assert [p.name for p in (logged / "artifacts").iterdir()] == ["export"]
    assert (logged / "artifacts" / "export" / "manifest.json").is_file()
    # the model is code MLflow runs (ours), not a pickled object whose loading runs whatever it holds
    assert (logged / "pyfunc_code.py").is_file() and not list(logged.glob("*.pkl")), sorted(p.name for p in logged.iterdir())
