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


def test_gpu_checks_runs_the_named_checks_within_its_budget(tmp_path):
    """bench/gpu_checks.sh: CHECKS picks checks by name, and a check that would not fit the time left is skipped, saying so."""
    env = {**os.environ, "PYTHON": sys.executable, "BUDGET_S": "0", "CHECKS": "cuda_test customize"}
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_checks.sh"), str(tmp_path / "logs")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^== cuda_test: skipped, -?\d+ s of the budget left$", out.stdout, re.M), out.stdout
    assert re.search(r"^== customize: skipped", out.stdout, re.M), out.stdout
    assert "train_tb" not in out.stdout and "model_bb" not in out.stdout  # not named: not run, not mentioned
    assert (tmp_path / "logs" / "gpu.txt").exists() and not list((tmp_path / "logs").glob("*.log"))
