"""A stage stopped by SIGTERM or Ctrl-C leaves its outputs as they were: no temp folder, no half-written output."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from workspace import probe_stage_script

REPO = Path(__file__).resolve().parents[1]

BODY = textwrap.dedent("""
    import os
    import time
    from pathlib import Path
    from ardetect.stages.common import atomic_dir, run_stage

    def body(cfg):
        with atomic_dir(Path("out")) as tmp:
            (tmp / "half.txt").write_text("half-written")
            Path("started").write_text("1")
            time.sleep(float(os.environ.get("PROBE_SLEEP", "120")))
        return {}

    run_stage("probe", body, lambda cfg: {})
""")


# a stage whose clean-up never returns once stopped (as a thread join or a lock left held by the interrupted code)
HANGING_BODY = probe_stage_script("probe", "a_clean_up_that_never_returns()", preamble="""
    common.CLEANUP_GRACE_S = 3.0

    def a_clean_up_that_never_returns():
        held = threading.Lock()
        held.acquire()
        held.acquire()
""")

# a stage whose clean-up takes a few seconds (MLflow's last flush, a checkpoint's rename) and leaves a mark when done
SLOW_CLEAN_UP_BODY = probe_stage_script("probe", """
    time.sleep(2)
    Path("cleaned").write_text("1")
""")


def _stop_probe_stage(tmp_path, *signals: int, sigint=signal.SIG_DFL, body: str = BODY) -> tuple[subprocess.Popen, str]:
    """Start the probe stage over an earlier output, with SIGINT's disposition ``sigint``, send ``signals`` once its
    temp folder holds a half-written output (then write `go`, for a body that stops itself), and return the ended
    process and its stderr; the MLflow store is ``tmp_path/mlflow.db``."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("the previous output")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(REPO / "src")}
    env.pop("ARD_MLFLOW_PARENT_RUN_ID", None)
    # SIGINT and SIGHUP as a terminal's session has them, unless told (a suite started as a background job inherits
    # SIGINT ignored, one under nohup SIGHUP)
    def dispositions():
        signal.signal(signal.SIGINT, sigint)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-c", body], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=dispositions)
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the stage never started"
        time.sleep(0.1)
    assert [p.name for p in tmp_path.glob(".out.tmp-*")]  # the half-written output is there while it runs
    for signum in signals:
        proc.send_signal(signum)
        time.sleep(0.2)
    (tmp_path / "go").write_text("1")
    _, err = proc.communicate(timeout=60)
    return proc, err


def _probe_runs(tmp_path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True)


