"""The pipeline as a Prefect flow, end to end on the smoke profile: every stage once, then nothing.

In a file of its own so that a parallel run (`pytest -n`, which `make test` uses) can give it to
one worker while the DVC pipeline's tests run on another.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from ardetect import tracking
from ardetect.pipeline import stages_in_order
from ardetect.stages import STAGES

from workspace import add_sleepy_stage, dvc, make_workspace, run_env


@pytest.mark.slow
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
    assert parent.iloc[0]["tags.ard.stages_ran"].split(",") == stages_in_order(ws)
    assert parent.iloc[0]["params.world.n_concepts"] == "20"
    assert 0.0 <= parent.iloc[0]["metrics.test.ARD.recall_at_10"] <= 1.0
    # each stage's output goes to the Prefect log a line at a time: a progress bar once, in its final
    # state, not once per redraw (the world renderer draws one bar per image set)
    bars = [line for line in log.splitlines() if "img/s]" in line or "img]" in line]
    assert bars and all("\r" not in line for line in bars)
    finals = [line for line in bars if "100%|" in line]
    assert len(bars) == len(finals), bars[:5]
    second = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Running stage" not in second.stdout + second.stderr  # DVC found everything up to date
    assert "Finished in state Completed" in second.stdout + second.stderr


@pytest.mark.slow
def test_sigterm_ends_the_flow_its_stage_and_prefects_server(tmp_path):
    """SIGTERM to the flow's process (`kill`, a scheduler) ended it at once: its stage went on alone, both runs were
    FAILED, and Prefect's temporary API server, a child process, ran on for ever. Now the stage is told and ends,
    the runs end KILLED, the server stops and the flow exits 143."""
    import signal
    import time

    import psutil

    ws = make_workspace(tmp_path / "repo")
    add_sleepy_stage(ws, alone=True)
    proc = subprocess.Popen([sys.executable, "flows/pipeline.py"], cwd=ws, env=run_env(ws), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (ws / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    def command(p) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # ended meanwhile (a zombie has no command line)
            return ""

    below = psutil.Process(proc.pid).children(recursive=True)
    assert any("uvicorn" in command(p) for p in below), [command(p) for p in below]  # Prefect's server
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert (ws / "interrupted").exists() and "interrupted (SIGTERM)" in out, out[-3000:]
    _, alive = psutil.wait_procs(below, timeout=30)
    assert not alive, [p.pid for p in alive]
    runs = tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}")
    assert list(runs["status"]) == ["KILLED"] and list(runs["tags.ard.orchestrator"]) == ["prefect"], runs
