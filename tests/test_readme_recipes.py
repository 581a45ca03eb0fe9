"""Every `dvc exp run` recipe in the user guides' code blocks (README.md, docs/real_path.md) gives a valid configuration and detector config.

Each command's ``-S`` overrides are applied to a copy of ``params.yaml`` by DVC's own Hydra override
code (what ``dvc exp run -S`` does), then the result is loaded as the stages load it and the detector's
``ModelConfig`` is built (a size, its overrides and the input side checked together).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from ardetect.config import load_config
from ardetect.train.phases import model_config

REPO = Path(__file__).resolve().parents[1]
GUIDES = ("README.md", "docs/real_path.md")  # docs/research.md keeps the commands of their day


def recipes() -> list[list[str]]:
    text = "\n".join((REPO / name).read_text() for name in GUIDES)
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            if "dvc exp run" not in line:
                continue
            words = shlex.split(line.replace("$s", "1"), comments=True)  # the seeds' loop variable
            found.append([words[i + 1] for i, w in enumerate(words) if w in ("-S", "--set-param")])
    return found


def test_the_readme_has_recipes():
    found = recipes()
    assert len(found) >= 3 and all(found)
    assert any(any(o.startswith(("model.size=", "++model.size=")) for o in r) for r in found)  # the GPU recipe


@pytest.mark.parametrize("overrides", recipes(), ids=lambda r: " ".join(r)[:80])
def test_readme_recipe_is_a_valid_configuration(overrides, tmp_path):
    from dvc.utils.hydra import apply_overrides

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    apply_overrides(tmp_path / "params.yaml", overrides)
    cfg = load_config(tmp_path / "params.yaml")
    for o in overrides:  # each setting arrived as written
        key, _, value = o.lstrip("+").partition("=")
        node = cfg
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        assert same(node, yaml.safe_load(value)), (o, node)
    model_config(cfg)  # raises on a size, overrides and image size that do not fit together


def same(node, value) -> bool:
    if isinstance(value, list):
        return len(node) == len(value) and all(same(a, b) for a, b in zip(node, value))
    if value is None or isinstance(value, (bool, str)):
        return node == value
    return float(node) == float(value)


def test_a_recipe_that_does_not_fit_is_refused(tmp_path):
    """The check above can fail: the paper's 900 queries do not fit the world's 160 px."""
    from dvc.utils.hydra import apply_overrides

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    apply_overrides(tmp_path / "params.yaml", ["model.size=T-B", "model.image_size=null"])
    with pytest.raises(ValueError, match="num_queries=900 exceeds the 534 encoder tokens"):
        model_config(load_config(tmp_path / "params.yaml"))


def test_pipeline_run_refuses_a_model_that_does_not_fit_before_any_stage(tmp_path, monkeypatch):
    """`ard pipeline run` checks the detector's config first: no stage (and no MLflow run) starts."""
    from dvc.utils.hydra import apply_overrides
    from typer.testing import CliRunner

    import ardetect.pipeline as pipeline
    from ardetect.cli import app
    from ardetect.stages.check import preflight

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    apply_overrides(tmp_path / "params.yaml", ["model.size=T-B", "model.image_size=null"])
    started = []
    monkeypatch.setattr(pipeline, "repro_with_retries", lambda *a, **k: started.append(a))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = CliRunner().invoke(app, ["pipeline", "run", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2 and not started and not (tmp_path / "mlflow.db").exists()
    assert "size='T-B'" in result.output and "num_queries=900 exceeds the 534 encoder tokens of image_size=[160, 160]" in result.output
    assert "input_value" not in result.output  # the message, not pydantic's dump of the inputs
    # the same settings with the README's num_queries pass the check
    apply_overrides(tmp_path / "params.yaml", ["++model.overrides.num_queries=300"])
    preflight(load_config(tmp_path / "params.yaml"))
