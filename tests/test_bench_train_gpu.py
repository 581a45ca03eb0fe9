"""The prepared GPU benchmark of the training recipe runs (its --tiny check, on the CPU here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_train_gpu_tiny_prints_steps_and_projection():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench_train_gpu.py"), "--tiny", "--device", "cpu", "--bf16"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "nano at 64 px on CPU" in text and "bf16 autocast on" in text
    steps = {k: float(v) for k, v in re.findall(r"^(pre-training|phase-1|scoring)\D.*?([\d.]+) ms", text, re.M)}
    assert set(steps) == {"pre-training", "phase-1", "scoring"} and all(v > 0 for v in steps.values())
    projected = re.search(r"projected: pretrain (\d+) steps ([\d.]+) min; phase 1 (\d+) steps ([\d.]+) min; evaluate 584 queries ([\d.]+) min", text)
    assert projected, text
    # 3,328 images in batches of 2 for params.yaml's epochs; 312 batches of 8 queries as batches of 2, for its epochs
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert int(projected.group(1)) == 1664 * params["pretrain"]["epochs"]
    assert int(projected.group(3)) == 312 * 4 * params["train_phase1"]["epochs"]


def gpu_checks(tmp_path, python: str = sys.executable, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_checks.sh"), str(tmp_path / "logs")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHON": python, **env})


def stand_in_python(tmp_path, script: str) -> str:
    fake = tmp_path / "python3"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    return str(fake)


def test_gpu_checks_runs_the_named_checks_within_its_budget(tmp_path):
    """bench/gpu_checks.sh: CHECKS picks checks by name, and a check that would not fit the time left is skipped, saying so."""
    out = gpu_checks(tmp_path, BUDGET_S="0", CHECKS="cuda_test customize")
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^== cuda_test: skipped, it needs 150 s and -?\d+ s of the budget are left$", out.stdout, re.M), out.stdout
    assert re.search(r"^== customize: skipped", out.stdout, re.M), out.stdout
    assert "train_tb" not in out.stdout and "model_bb" not in out.stdout  # not named: not run, not mentioned
    assert out.stdout.splitlines()[-1] == '== not run for the budget: CHECKS="cuda_test customize" runs them in another call'
    assert (tmp_path / "logs" / "gpu.txt").exists() and not list((tmp_path / "logs").glob("*.log"))


def test_gpu_checks_skip_a_check_longer_than_the_time_left_instead_of_cutting_it_short(tmp_path):
    """A check is started only where its whole limit fits the budget left; one that fits runs (here a stand-in python
    that runs the script's import check and answers every check at once)."""
    fake = stand_in_python(tmp_path, f'if [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\necho "stand-in for $*"')
    out = gpu_checks(tmp_path, fake, BUDGET_S="100", CHECKS="cuda_test train_tb")
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^== cuda_test: skipped, it needs 150 s and \d+ s of the budget are left$", out.stdout, re.M), out.stdout
    assert re.search(r"^== train_tb \(limit 75 s\).*\n== train_tb: exit 0 after", out.stdout, re.M), out.stdout  # 75 s fit
    assert (tmp_path / "logs" / "train_tb.log").read_text().startswith("stand-in for bench/bench_train_gpu.py --size T-B")
    assert not (tmp_path / "logs" / "cuda_test.log").exists()
    assert out.stdout.splitlines()[-1] == '== not run for the budget: CHECKS="cuda_test" runs them in another call'


def test_gpu_checks_stop_before_any_check_where_a_project_module_is_missing(tmp_path):
    """The machine's image lacks pydantic and the MiniLM package: named at once, not after a check fails on it."""
    fake = stand_in_python(tmp_path, f"exec {sys.executable} -c 'import sys; sys.modules[\"pydantic\"] = None; exec(sys.argv[1])' \"$2\"")
    out = gpu_checks(tmp_path, fake, BUDGET_S="100", CHECKS="train_tb")
    assert out.returncode == 2, out.stdout + out.stderr[-2000:]
    assert out.stdout.startswith("cannot run the GPU checks: pydantic (") and "docs/gpu.md" in out.stdout, out.stdout
    assert "== train_tb" not in out.stdout and not list((tmp_path / "logs").glob("*.log"))
