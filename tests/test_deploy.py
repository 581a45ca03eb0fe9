"""The pipeline served as a Prefect deployment (`flows/deploy.py`), as the README runs it: a real `prefect server
start`, the deployment served to it, runs triggered with `prefect deployment run`, then Ctrl-C.

In a file of its own so that a parallel run gives it a worker of its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from ardetect import tracking

from workspace import BIN, REPO, add_sleepy_stage, make_workspace, run_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended ({proc.returncode}) first")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.5)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def _terminal() -> dict:
    """Popen arguments for a process as a terminal starts it, in a process group of its own with SIGINT at its default
    (a test runner may ignore it)."""
    return {"start_new_session": True, "preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}


def test_deploy_refuses_without_a_server_or_with_a_bad_schedule(tmp_path):
    env = run_env(tmp_path)
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "flows/deploy.py"]
    alone = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2 and "PREFECT_API_URL is not set" in alone.stderr, alone.stderr[-2000:]
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{_free_port()}/api"
    gone = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert gone.returncode == 2 and f"no Prefect server answers at PREFECT_API_URL={env['PREFECT_API_URL']}" in gone.stderr, gone.stderr
    cron = subprocess.run([*cmd, "--cron", "3am"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert cron.returncode == 2 and "--cron '3am': not a cron expression" in cron.stderr, cron.stderr
    assert "Traceback" not in alone.stderr + gone.stderr + cron.stderr


@pytest.mark.slow
def test_the_deployment_runs_what_it_is_sent_and_stops_on_ctrl_c(tmp_path):
    import psutil

    ws = make_workspace(tmp_path / "repo")
    add_sleepy_stage(ws)
    env = run_env(ws)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=ws, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **_terminal())
    deploy = None
    try:
        _wait(lambda: _answers(f"{api}/health"), "prefect server start", 240, server)
        env["PREFECT_API_URL"] = api
        log = open(tmp_path / "deploy.log", "w")
        tmp = tmp_path / "tmp"  # the deployment's temp folder: Prefect's runner left a folder in it after each Ctrl-C
        tmp.mkdir()
        deploy = subprocess.Popen([sys.executable, "flows/deploy.py"], cwd=ws, env={**env, "TMPDIR": str(tmp)}, stdout=log,
                                  stderr=subprocess.STDOUT, **_terminal())
        served = lambda: "is being served" in (tmp_path / "deploy.log").read_text()  # noqa: E731
        _wait(served, "flows/deploy.py serving", 180, deploy)

        def trigger(stages: list[str], watch: bool = True) -> subprocess.CompletedProcess:
            cmd = [str(BIN / "prefect"), "deployment", "run", "ardetect-pipeline/ardetect", "--param", f"stages={json.dumps(stages)}"]
            return subprocess.run(cmd + (["--watch"] if watch else []), cwd=ws, env=env, capture_output=True, text=True, timeout=600)

        # a mistyped stage fails the run, named as the flow's parameter
        wrong = trigger(["chek"])
        assert wrong.returncode == 1 and "Failed" in wrong.stdout, wrong.stdout[-2000:]
        text = (tmp_path / "deploy.log").read_text()
        assert "stages 'chek': not a stage of dvc.yaml ('chek': did you mean 'check'?)" in text, text[-3000:]
        # a run while another pipeline runs in the repository fails at once, naming that one
        from ardetect.pipeline import hold_pipeline_lock

        held = hold_pipeline_lock(ws, "ard pipeline run")
        try:
            busy = trigger(["check"])
        finally:
            held.close()
        assert busy.returncode == 1, busy.stdout[-2000:]
        text = (tmp_path / "deploy.log").read_text()
        assert f"another pipeline is running in {ws.resolve()} (ard pipeline run, PID {os.getpid()}" in text, text[-3000:]
        assert not (ws / "data" / "check.json").exists()
        # a real stage runs under an MLflow parent run the flow opens
        ran = trigger(["check"])
        assert ran.returncode == 0 and "Completed" in ran.stdout, ran.stdout[-2000:] + (tmp_path / "deploy.log").read_text()[-3000:]
        runs = tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}")
        parent = runs[runs["tags.ard.kind"] == "pipeline"]
        assert list(parent["status"]) == ["FINISHED"] and list(parent["tags.ard.orchestrator"]) == ["prefect"], runs
        assert (ws / "data" / "check.json").is_file()
        # Ctrl-C while a run's stage works: the stage ends, the MLflow run ends KILLED, nothing is left running
        started = trigger(["sleepy"], watch=False)
        assert started.returncode == 0, started.stdout + started.stderr
        _wait(lambda: (ws / "started").exists(), "the sleepy stage", 180, deploy)
        below = psutil.Process(deploy.pid).children(recursive=True)
        assert any("sleepy.py" in " ".join(p.cmdline()) for p in below)
        os.killpg(deploy.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
        code = deploy.wait(timeout=120)
        text = (tmp_path / "deploy.log").read_text()
        assert code == 130 and "Ctrl-C: stopped serving 'ardetect-pipeline/ardetect'" in text, text[-3000:]
        _, alive = psutil.wait_procs(below, timeout=30)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        assert [p.name for p in tmp.iterdir() if p.name == "runner_storage" or p.name.startswith("ardetect-deploy-")] == []
        runs = tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}")
        last = runs[runs["tags.ard.kind"] == "pipeline"].sort_values("start_time").iloc[-1]
        assert last["status"] == "KILLED", runs[["status", "tags.ard.kind", "start_time"]]
    finally:
        for proc in (deploy, server):
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=60)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    proc.kill()
