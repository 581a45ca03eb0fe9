"""bench/gpu_recipe.sh: the README's GPU recipe stage by stage without DVC or MLflow (run here on the smoke world, CPU)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from test_readme_recipes import recipes
from workspace import BIN, make_workspace

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_recipe.sh"


def _run(ws: Path, out: Path, *stages: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(BIN / "python"), "PYTHONPATH": str(ws / "src"), **env}
    return subprocess.run(["bash", str(SCRIPT), str(out), *stages], cwd=ws, env=env, capture_output=True, text=True, timeout=900)


def test_the_default_recipe_is_the_readmes():
    default = re.search(r'^RECIPE=\$\{RECIPE:-"(.*)"\}$', SCRIPT.read_text(), re.M).group(1).split()
    gpu = [r for r in recipes() if any(o.startswith("model.device=cuda") for o in r)]
    assert len(gpu) == 1, gpu
    assert sorted(o.removeprefix("++") for o in gpu[0]) == sorted(default)


@pytest.mark.slow
def test_the_stages_run_in_order_without_mlflow_and_params_yaml_is_put_back(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    before = (ws / "params.yaml").read_bytes()
    out = tmp_path / "out"
    run = _run(ws, out, "exemplars", "generate", "tuples", "validate", RECIPE="profile=smoke model.device=cpu pretrain.epochs=1",
               MLFLOW_TRACKING_URI="http://127.0.0.1:9")  # a stage that tracked would stop at once on it
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "recipe: profile=smoke model.device=cpu pretrain.epochs=1" in run.stdout
    rows = [line.split("\t") for line in (out / "times.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == ["exemplars", "generate", "tuples", "validate"] and all(r[1] == "0" for r in rows)
    assert (ws / "data" / "validation" / "summary.json").exists() and not (ws / "mlflow.db").exists()
    assert (ws / "params.yaml").read_bytes() == before  # put back after the run
    # a time budget: the next stage is not started; a finished one is not run again
    again = _run(ws, out, "exemplars", "world2", RECIPE="profile=smoke model.device=cpu pretrain.epochs=1", STOP_AFTER_S="0")
    assert again.returncode == 0 and "== world2: not started, 0 s spent" in again.stdout
    assert "== exemplars: done in an earlier call" in again.stdout  # a second call goes on where the first stopped
    other = _run(ws, out, "world2", RECIPE="profile=smoke model.device=cpu pretrain.epochs=2")
    assert other.returncode == 1 and "holds a run of another recipe" in other.stderr  # its finished stages are not this one's
    assert (ws / "params.yaml").read_bytes() == before


def test_a_setting_the_configuration_refuses_stops_before_any_stage(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    before = (ws / "params.yaml").read_bytes()
    run = _run(ws, tmp_path / "out", "exemplars", RECIPE="profile=smoke model.device=gpu0")
    assert run.returncode == 1 and "model.device" in run.stderr and "gpu0" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "out" / "times.tsv").exists() and not (ws / "data" / "exemplars").exists()
    assert (ws / "params.yaml").read_bytes() == before
    bad = _run(ws, tmp_path / "out", "exemplars", RECIPE="model.size")
    assert bad.returncode == 1 and "RECIPE: 'model.size' is not key=value" in bad.stderr
    assert (ws / "params.yaml").read_bytes() == before


def test_a_call_killed_outright_does_not_cost_the_users_params_yaml(tmp_path):
    """kill -9 (or the machine taken back) runs no trap: params.yaml keeps the recipe. The next call puts the saved one
    back before it saves anything, so the file the user had is what every later call ends with."""
    ws = make_workspace(tmp_path / "ws")
    before = (ws / "params.yaml").read_bytes()
    killer = tmp_path / "killer"
    killer.write_text(f'#!/bin/sh\nif [ "$1" = -m ]; then kill -9 $PPID; exit 1; fi\nexec {BIN / "python"} "$@"\n')
    stub = tmp_path / "stub"
    stub.write_text(f'#!/bin/sh\nif [ "$1" = -m ]; then echo "stage $2"; exit 0; fi\nexec {BIN / "python"} "$@"\n')
    for f in (killer, stub):
        f.chmod(0o755)
    recipe = "profile=smoke model.device=cpu"
    killed = _run(ws, tmp_path / "out", "exemplars", RECIPE=recipe, PYTHON=str(killer))
    assert killed.returncode == -9 and (ws / "params.yaml").read_bytes() != before  # the recipe's file was left
    again = _run(ws, tmp_path / "out", "exemplars", RECIPE=recipe, PYTHON=str(stub))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "putting back" in again.stdout and "== exemplars: exit 0" in again.stdout
    assert (ws / "params.yaml").read_bytes() == before and (tmp_path / "out" / "params.yaml.orig").read_bytes() == before