def test_sigterm_mid_stage_removes_the_temp_folder_and_keeps_the_old_output(tmp_path):
    proc, err = _stop_probe_stage(tmp_path, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not list(tmp_path.glob(".out.*")), sorted(p.name for p in tmp_path.iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "the previous output"
    assert list(_probe_runs(tmp_path)["status"]) == ["KILLED"]  # stopped, not failed


def test_ctrl_c_twice_mid_stage_ends_it_once_cleanly_and_the_run_is_killed(tmp_path):
    """The terminal's SIGINT and the one `ard pipeline run` passes on both reach the stage: the first ends it, the
    second cannot cut short its clean-up. Its MLflow run ends KILLED (an interruption, not a failure)."""
    proc, err = _stop_probe_stage(tmp_path, signal.SIGINT, signal.SIGINT)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "[probe] interrupted after" in err and "Traceback" not in err, err
    assert not list(tmp_path.glob(".out.*")) and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    runs = _probe_runs(tmp_path)
    assert list(runs["status"]) == ["KILLED"] and list(runs["tags.mlflow.runName"]) == ["probe"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_clean_up_that_hangs_is_cut_short_saying_where_it_stood(tmp_path, signum):
    """A signal can land inside a library between a lock's acquire and its release, and the clean-up then waits for
    ever (a stage stopped by Ctrl-C once hung in MLflow's join of its metrics thread until `ard pipeline run` killed
    it, with no word of the interruption). The stage waits ``CLEANUP_GRACE_S``, then says so, prints where each thread
    stood and exits with the signal's code; its next run ends the run it left as KILLED."""
    started = time.monotonic()
    proc, err = _stop_probe_stage(tmp_path, signum, body=HANGING_BODY)
    assert proc.returncode == 128 + signum, err
    assert time.monotonic() - started < 60, err
    assert "[probe] interrupted after" in err and "its clean-up did not end within 3 s" in err, err
    assert "a_clean_up_that_never_returns" in err, err  # where the main thread stood
    assert not list(tmp_path.glob(".out.*")) and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    assert list(_probe_runs(tmp_path)["status"]) == ["RUNNING"]  # its run was never closed ...
    (tmp_path / "started").unlink()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(REPO / "src"), "PROBE_SLEEP": "0"}
    env.pop("ARD_MLFLOW_PARENT_RUN_ID", None)
    again = subprocess.run([sys.executable, "-c", BODY], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    runs = _probe_runs(tmp_path).sort_values("start_time")
    assert list(runs["status"]) == ["KILLED", "FINISHED"]  # ... until the next run of the stage


@pytest.mark.parametrize("first, then", [(signal.SIGTERM, (signal.SIGINT, signal.SIGTERM)), (signal.SIGINT, (signal.SIGTERM, signal.SIGHUP))])
def test_stop_signals_after_the_first_do_not_cut_its_clean_up_short(tmp_path, first, then):
    """A stop reaches a stage by several routes: `kill -TERM -PGID` (`timeout make run`, a service manager) sends it
    SIGTERM, then `ard pipeline run` passes on SIGINT; Ctrl-C may be followed by a scheduler's SIGTERM. A second
    SIGTERM used to raise inside the clean-up the first had started, leaving its MLflow run RUNNING."""
    proc, err = _stop_probe_stage(tmp_path, first, *then, body=SLOW_CLEAN_UP_BODY)
    assert proc.returncode == 128 + first, err
    assert (tmp_path / "cleaned").exists() and "Traceback" not in err, err
    assert not list(tmp_path.glob(".out.*")) and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    assert list(_probe_runs(tmp_path)["status"]) == ["KILLED"]


# a stage that stops itself while Python runs a weakref callback, where it cannot raise: it prints the exception as
# "ignored" and carries on (a Ctrl-C once landed in a WeakKeyDictionary's callback and `pretrain` ran to its end)
STOPPED_IN_A_CALLBACK_BODY = textwrap.dedent("""
    import os, signal, time, weakref
    from pathlib import Path
    from ardetect.stages.common import atomic_dir, run_stage

    def body(cfg):
        with atomic_dir(Path("out")) as tmp:
            (tmp / "half.txt").write_text("half-written")
            Path("started").write_text("1")

            class Held:
                pass

            def stop_here(_):
                os.kill(os.getpid(), int(os.environ["PROBE_SIGNAL"]))
                for _ in range(100_000):  # the handler runs here, inside the callback
                    pass
                Path("callback-ended").write_text("1")

            held = Held()
            ref = weakref.ref(held, stop_here)
            while not Path("go").exists():  # until the test has seen the half-written output
                time.sleep(0.05)
            del held
            for _ in range(600):  # a stage's work: Python between calls, as a training's steps are
                time.sleep(0.05)
            Path("ran-on").write_text("1")
        return {}

    run_stage("probe", body, lambda cfg: {})
""")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_that_lands_where_python_cannot_raise_still_ends_the_stage(tmp_path, signum, monkeypatch):
    monkeypatch.setenv("PROBE_SIGNAL", str(int(signum)))
    started = time.monotonic()
    proc, err = _stop_probe_stage(tmp_path, body=STOPPED_IN_A_CALLBACK_BODY)
    assert proc.returncode == 128 + signum, err
    assert time.monotonic() - started < 25 and not (tmp_path / "ran-on").exists(), err
    assert not (tmp_path / "callback-ended").exists(), err  # it did land inside the callback: its raise ended it
    if signum == signal.SIGINT:
        assert "[probe] interrupted after" in err and "Traceback" not in err, err
    assert not list(tmp_path.glob(".out.*")) and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    assert list(_probe_runs(tmp_path)["status"]) == ["KILLED"]


def test_a_closed_terminal_ends_a_stage_cleanly(tmp_path):
    """SIGHUP (the terminal or SSH session closed) ended a stage at once, its temp folder left and its run RUNNING."""
    proc, err = _stop_probe_stage(tmp_path, signal.SIGHUP)
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert not list(tmp_path.glob(".out.*")) and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    assert list(_probe_runs(tmp_path)["status"]) == ["KILLED"]


def test_a_stage_started_with_sigint_ignored_keeps_it_ignored(tmp_path):
    """A background job of a script starts with SIGINT ignored: the stage keeps it so (as Python itself does), and
    only SIGTERM ends it."""
    proc, err = _stop_probe_stage(tmp_path, signal.SIGINT, signal.SIGTERM, sigint=signal.SIG_IGN)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted" not in err and not list(tmp_path.glob(".out.*"))


def test_a_stage_killed_outright_is_cleaned_up_by_the_next_one(tmp_path):
    """SIGKILL (``kill -9``, the out-of-memory killer) leaves no chance to clean up: the temp folder stays and the
    MLflow run reads RUNNING. The next run of the stage removes the folder and ends the run KILLED, saying why."""
    proc, err = _stop_probe_stage(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, err
    left = [p.name for p in tmp_path.glob(".out.tmp-*")]
    assert len(left) == 1 and (tmp_path / left[0] / "half.txt").exists()
    assert list(_probe_runs(tmp_path)["status"]) == ["RUNNING"]
    (tmp_path / "started").unlink()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(REPO / "src"), "PROBE_SLEEP": "0"}
    env.pop("ARD_MLFLOW_PARENT_RUN_ID", None)
    again = subprocess.run([sys.executable, "-c", BODY], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"removed {left[0]}: left by process {proc.pid}, which no longer runs" in again.stderr
    assert not list(tmp_path.glob(".out.*")) and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["half.txt"]
    runs = _probe_runs(tmp_path).sort_values("start_time")
    assert list(runs["status"]) == ["KILLED", "FINISHED"]
    assert runs["tags.ard.abandoned"].iloc[0].startswith(f"process {proc.pid} ended without closing this run")
    assert runs["tags.ard.pid"].iloc[0] == str(proc.pid)


def _worker_signals(*_) -> tuple[int, object, object]:
    return os.getpid(), signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)


@pytest.mark.parametrize("sigint", ["handled", "ignored"])
def test_data_workers_restore_the_default_sigterm_and_sigint_under_a_stage(sigint):
    """A stage's SIGTERM handler raises SystemExit; a forked worker that inherited it could outlive
    its pool's terminate (a stage hung after its last image): the workers reset it. Its SIGINT handler raised in
    every worker too, each printing a traceback on Ctrl-C: they end on it without one, unless it is ignored."""
    from ardetect.data.quality import INLINE_BELOW, _map_files
    from ardetect.data.world import _run
    from ardetect.stages.common import _interrupted, _terminated

    previous = signal.signal(signal.SIGTERM, _terminated), signal.signal(signal.SIGINT, _interrupted if sigint == "handled" else signal.SIG_IGN)
    try:
        by_world = _run(_worker_signals, list(range(8)), 2, "probe")
        by_quality = _map_files(_worker_signals, [(i,) for i in range(INLINE_BELOW)], 2)
        assert signal.getsignal(signal.SIGTERM) is _terminated  # the stage's own process keeps its handler
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    for got in (by_world, by_quality):
        pids = {pid for pid, _, _ in got}
        assert pids and os.getpid() not in pids  # ran in the workers
        assert {term for _, term, _ in got} == {signal.SIG_DFL}
        assert {intr for _, _, intr in got} == {signal.SIG_DFL if sigint == "handled" else signal.SIG_IGN}


ORPHANS = textwrap.dedent("""
    import os, time
    from pathlib import Path
    from {module} import {runner}

    def task(*_):
        Path(f"worker-{{os.getpid()}}").write_text("1")
        time.sleep(120)
        return 0

    {call}
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return not any(line.split()[1:2] == ["Z"] for line in state.splitlines() if line.startswith("State:"))  # a zombie has ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("module, runner, call", [
    ("ardetect.data.world", "_run", '_run(task, list(range(2)), 2, "probe")'),
    ("ardetect.data.quality", "_map_files", "_map_files(task, [(i,) for i in range(INLINE_BELOW)], 2)"),
])
def test_data_workers_end_when_their_stage_is_killed_outright(tmp_path, module, runner, call):
    """SIGKILL gives the pool no chance to end its workers: each must end with its parent, not sleep on."""
    if runner == "_map_files":
        call = "from ardetect.data.quality import INLINE_BELOW\n" + call
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    script = ORPHANS.format(module=module, runner=runner, call=call)
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:  # a file, not a pipe: a worker left alive would hold a pipe open
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("worker-*"))) < 2:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.1)
    workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
    assert proc.pid not in workers and all(_alive(w) for w in workers)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:  # do not leave them sleeping if the check fails
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived their killed stage"
