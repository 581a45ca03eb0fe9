"""The pipeline driver (outcomes from DVC's API, stage output relayed), then end to end on the
smoke profile: DVC stages, up-to-date checks, MLflow runs, failure handling."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import yaml

from ardetect import tracking
from ardetect.pipeline import OutputRelay, collate, headline_metrics, repro_stage, repro_with_retries, stages_in_order
from ardetect.stages import STAGES
from ardetect.tmpdirs import current_umask

from workspace import BIN, SLEEPY, _git, add_sleepy_stage, dvc, make_workspace, probe_stage_script, run_env

# A stage's output as tqdm writes it into a pipe: a kept bar (leave=True) redrawn with
# \r and ended by \n, a cleared bar (leave=False: \r, spaces, \r) followed on the same
# line by a log line, and a \r\n line ending.
FAKE_OUTPUT = (
    "Running stage 'train':\n"
    + "".join(f"\rkept: {p:3d}%|bar| {p}/100" for p in range(0, 101, 5)) + "\n"
    + "".join(f"\rcleared: {p:3d}%|bar| {p}/100" for p in range(0, 101, 10)) + "\r" + " " * 30 + "\r"
    + "INFO stage done\n"
    + "windows line\r\n"
    + "\n"
    + "last line without newline"
)


@pytest.mark.parametrize("chunk", [1, 7, 64, 100_000])
def test_relay_keeps_carriage_returns_for_the_terminal_and_logs_each_bar_once(chunk):
    raw, logged = [], []
    relay = OutputRelay(write=raw.append, log=logged.append)
    for i in range(0, len(FAKE_OUTPUT), chunk):
        relay.feed(FAKE_OUTPUT[i : i + chunk])
    relay.close()
    assert "".join(raw) == FAKE_OUTPUT  # the terminal gets every byte, \r included: the bar redraws in place
    assert logged == [
        "Running stage 'train':",
        "kept: 100%|bar| 100/100",
        "cleared: 100%|bar| 100/100",
        "INFO stage done",
        "windows line",
        "last line without newline",
    ]
    assert relay.lines[-2] == ""  # the blank line is kept in the transcript, not logged


def _tiny_dvc_repo(root):
    """A git + DVC repo whose stage draws tqdm bars and prints text that looks like DVC's own messages."""
    root.mkdir(parents=True)
    (root / "work.py").write_text(textwrap.dedent("""
        import sys
        from tqdm import tqdm
        print("Running stage 'decoy':")  # looks like DVC's message; must not count as a stage run
        print("Stage 'other' didn't change, skipping")
        for _ in tqdm(range(40), desc="kept", mininterval=0):
            pass
        for _ in tqdm(range(40), desc="cleared", mininterval=0, leave=False):
            pass
        if open("input.txt").read().strip() == "fail":
            sys.exit(3)
        if open("input.txt").read().strip() == "oom":  # as the kernel's out-of-memory killer ends a process
            import os, signal
            os.kill(os.getpid(), signal.SIGKILL)
        open("out.txt", "w").write(open("input.txt").read())
    """))
    (root / "input.txt").write_text("one\n")
    (root / "dvc.yaml").write_text(textwrap.dedent("""
        stages:
          first:
            cmd: python work.py
            deps: [work.py, input.txt]
            outs: [out.txt]
          second:
            cmd: python -c "import shutil; shutil.copy('out.txt', 'out2.txt')"
            deps: [out.txt]
            outs: [out2.txt]
    """))
    _git(root, "init", "-q")
    # no analytics: without a network their report would stay behind in the system's temp folder
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "init")
    return root


def test_repro_stage_reads_outcomes_from_dvc_and_relays_output(tmp_path):
    root = _tiny_dvc_repo(tmp_path / "repo")
    raw, logged = [], []
    first = repro_stage("second", root, echo=logged.append, write=raw.append)
    assert first.ok, first.output
    assert (first.ran, first.up_to_date, first.failed) == (["first", "second"], [], [])
    text = "".join(raw)
    assert text.count("\rkept:") > 10  # the terminal gets each redraw, in place
    kept = [line for line in logged if line.startswith("kept:")]
    cleared = [line for line in logged if line.startswith("cleared:")]
    assert len(kept) == 1 and kept[0].startswith("kept: 100%|") and "40/40" in kept[0]  # once, in its final state
    assert len(cleared) == 1 and cleared[0].startswith("cleared: 100%|") and "40/40" in cleared[0]
    assert all("\r" not in line for line in logged)
    assert len(logged) == len(first.output.splitlines()) - first.output.splitlines().count("")

    again = repro_stage("second", root)  # no echo, no writer: the outcome does not come from the text
    assert (again.ran, again.up_to_date, again.failed) == ([], ["first", "second"], [])
    assert "decoy" not in again.ran + again.up_to_date

    (root / "input.txt").write_text("two\n")
    only_first = repro_stage("first", root)
    assert (only_first.ran, only_first.up_to_date) == (["first"], [])
    after = repro_stage("second", root)
    assert (after.ran, after.up_to_date) == (["second"], ["first"])
    assert collate([only_first, after], ["first", "second"]) == {"ran": ["first", "second"], "up_to_date": [], "failed": []}


def _git_out(root, *args) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def test_a_tree_without_git_is_made_a_repository_or_run_without_one(tmp_path, monkeypatch):
    from ardetect import pipeline

    root = _tiny_dvc_repo(tmp_path / "unpacked")
    shutil.rmtree(root / ".git")  # as a release's zip unpacks: DVC's files without git's
    before = repro_stage("second", root)
    assert not before.ok and "not a git repository" in (before.error or "")  # what every stage met before
    made = pipeline.ensure_repository(root)
    assert made and "made one" in made and str(root) in made
    assert _git_out(root, "log", "--format=%s").splitlines() == ["The source tree as the pipeline found it (DVC needs a git repository)"]
    assert {"work.py", "input.txt", "dvc.yaml", ".dvc/config"} <= set(_git_out(root, "ls-files").split())
    assert repro_stage("second", root).ok
    assert pipeline.ensure_repository(root) is None  # a repository now: nothing more is done
    assert len(_git_out(root, "log", "--format=%H").split()) == 1

    outer = tmp_path / "outer"  # a tree unpacked inside the user's own repository is theirs: left as it is
    outer.mkdir()
    _git(outer, "init", "-q")
    nested = _tiny_dvc_repo(tmp_path / "nested")
    shutil.rmtree(nested / ".git")
    nested = shutil.move(str(nested), outer / "ard")
    assert pipeline.ensure_repository(nested) is None and not (outer / "ard" / ".git").exists()

    no_git = _tiny_dvc_repo(tmp_path / "no-git")  # no git on the machine: DVC's no_scm, this machine's setting only
    shutil.rmtree(no_git / ".git")
    monkeypatch.setattr(pipeline, "git_executable", lambda: None)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "system-tmp"))  # DVC's analytics report, were it sent, lands there
    (tmp_path / "system-tmp").mkdir()
    said = pipeline.ensure_repository(no_git)
    assert list((tmp_path / "system-tmp").iterdir()) == []
    assert said and "core.no_scm" in said and "dvc exp run" in said
    assert "no_scm = true" in (no_git / ".dvc" / "config.local").read_text() and not (no_git / ".git").exists()
    assert repro_stage("second", no_git).ok and (no_git / "out2.txt").read_text() == "one\n"
    assert pipeline.ensure_repository(no_git) is None

    broken = tmp_path / "broken-git"  # a git that cannot make the repository: said, naming the step, nothing run
    broken.write_text("#!/bin/sh\n[ \"$1\" = rev-parse ] && { echo 'fatal: not a git repository' >&2; exit 128; }\n"
                      "echo 'fatal: cannot write here' >&2; exit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(pipeline, "git_executable", lambda: str(broken))
    plain = _tiny_dvc_repo(tmp_path / "plain")
    shutil.rmtree(plain / ".git")
    with pytest.raises(pipeline.RepositoryError, match=r"`git init` failed making one: fatal: cannot write here"):
        pipeline.ensure_repository(plain)


def test_repro_stage_failure_and_lock_contention(tmp_path):
    import zc.lockfile

    root = _tiny_dvc_repo(tmp_path / "repo")
    (root / "input.txt").write_text("fail\n")
    failed = repro_stage("second", root)
    assert not failed.ok and failed.failed == ["first"] and failed.ran == []
    assert failed.error_type == "ReproductionError" and "exited with 3" in failed.error
    assert not failed.transient  # a bad input is not retried
    assert failed.command_exit == 3 and failed.command_signal is None and failed.describe_failure() == failed.error
    (root / "input.txt").write_text("oom\n")
    killed = repro_stage("second", root)
    # DVC sees -9 where the shell execs the command, 137 (128 + 9) where the shell waits on it and reports the signal
    assert not killed.ok and killed.command_exit in (-9, 137) and killed.command_signal == 9 and not killed.transient
    assert "out-of-memory killer" in killed.describe_failure() and killed.describe_failure().startswith(killed.error)
    (root / "input.txt").write_text("one\n")

    lock = zc.lockfile.LockFile(str(root / ".dvc/tmp/lock"))  # another DVC process holds the repo
    try:
        held = repro_stage("second", root)
        notes = []
        retried = repro_with_retries("second", root, retries=1, delay_s=0.1, notify=notes.append)
    finally:
        lock.close()
    assert not held.ok and held.lock_error and held.transient and held.error_type == "LockError"
    assert not retried.ok and len(notes) == 1 and "retry 1/1" in notes[0]
    assert held.seconds is None and retried.seconds >= 0.1  # the whole step's time: the wait before its retry included
    ok = repro_with_retries("second", root, retries=1, delay_s=0.1)
    assert ok.ok and ok.ran == ["first", "second"] and ok.seconds > 0 and ok.to_dict()["seconds"] == ok.seconds


def test_the_summary_gives_each_steps_seconds_and_the_banner_its_place():
    from ardetect.pipeline import StageOutcome, step_banner, summarize

    ran = StageOutcome("pretrain", 0, ran=["pretrain"], up_to_date=["check"], seconds=1234.56)
    failed = StageOutcome("evaluate", 1, failed=["evaluate"], error="exited with 2", seconds=3.0)
    unmeasured = StageOutcome("export", 0, up_to_date=["export"])
    lines = summarize([ran, failed, unmeasured]).splitlines()
    assert lines[0] == "| stage | result | seconds | stages run | up to date |"
    assert lines[2] == "| pretrain | ok | 1,234.6 | pretrain | check |"
    assert lines[3] == "| evaluate | FAILED (exit 1) | 3.0 | - | - |"
    assert lines[4] == "| export | ok | - | - | export |"
    assert step_banner("pretrain", 7, 13, 3725.9) == "==> [7/13] dvc repro pretrain (pipeline 62 min 05 s so far)"
    assert step_banner("check", 1, 13, 0.2) == "==> [1/13] dvc repro check (pipeline 0 min 00 s so far)"


def test_a_busy_output_names_which_blocking_dvc_process_still_runs():
    """DVC's "is busy, it is being blocked by: (PID n)" ends with "If there are no processes with such PIDs, you can
    manually remove '.dvc/tmp/rwlock'": the failure now says which of them still run, so the lock is not removed under
    a running one (a `dvc exp run` beside the pipeline)."""
    from ardetect.pipeline import StageOutcome

    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    dvc_said = (f"failed to reproduce 'exemplars': 'data/exemplars' is busy, it is being blocked by:\n  (PID {os.getpid()}): dvc exp run\n"
                f"  (PID {gone.pid}): dvc repro\n\nIf there are no processes with such PIDs, you can manually remove '.dvc/tmp/rwlock'")
    said = StageOutcome("exemplars", 255, error=dvc_said).describe_failure()
    assert said.startswith(dvc_said.rstrip(".") + ". PID ") and f"PID {os.getpid()} (`" in said and f"PID {gone.pid} (" not in said[len(dvc_said):]
    assert said.endswith("is still running: wait for it to end and run again; do not remove the rwlock while it runs")
    assert StageOutcome("x", 1, error="exited with 3").describe_failure() == "exited with 3"


DRIVER = "import sys; from pathlib import Path; from ardetect.pipeline import repro_stage; repro_stage('sleepy', Path(sys.argv[1]))"


# a stage that prints all the time: killed outright, `ard pipeline run` leaves it writing into the pipe it read
CHATTY = textwrap.dedent("""
    import sys, time
    open("started", "w").write("1")
    try:
        for i in range(2400):
            print(f"step {i}", flush=True)
            time.sleep(0.02)
    except KeyboardInterrupt:
        open("interrupted", "w").write("1")
        sys.exit(130)
    except BrokenPipeError:
        open("broken", "w").write("1")
        sys.exit(1)
""")


@pytest.mark.parametrize("script", ["quiet", "chatty"])
def test_a_stage_whose_pipeline_was_killed_outright_is_stopped(tmp_path, script):
    """`kill -9` of `ard pipeline run` (or of the flow's process): the DVC child passes SIGINT on to the stage, which
    ends as on Ctrl-C, instead of running on with no one to read what it prints. A stage that prints all the while
    does not die of the closed pipe first: it meets a pipe of the DVC child's own (before: BrokenPipeError, FAILED)."""
    import signal
    import time

    import psutil

    root = _tiny_dvc_repo(tmp_path / "repo")
    (root / "sleepy.py").write_text(SLEEPY if script == "quiet" else CHATTY)
    (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text() + "  sleepy:\n    cmd: python sleepy.py\n    deps: [sleepy.py]\n")
    temp = tmp_path / "temp"  # the pipeline's own temp folder: its result file must not be left there (it was, twice a run)
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "TMPDIR": str(temp)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(root)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's session has it
    deadline = time.monotonic() + 120
    while not (root / "started").exists():
        assert driver.poll() is None and time.monotonic() < deadline, "the stage never started"
        time.sleep(0.1)
    below = psutil.Process(driver.pid).children(recursive=True)
    driver.kill()
    driver.wait()
    deadline = time.monotonic() + 30
    while not (root / "interrupted").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (root / "interrupted").exists() and not (root / "broken").exists(), "the stage was not told"
    gone, alive = psutil.wait_procs(below, timeout=30)
    assert not alive, alive
    assert not (root / ".dvc/tmp/lock").exists() or _lock_free(root)
    assert not list(temp.glob(".ard-repro-*")), "the DVC child left the killed pipeline's result file"


# a stage that counts, a line to a file every 0.05 s, until it is stopped
TICKING = textwrap.dedent("""
    import time
    with open("ticks", "a") as f:
        f.write("started\\n")
        f.flush()
        open("started", "w").write("1")
        for i in range(4000):
            f.write(f"{i}\\n")
            f.flush()
            time.sleep(0.05)
""")


def test_ctrl_z_suspends_the_stage_with_the_pipeline_and_fg_resumes_both(tmp_path):
    """The DVC child and its stage run in a process group of their own, which a terminal's Ctrl-Z (SIGTSTP to the
    foreground group) does not reach: the pipeline suspends that group with itself, and resumes it on `fg` (SIGCONT).
    A stop while suspended still ends the stage."""
    import contextlib
    import signal
    import time

    import psutil

    root = _tiny_dvc_repo(tmp_path / "repo")
    (root / "ticking.py").write_text(TICKING)
    (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text() + "  sleepy:\n    cmd: python ticking.py\n    deps: [ticking.py]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}

    def as_a_shells_job():  # a process group of its own under its parent's: the kernel drops SIGTSTP to an orphaned
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # group, which the suite's may be (CI started in the background)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.setpgrp()

    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(root)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=as_a_shells_job)
    deadline = time.monotonic() + 120
    while not (root / "started").exists():
        assert driver.poll() is None and time.monotonic() < deadline, "the stage never started"
        time.sleep(0.1)
    stage = [p for p in psutil.Process(driver.pid).children(recursive=True) if "ticking.py" in " ".join(p.cmdline())
             and p.name().startswith("python")][0]

    def ticks() -> int:
        return len((root / "ticks").read_text().splitlines())

    def status_becomes(proc, wanted: bool, within: float = 10.0) -> bool:
        end = time.monotonic() + within
        while time.monotonic() < end:
            if (proc.status() == psutil.STATUS_STOPPED) == wanted:
                return True
            time.sleep(0.05)
        return False

    try:
        driver.send_signal(signal.SIGTSTP)  # Ctrl-Z
        assert status_becomes(psutil.Process(driver.pid), True) and status_becomes(stage, True)
        held = ticks()
        time.sleep(1.0)
        assert ticks() == held  # the stage does not go on counting while suspended
        driver.send_signal(signal.SIGCONT)  # fg
        assert status_becomes(psutil.Process(driver.pid), False) and status_becomes(stage, False)
        time.sleep(1.0)
        assert ticks() > held + 5
        driver.send_signal(signal.SIGTSTP)  # suspended again, then stopped
        assert status_becomes(stage, True)
        driver.send_signal(signal.SIGINT)
        driver.send_signal(signal.SIGCONT)
        driver.wait(timeout=60)
        assert not psutil.wait_procs([stage], timeout=30)[1], "the suspended stage was not ended"
    finally:
        if driver.poll() is None:
            driver.kill()
        with contextlib.suppress(psutil.Error):
            stage.kill()


# a stage that does not end on SIGINT (it ignores it, as one whose clean-up hangs would not end either), nor on
# SIGTERM where told (as a stage already stopping ignores it)
STUBBORN = textwrap.dedent("""
    import signal, sys, time
    for name in sys.argv[1:]:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    open("started", "w").write("1")
    time.sleep(120)
""")


@pytest.mark.parametrize("ignored", ["SIGINT", "SIGINT SIGTERM"])
def test_a_stage_still_running_after_the_grace_is_terminated_saying_so(tmp_path, ignored):
    """What has not ended `STOP_GRACE_S` after Ctrl-C is stopped with SIGTERM, and what ignores that too is killed
    `KILL_AFTER_S` later; the pipeline says so, naming the PIDs (before, it terminated them without a word, so a
    stage that never printed its own "interrupted" left the user with nothing)."""
    import signal
    import time

    import psutil

    root = _tiny_dvc_repo(tmp_path / "repo")
    (root / "sleepy.py").write_text(STUBBORN)
    (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text() + f"  sleepy:\n    cmd: python sleepy.py {ignored}\n    deps: [sleepy.py]\n")
    driver_code = "import ardetect.pipeline as p, sys; p.STOP_GRACE_S = 3.0; p.KILL_AFTER_S = 3.0; " + DRIVER.replace("repro_stage('sleepy', Path(sys.argv[1]))",
                                                                                                   "repro_stage('sleepy', Path(sys.argv[1]), write=sys.stdout.write)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    driver = subprocess.Popen([sys.executable, "-c", driver_code, str(root)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (root / "started").exists():
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0]
        time.sleep(0.1)
    below = psutil.Process(driver.pid).children(recursive=True)
    stage = [p for p in below if "sleepy.py" in " ".join(p.cmdline()) and p.name().startswith("python")]  # not DVC's shell
    signalled = time.monotonic()
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=90)
    assert time.monotonic() - signalled < 45, out
    assert "s after the signal: " in out and f"PID {stage[0].pid}" in out and "stopping with SIGTERM" in out, out
    assert ("s after SIGTERM: " in out and f"PID {stage[0].pid}; killing it" in out) == ("SIGTERM" in ignored), out
    gone, alive = psutil.wait_procs(below, timeout=30)
    assert not alive, alive


@pytest.mark.parametrize("signame, sigint", [("SIGTERM", "default"), ("SIGHUP", "default"), ("SIGTERM", "ignored")])
def test_sigterm_or_sighup_to_the_pipeline_ends_it_as_ctrl_c_does(tmp_path, signame, sigint):
    """`kill`, `docker stop` or a scheduler (SIGTERM), or the terminal closing (SIGHUP), used to end `ard pipeline run`
    at once, its run left RUNNING and the DVC child and its stage going on alone. Now the stage is told, ends
    cleanly, and the pipeline exits 128 + the signal with its run KILLED.

    ``ignored``: started by a shell without job control (a script's `make run &`), which starts background commands
    with SIGINT ignored, and ignored signals stay so across exec: the SIGINT the pipeline passes on was ignored by the
    stage, which ran on until the 120-s grace ended. Now the DVC child, which only the pipeline sends SIGINT, restores
    SIGINT for what it starts."""
    import signal
    import time

    import mlflow

    signum = getattr(signal, signame)
    ws = make_workspace(tmp_path / "repo")
    add_sleepy_stage(ws)

    def dispositions():  # as a terminal's session has them (a suite run as a background job has SIGINT ignored)
        signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    proc = subprocess.Popen([str(BIN / "ard"), "pipeline", "run", "--stage", "sleepy"], cwd=ws, env=run_env(ws),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=dispositions)
    deadline = time.monotonic() + 300
    while not (ws / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    proc.send_signal(signum)
    sent = time.monotonic()
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signum, out
    assert time.monotonic() - sent < 60 and "still running" not in out, out  # not the 120-s grace
    assert (ws / "interrupted").exists() and f"interrupted ({signame}" in out and "at `dvc repro sleepy`" in out, out
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ardetect"])
    assert list(runs["status"]) == ["KILLED"] and list(runs["tags.ard.kind"]) == ["pipeline"], runs


# a stage (through `run_stage`, so with its own MLflow run) whose clean-up takes a few seconds, as a checkpoint's
# rename or MLflow's last flush can
SLOW_CLEAN_UP = probe_stage_script("slowclean", """
    time.sleep(3)
    Path("cleaned").write_text("1")
""")


def test_sigterm_to_make_runs_whole_process_group_lets_the_stage_end_cleanly(tmp_path):
    """`timeout make run`, `kill -TERM -PGID` or a service manager signal the whole process group: the stage, the DVC
    child and `ard pipeline run` each get SIGTERM, and make passes on one more to its child. The first reaches the
    stage, which starts its clean-up; the ones after it (the pipeline's passed-on SIGINT, make's second SIGTERM) used to
    cut that clean-up short, leaving the stage's MLflow run RUNNING. Now the clean-up ends and both runs read KILLED."""
    import signal
    import time

    import mlflow

    ws = make_workspace(tmp_path / "repo")
    (ws / "slowclean.py").write_text(SLOW_CLEAN_UP)
    pipeline = yaml.safe_load((ws / "dvc.yaml").read_text())
    pipeline["stages"]["slowclean"] = {"cmd": "python slowclean.py", "deps": ["slowclean.py"]}
    (ws / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (ws / "Makefile").write_text("run:\n\tard pipeline run --stage slowclean\n")

    def dispositions():  # as a terminal's session has them, in a process group of its own (as a shell's job)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.setpgrp()

    proc = subprocess.Popen(["make", "-s", "run"], cwd=ws, env=run_env(ws), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=dispositions)
    deadline = time.monotonic() + 300
    while not (ws / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    time.sleep(1.0)  # the stage's MLflow run is open
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0, out
    assert (ws / "cleaned").exists(), out  # the stage's clean-up ran to its end
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ardetect"])
    statuses = dict(zip(runs["tags.mlflow.runName"], runs["status"]))
    assert statuses == {"pipeline [smoke]": "KILLED", "slowclean": "KILLED"}, (statuses, out)
    assert "interrupted (SIGTERM) at `dvc repro slowclean`" in out and "still running" not in out, out


def _lock_free(root) -> bool:
    import zc.lockfile

    try:
        zc.lockfile.LockFile(str(root / ".dvc/tmp/lock")).close()
    except zc.lockfile.LockError:
        return False
    return True


def test_headline_metrics_read_old_and_new_layouts():
    new = {"test": {"ARD": {"recall@1": 0.1, "recall@5": 0.3, "recall@10": 0.5, "box_accuracy": 0.6},
                    "AbC": {"recall@1": 0.05, "recall@5": 0.2, "recall@10": 0.3, "box_accuracy": None}},
           "world2": {"ARD": {"recall@1": 0.2, "recall@5": 0.4, "recall@10": 0.6, "box_accuracy": 0.7}},
           "bars": {"ARD Recall@10 >= 0.5": True}}
    old = {"test": {"ARD": {**new["test"]["ARD"], "class_rprecision": 0.9, "inverse_rank@10": 0.2, "queries": 12}},
           "identity_fit": {"ARD": {"weight": 2.0}}}
    assert headline_metrics(new) == {
        "test.ARD.recall@1": 0.1, "test.ARD.recall@5": 0.3, "test.ARD.recall@10": 0.5, "test.ARD.box_accuracy": 0.6,
        "test.AbC.recall@1": 0.05, "test.AbC.recall@5": 0.2, "test.AbC.recall@10": 0.3,
        "world2.ARD.recall@1": 0.2, "world2.ARD.recall@5": 0.4, "world2.ARD.recall@10": 0.6, "world2.ARD.box_accuracy": 0.7,
    }
    assert headline_metrics(old) == {f"test.ARD.{k}": v for k, v in new["test"]["ARD"].items()}
    assert headline_metrics({}) == {}


def ard(ws, *args, check=True):
    proc = subprocess.run([str(BIN / "ard"), *args], cwd=ws, env=run_env(ws), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"ard {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    """A smoke workspace run twice through `ard pipeline run`."""
    ws = make_workspace(tmp_path_factory.mktemp("pipe") / "repo")
    first = ard(ws, "pipeline", "run")
    second = ard(ws, "pipeline", "run")
    return ws, first, second


@pytest.mark.slow
def test_pipeline_outputs_and_up_to_date(piped):
    ws, first, second = piped
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    order = stages_in_order(ws)
    table = {}
    for line in first.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in order:
            table[cells[0]] = cells
    for i, stage in enumerate(order, 1):
        assert f"==> [{i}/{len(order)}] dvc repro {stage} (pipeline " in first.stdout
        assert table[stage][1] == "ok" and float(table[stage][2].replace(",", "")) > 0, table[stage]
    wall = float(first.stdout.split("pipeline wall time: ")[1].split(" s")[0])
    assert sum(float(table[s][2].replace(",", "")) for s in order) <= wall
    t = pd.read_parquet(ws / "data/tuples/tuples.parquet")
    assert len(t) == 20 * 2 and set(t["split"]) == {"train", "val", "test"}
    assert (ws / "data/tuples/gallery.png").stat().st_size > 10_000
    assert (ws / "data/validation/report.md").is_file()
    status = dvc(ws, "status")
    assert "up to date" in status.stdout, status.stdout
    assert "Running stage" not in second.stdout
    assert "stages run: none (all up to date)" in second.stdout
    assert not (ws / "reports/.evaluate-work").exists()  # the kept scores of a run that did not finish: none after a finished one
    metrics = json.loads((ws / "reports/metrics.json").read_text())
    details_path = ws / "reports/details.json"
    if "class_rprecision" in metrics["test"]["ARD"]:  # the evaluation's older layout: everything in metrics.json
        for world in ("test", "world2"):
            for method in ("ARD", "ARD-", "AbC", "chance", "ARD paper score", "ARD- paper score"):
                assert 0.0 <= metrics[world][method]["class_rprecision"] <= 1.0, (world, method)
        fits = metrics["identity_fit"]
    else:  # headline only: Recall@1/5/10 and box accuracy per method and world, the bars
        for world in ("test", "world2"):
            for method in ("ARD", "ARD-", "AbC", "chance"):
                keys = set(metrics[world][method])
                assert {"recall@1", "recall@5", "recall@10"} <= keys <= {"recall@1", "recall@5", "recall@10", "box_accuracy"}
        assert metrics["bars"] and all(isinstance(v, bool) for v in metrics["bars"].values())
        details = json.loads(details_path.read_text())
        fits = details["identity_fit"]
        for world in ("test", "world2"):  # the ceilings, read from each world's objects table
            rows = details[world]["methods"]
            assert "box_accuracy" not in rows["class oracle"] and 0.0 < rows["class oracle"]["class_rprecision"]["value"] <= 1.0
            assert 0.0 <= rows["class + size oracle"]["box_accuracy"]["value"] <= 1.0
        assert "Ceilings of a score that reads classes only" in (ws / "reports/results.md").read_text()
    # the identity weight, pooling grid and class weight of each detector are fitted on the val split, from the params' grids
    # (the pre-training's crop classification gave the detectors a region classifier, so the class weights are tried)
    weights = {"0", "1", "2", "5", "10", "20"}
    label = lambda g, a: f"{g}x{g}" + ("" if a == "0" else f", a={a}")  # noqa: E731
    for name in ("ARD", "ARD-"):
        fit = fits[name]
        by_grid = fit["val_fit"]  # the mean of the fit's metrics decides
        assert fit["fit_metrics"] == ["recall@1", "recall@5", "recall@10"]
        assert set(fit["val_recall@10"]) == set(by_grid) == {label(g, a) for g in (1, 2, 3, 4) for a in ("0", "1", "2", "3")}
        for a in ("0", "1", "2", "3"):  # w = 0 is tried on the first grid only
            assert set(by_grid[label(1, a)]) == weights and all(set(by_grid[label(g, a)]) == weights - {"0"} for g in (2, 3, 4))
            for g in (1, 2, 3, 4):  # each cell's Recall@10 is reported beside it, over the same weights
                assert set(fit["val_recall@10"][label(g, a)]) == set(by_grid[label(g, a)])
        chosen = by_grid[label(fit["grid"], f"{fit['class_weight']:g}")]
        assert fit["grid"] in (1, 2, 3, 4) and fit["class_weight"] in (0, 1, 2, 3) and f"{fit['weight']:g}" in chosen
        best = max(r for rs in by_grid.values() for r in rs.values())
        assert chosen[f"{fit['weight']:g}"] == best
        paper = metrics["test"].get(name + " paper score")
        if fit["weight"] == 0 and fit["class_weight"] == 0 and paper:  # the paper's score: the two rows are the same ranking
            assert metrics["test"][name]["recall@10"] == paper["recall@10"]
    report = (ws / "reports/results.md").read_text()
    assert "class_rprecision" in report and "Identity weight, pooling grid and class weight, fitted on" in report
    # the export: three graphs, manifest, parity within bounds, one registered version (the second run re-ran nothing)
    for name in ("image_encoder.onnx", "query_encoder.onnx", "scorer.onnx", "manifest.json", "tokenizer/tokenizer.json"):
        assert (ws / "models/export" / name).is_file(), name
    parity = json.loads((ws / "models/export/parity.json").read_text())
    assert parity["passed"] and parity["fp32"]["score_max_abs_diff"] <= 1e-4 and parity["fp32"]["recalls_equal"]
    # held against the scores evaluate recorded for the ARD row: the export serves the evaluation's own figures
    assert parity["pytorch_source"] == "evaluate"
    scores = pd.read_parquet(ws / "reports/ard_scores.parquet")
    per_query = pd.read_parquet(ws / "reports/per_query.parquet")
    ard = per_query[(per_query["method"] == "ARD") & (per_query["world"] == "test")]
    assert set(scores["tuple_id"]) == set(ard["tuple_id"])
    own = scores[scores["position"] == 0].set_index("tuple_id")["score"]
    np.testing.assert_allclose(own.loc[ard["tuple_id"]].to_numpy(), ard["score"].to_numpy(), rtol=0, atol=1e-6)
    manifest = json.loads((ws / "models/export/manifest.json").read_text())
    assert manifest["score"]["identity_weight"] == fits["ARD"]["weight"] and manifest["score"]["grid"] == fits["ARD"]["grid"]
    assert manifest["metrics"]["test_recall_at_10"] == metrics["test"]["ARD"]["recall@10"]
    from ardetect.export.registry import list_versions

    versions = list_versions(f"sqlite:///{ws / 'mlflow.db'}")
    assert list(versions["version"]) == [1] and versions.iloc[0]["aliases"] == "champion"


@pytest.mark.slow
def test_what_the_pipeline_writes_is_as_readable_as_the_umask_lets_it(piped):
    # written atomically (a temp file or folder, then a rename), the outputs were 0600 and their folders 0700 whatever
    # the umask: another user (a service, a container, a colleague) could not read metrics.json or the checkpoints
    ws = piped[0]
    read, enter = 0o444 & ~current_umask(), 0o111 & ~current_umask()
    unreadable = []
    for top in ("data", "models", "reports", "mlruns"):
        for path in [ws / top, *(ws / top).rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            want = read | enter if path.is_dir() else read
            if not stat.S_ISLNK(path.lstat().st_mode) and mode & want != want:
                unreadable.append(f"{path.relative_to(ws)} {oct(mode)}")
    assert len(list((ws / "models").rglob("*.pt"))) >= 3 and (ws / "reports/metrics.json").is_file()
    assert not unreadable, unreadable


def _leaves(d) -> int:
    return sum(_leaves(v) for v in d.values()) if isinstance(d, dict) else 1


@pytest.mark.slow
def test_metrics_files_hold_headlines_and_details_sit_beside_them(piped):
    ws, _, _ = piped
    stats = json.loads((ws / "data/tuples/stats.json").read_text())
    assert set(stats) == {"tuples", "concepts", "per_split", "concepts_per_split", "negatives"}
    assert stats["tuples"] == 40 and sum(stats["per_split"].values()) == 40 and stats["negatives"]["min_per_test_query"] >= 1
    details = json.loads((ws / "data/tuples/details.json").read_text())
    assert set(details) == {"per_class", "per_medium", "query_box_side", "train_box_side"}
    assert sum(details["per_class"].values()) == 40 and sum(details["per_medium"].values()) == 40
    summary = json.loads((ws / "data/validation/summary.json").read_text())
    assert summary["success"] is True and summary["failed_expectations"] == 0 and summary["failed_families"] == []
    assert summary["failed_family_count"] == 0 and summary["tuples"] == 40 and summary["expectations"] > 10
    assert "checks" not in summary and "counts" not in summary
    checks = json.loads((ws / "data/validation/checks.json").read_text())
    assert len(checks["checks"]) == summary["expectations"] and checks["counts"]["tuples"] == 40
    for phase in ("phase1", "phase2"):
        m = json.loads((ws / f"models/{phase}/metrics.json").read_text())
        assert set(m) == {"best_epoch", "val_recall@1", "val_recall@5", "val_recall@10", "val_box_accuracy"}, (phase, m)
        history = json.loads((ws / f"models/{phase}/history.json").read_text())["history"]
        assert any(k.startswith("train_") for k in history[0])  # the losses stay in the history
    # `dvc metrics show`: tens of figures per file, not hundreds
    shown = json.loads(dvc(ws, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    per_file = {path: _leaves(entry.get("data", {})) for path, entry in files.items()}
    for path in ("data/tuples/stats.json", "data/validation/summary.json", "models/pretrain/metrics.json", "models/phase1/metrics.json",
                 "models/phase2/metrics.json"):
        assert 1 <= per_file[path] <= 30, (path, per_file[path])
    # the pre-training's record: its dashboard figures, its two per-epoch tables (`dvc plots` sources) and its curves
    pre = json.loads((ws / "models/pretrain/metrics.json").read_text())
    assert pre["epochs"] == 1 and pre["diagnostics_epoch"] == 1 and 0 <= pre["val_class_rprecision"] <= 1, pre
    assert pd.read_csv(ws / "models/pretrain/history.csv")["epoch"].tolist() == [1]
    assert pd.read_csv(ws / "models/pretrain/diagnostics.csv")["epoch"].tolist() == [1]
    plotted = json.loads(dvc(ws, "plots", "show", "--json").stdout)["data"]
    assert {"models/pretrain/history.csv", "models/pretrain/diagnostics.csv", "models/phase1/history.csv"} <= set(plotted), sorted(plotted)
    assert (ws / "models/pretrain/curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(path.endswith(("details.json", "checks.json")) for path in per_file)


@pytest.mark.slow
def test_mlflow_parent_and_children(piped):
    ws, _, _ = piped
    runs = tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}")
    parents = runs[runs["tags.ard.kind"] == "pipeline"]
    assert len(parents) == 2  # one per execution
    first_parent = parents.sort_values("start_time").iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == first_parent["run_id"]]
    assert sorted(children["tags.ard.stage"]) == sorted(STAGES)
    assert first_parent["metrics.stages_run"] == len(STAGES)
    by_stage = children.set_index("tags.ard.stage")
    assert by_stage.loc["exemplars", "params.world.n_concepts"] == "20"
    assert by_stage.loc["exemplars", "params.profile"] == "smoke"
    assert by_stage.loc["exemplars", "metrics.exemplars"] == 20
    assert by_stage.loc["tuples", "metrics.tuples"] == 40
    assert by_stage.loc["tuples", "metrics.concepts_test"] >= 1
    assert by_stage.loc["validate", "metrics.success"] == 1.0
    assert (by_stage["status"] == "FINISHED").all()
    # the second execution ran no stage: its parent has no children
    second_parent = parents.sort_values("start_time").iloc[1]
    assert (runs["tags.mlflow.parentRunId"] == second_parent["run_id"]).sum() == 0
    assert second_parent["metrics.stages_run"] == 0
    # both parents carry the effective params, which stages ran / were up to date, and the headline metrics
    order = stages_in_order(ws)
    assert first_parent["tags.ard.stages_ran"].split(",") == order
    assert not first_parent["tags.ard.stages_up_to_date"]
    assert not second_parent["tags.ard.stages_ran"]
    assert second_parent["tags.ard.stages_up_to_date"].split(",") == order
    headline = json.loads((ws / "reports/metrics.json").read_text())
    for parent in (first_parent, second_parent):
        assert parent["params.world.n_concepts"] == "20" and parent["params.profile"] == "smoke"
        assert parent["params.train_phase1.epochs"] == "1" and parent["params.evaluate.figure_queries"] == "1"
        assert parent["metrics.pipeline_seconds"] > 0
        for world in ("test", "world2"):
            for method in ("ARD", "AbC"):
                for k in ("recall@1", "recall@5", "recall@10"):
                    assert parent[f"metrics.{world}.{method}.{k.replace('@', '_at_')}"] == headline[world][method][k]
            assert parent[f"metrics.{world}.ARD.box_accuracy"] == headline[world]["ARD"]["box_accuracy"]
    assert first_parent["metrics.pipeline_seconds"] > second_parent["metrics.pipeline_seconds"]


def _copy_ws(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.mark.slow
def test_corrupted_box_fails_validate_and_touches_nothing(piped, tmp_path):
    ws = _copy_ws(piped[0], tmp_path / "repo")
    path = ws / "data/tuples/tuples.parquet"
    t = pd.read_parquet(path)
    bad_id = t["tuple_id"].iloc[3]
    t.at[3, "query_box"] = [50.0, 40.0, 10.0, 80.0]  # x1 < x0
    t.to_parquet(path, index=False)
    before = {p: digest(p) for p in (ws / "data").rglob("*") if p.is_file() and "validation" not in p.parts}
    proc = dvc(ws, "repro", "--downstream", "validate", check=False)
    assert proc.returncode != 0
    assert bad_id in proc.stdout + proc.stderr
    assert "box_ordered" in proc.stdout + proc.stderr
    after = {p: digest(p) for p in (ws / "data").rglob("*") if p.is_file() and "validation" not in p.parts}
    assert before == after  # earlier outputs untouched
    report = (ws / "data/validation/report.md").read_text()
    assert bad_id in report


@pytest.mark.slow
def test_failed_stage_marks_the_parent_run(piped, tmp_path):
    import yaml

    ws = _copy_ws(piped[0], tmp_path / "repo")
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["validate"]["min_negatives"] = 10_000  # more negatives than the smoke world has: validate fails
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = ard(ws, "pipeline", "run", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stage 'validate' failed" in proc.stderr and "min_negatives" in proc.stdout + proc.stderr
    runs = tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}")
    parent = runs[runs["tags.ard.kind"] == "pipeline"].sort_values("start_time").iloc[-1]
    assert parent["status"] == "FAILED" and parent["tags.ard.status"] == "failed"
    assert parent["tags.ard.stages_failed"] == "validate" and not parent["tags.ard.stages_ran"]
    assert parent["tags.ard.stages_up_to_date"].split(",") == ["check", "exemplars", "generate", "tuples"]
    assert parent["params.validate.min_negatives"] == "10000"
    assert pd.isna(parent.get("metrics.test.ARD.recall_at_10"))  # evaluate was not reached: no headline


def test_requested_stages_are_checked_against_dvc_yaml():
    from ardetect.pipeline import requested_stages

    order = ["check", "pretrain", "train_phase1", "evaluate"]
    assert requested_stages(None, order) == order and requested_stages(["evaluate", "check"], order) == ["evaluate", "check"]
    with pytest.raises(ValueError) as err:
        requested_stages(["pretrian", "evaluate", "zzz"], order)
    assert str(err.value) == ("--stage 'pretrian', 'zzz': not a stage of dvc.yaml ('pretrian': did you mean 'pretrain'?); "
                              "its stages: check, pretrain, train_phase1, evaluate")


def test_the_pipeline_lock_is_held_by_one_run_at_a_time(tmp_path):
    from ardetect.pipeline import PIPELINE_LOCK, PipelineBusy, hold_pipeline_lock

    assert hold_pipeline_lock(tmp_path, "ard pipeline run") is None and list(tmp_path.iterdir()) == []  # no .dvc: no lock made
    (tmp_path / ".dvc").mkdir()
    first = hold_pipeline_lock(tmp_path, "ard pipeline run")
    with pytest.raises(PipelineBusy) as busy:
        hold_pipeline_lock(tmp_path, "the Prefect flow")
    said = str(busy.value)
    assert said.startswith(f"another pipeline is running in {tmp_path.resolve()} (ard pipeline run, PID {os.getpid()}, started ")
    assert f"or kill {os.getpid()})" in said
    # the lock is the OS's, not the file's: closed (or its process ended), it is free, though the file stays
    first.close()
    assert (tmp_path / PIPELINE_LOCK).is_file()
    second = hold_pipeline_lock(tmp_path, "the Prefect flow")
    assert json.loads((tmp_path / PIPELINE_LOCK).read_text())["what"] == "the Prefect flow"
    second.close()


def test_settings_drift_names_what_changed(tmp_path):
    import yaml

    from ardetect.config import load_config
    from ardetect.pipeline import settings_drift

    ws = make_workspace(tmp_path / "repo")
    params = ws / "params.yaml"
    started = load_config(params).model_dump(by_alias=True)
    assert settings_drift(params, started) is None
    raw = yaml.safe_load(params.read_text())
    raw["pretrain"]["epochs"] += 1  # the smoke profile sets its own: the settings the stages run with are the same
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert settings_drift(params, started) is None
    raw["world"]["seed"] += 10
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert settings_drift(params, started) == (f"{params} changed since this pipeline started (world.seed: "
                                               f"{raw['world']['seed'] - 10} -> {raw['world']['seed']})")
    raw["profile"] = "default"  # the profile's overlay counts: every setting it changed is named, the first four shown
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert settings_drift(params, started).endswith(" ...)")
    raw["world"]["seed"] = raw["evaluate"]["generalisation_world_seed"]
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert "equals world.seed: the second world must hold unseen identities" in settings_drift(params, started)
    params.write_text("world: [unclosed\n")
    assert settings_drift(params, started).startswith(f"{params} no longer loads ({params}: not valid YAML")


def _started_waiting(ws, command: list[str]) -> subprocess.Popen:
    """``command`` (a pipeline) started in ``ws``, once its stage has written ``started``."""
    import time

    proc = subprocess.Popen([str(BIN / command[0]), *command[1:]], cwd=ws, env=run_env(ws), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (ws / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc


def _move_world_seed(ws, by: int) -> int:
    """Add ``by`` to ``world.seed`` in the workspace's params.yaml; returns the seed before."""
    params = yaml.safe_load((ws / "params.yaml").read_text())
    seed = params["world"]["seed"]
    params["world"]["seed"] = seed + by
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return seed


@pytest.mark.slow
@pytest.mark.parametrize("command", [["ard", "pipeline", "run"], ["python", "flows/pipeline.py"]], ids=["cli", "flow"])
def test_params_edited_during_a_run_stop_it_before_the_next_stage(tmp_path, command):
    """DVC reads params.yaml afresh for each stage: edited while a pipeline ran (for the next run, say), the stages
    after the edit ran with the new settings and the parent run recorded the old ones beside their metrics. Now the
    pipeline stops before the next stage, saying what changed; the parent run ends FAILED."""
    ws = make_workspace(tmp_path / "repo")
    (ws / "waiter.py").write_text("import os, time\nopen('started', 'w').write('1')\n"
                                  "while not os.path.exists('go'):\n    time.sleep(0.1)\n")
    spec = {"stages": {"waiter": {"cmd": "python waiter.py", "deps": ["waiter.py"]},
                       "after": {"cmd": "python -c \"open('after.txt', 'w').write('ran')\"", "deps": ["waiter.py"], "outs": ["after.txt"]}}}
    (ws / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = _started_waiting(ws, command)
    seed = _move_world_seed(ws, 10)
    (ws / "go").write_text("")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    assert "| after | not run: settings changed |" in out + err, out + err
    said = "not run: params.yaml changed since this pipeline started" if command[0] == "ard" else "not run: /"  # the flow's path is whole
    assert "stage 'after' failed" in err and said in err and f"(world.seed: {seed} -> {seed + 10})" in err, err
    assert not (ws / "after.txt").exists()
    runs = tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}")
    parent = runs[runs["tags.ard.kind"] == "pipeline"]
    assert list(parent["status"]) == ["FAILED"] and list(parent["params.world.seed"]) == [str(seed)], parent


@pytest.mark.slow
def test_code_and_params_edited_while_a_stage_runs_leave_it_stale_in_dvc_lock(tmp_path):
    """DVC hashes a stage's dependencies after its command ends: code or params edited while the stage ran (for the
    next run, say) were written to dvc.lock and the run cache as what its outputs came from, and the next run called
    the stale outputs up to date. Now the lock keeps the inputs the stage started with, so the next run re-runs it; the
    pipeline stops after it, naming what changed, and the parent run ends FAILED."""
    ws = make_workspace(tmp_path / "repo")
    (ws / "pkg").mkdir()
    (ws / "pkg" / "lib.py").write_text("VERSION = 1\n")
    (ws / "pkg" / "other.py").write_text("")
    (ws / "waiter.py").write_text("import os, sys, time\nsys.path.insert(0, 'pkg')\nfrom lib import VERSION\n"
                                  "open('started', 'w').write('1')\nwhile not os.path.exists('go'):\n    time.sleep(0.1)\n"
                                  "open('made.txt', 'w').write(str(VERSION))\n")
    spec = {"stages": {"waiter": {"cmd": "python waiter.py", "deps": ["waiter.py", "pkg"], "params": ["world"],
                                  "outs": ["made.txt"]},
                       "after": {"cmd": "python -c \"open('after.txt', 'w').write('ran')\"", "deps": ["made.txt"],
                                 "outs": ["after.txt"]}}}
    (ws / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = _started_waiting(ws, ["ard", "pipeline", "run"])
    (ws / "pkg" / "lib.py").write_text("VERSION = 2\n")
    seed = _move_world_seed(ws, 10)
    (ws / "go").write_text("")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    row = next((line for line in out.splitlines() if line.startswith("| waiter |")), "")
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert cells[1:2] == ["ran; its inputs changed meanwhile"] and float(cells[2]) > 0 and cells[3] == "waiter", out
    assert "inputs changed while the stage ran ('waiter': pkg (lib.py), params.yaml (world.seed))" in err, err
    assert (ws / "made.txt").read_text() == "1" and not (ws / "after.txt").exists()
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["waiter"]
    assert lock["params"]["params.yaml"]["world"]["seed"] == seed, lock  # what it ran with, not what params.yaml says now
    status = dvc(ws, "status", "waiter").stdout
    assert "modified:" in status and "pkg" in status and "world" in status, status
    runs = tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}")
    assert list(runs[runs["tags.ard.kind"] == "pipeline"]["status"]) == ["FAILED"], runs
    again = ard(ws, "pipeline", "run")  # the edited inputs now: the stage runs again (not restored from the run cache)
    assert "Running stage 'waiter'" in again.stdout and "Running stage 'after'" in again.stdout, again.stdout
    assert (ws / "made.txt").read_text() == "2" and (ws / "after.txt").exists()
    assert "up to date" in dvc(ws, "status").stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", [["dvc", "repro"], ["dvc", "exp", "run"]], ids=["repro", "exp-run"])
def test_a_stage_under_a_dvc_repro_of_ones_own_fails_when_its_inputs_change_while_it_runs(tmp_path, command):
    """Outside the pipeline (a `dvc repro` or `dvc exp run` typed by hand, as the README's seeds loop is) no wrapper
    keeps dvc.lock right, so the stage itself hashes its inputs as it starts and fails when they moved: DVC then records
    nothing for it (no lock entry, no run-cache entry) and the next `dvc repro` re-runs it with the inputs as they are."""
    ws = make_workspace(tmp_path / "repo")
    (ws / "pkg").mkdir()
    (ws / "pkg" / "lib.py").write_text("VERSION = 1\n")
    (ws / "pkg" / "other.py").write_text("")
    (ws / "stage.py").write_text(
        "import os, sys, time\nsys.path.insert(0, 'pkg')\nfrom lib import VERSION\nfrom ardetect.stages.common import run_stage\n"
        "def body(cfg):\n    open('started', 'w').write('1')\n    while not os.path.exists('go'):\n        time.sleep(0.1)\n"
        "    open('made.txt', 'w').write(str(VERSION))\n    return {}\nrun_stage('made', body, lambda cfg: {})\n")
    spec = {"stages": {"made": {"cmd": "python stage.py", "deps": ["stage.py", "pkg"], "params": ["world"], "outs": ["made.txt"]}}}
    (ws / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = _started_waiting(ws, command)
    (ws / "pkg" / "lib.py").write_text("VERSION = 2\n")
    seed = _move_world_seed(ws, 10)
    (ws / "go").write_text("")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, out + err
    assert "[made] FAILED: inputs changed while the stage ran (pkg (lib.py), params.yaml (world.seed))" in err, err
    assert (ws / "made.txt").read_text() == "1"  # its outputs are kept
    lock = ws / "dvc.lock"
    assert not lock.exists() or "made" not in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}), lock.read_text()
    assert "made" in dvc(ws, "status").stdout
    again = dvc(ws, "repro")  # nothing in the run cache stands for the mix: the stage runs with the inputs as they are
    assert "Running stage 'made'" in again.stdout and (ws / "made.txt").read_text() == "2", again.stdout
    locked = yaml.safe_load(lock.read_text())["stages"]["made"]
    assert locked["params"]["params.yaml"]["world"]["seed"] == seed + 10, locked
    assert "up to date" in dvc(ws, "status").stdout
    (ws / "pkg" / "other.py").write_text("X = 1\n")  # edited before a run, not during it: the stage ends as it always did
    assert "Running stage 'made'" in dvc(ws, "repro").stdout and "up to date" in dvc(ws, "status").stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", [["ard", "pipeline", "run"], ["dvc", "repro"]], ids=["pipeline", "repro"])
def test_bytecode_python_writes_into_a_code_folder_while_a_stage_runs_is_no_input_change(tmp_path, command):
    """Python writes a module's bytecode cache (__pycache__/*.pyc) beside it the first time it is imported: during a stage,
    into a code folder the stage depends on. Without PYTHONDONTWRITEBYTECODE (which few machines set) that counted as
    an input edited while the stage ran, under the pipeline and under a dvc repro alike, and as a changed input of every
    stage depending on the folder whenever anything imported it first; .dvcignore now leaves bytecode out."""
    ws = make_workspace(tmp_path / "repo")
    (ws / "pkg").mkdir()
    (ws / "pkg" / "lib.py").write_text("VERSION = 1\n")
    (ws / "stage.py").write_text(
        "import sys\nsys.path.insert(0, 'pkg')\nfrom ardetect.stages.common import run_stage\n"
        "def body(cfg):\n    from lib import VERSION\n    open('made.txt', 'w').write(str(VERSION))\n    return {}\n"
        "run_stage('made', body, lambda cfg: {})\n")
    spec = {"stages": {"made": {"cmd": "python stage.py", "deps": ["stage.py", "pkg"], "outs": ["made.txt"]}}}
    (ws / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {k: v for k, v in run_env(ws).items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list((ws / "pkg" / "__pycache__").glob("lib.*.pyc")), "Python wrote no bytecode: the test tests nothing"
    assert "inputs changed" not in proc.stdout + proc.stderr and (ws / "made.txt").read_text() == "1"
    assert "up to date" in dvc(ws, "status").stdout  # and the cache's presence is no change of the folder either


@pytest.mark.slow
def test_a_second_pipeline_in_the_repository_is_refused_before_any_run(piped, tmp_path):
    """A second `ard pipeline run` beside a running one opened its own MLflow run and failed at its first stage to run
    on DVC's "'data/exemplars' is busy, it is being blocked by: (PID ...)" and "you can manually remove
    '.dvc/tmp/rwlock'", advice that would break the running one. Now it is refused at once, naming the running one."""
    from ardetect.pipeline import hold_pipeline_lock

    ws = _copy_ws(piped[0], tmp_path / "repo")
    before = len(tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}"))
    held = hold_pipeline_lock(ws, "ard pipeline run")  # as a running pipeline holds it
    try:
        proc = ard(ws, "pipeline", "run", check=False)
    finally:
        held.close()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"another pipeline is running in {ws.resolve()} (ard pipeline run, PID {os.getpid()}, started " in proc.stderr, proc.stderr
    assert len(tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}")) == before
    again = ard(ws, "pipeline", "run", "--stage", "check", check=False)  # released: the next one runs
    assert again.returncode == 0, again.stdout + again.stderr


@pytest.mark.slow
def test_a_mistyped_stage_is_refused_before_any_run(piped, tmp_path):
    """`ard pipeline run --stage pretrian` opened a pipeline run, ran DVC and ended FAILED on DVC's "Stage 'pretrian'
    not found inside 'dvc.yaml' file"; now it is refused at once (exit 2), with the stage it is close to."""
    ws = _copy_ws(piped[0], tmp_path / "repo")
    before = len(tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}"))
    proc = ard(ws, "pipeline", "run", "--stage", "pretrian", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--stage 'pretrian': not a stage of dvc.yaml ('pretrian': did you mean 'pretrain'?); its stages: check," in proc.stderr
    assert len(tracking.find_runs("ardetect", f"sqlite:///{ws / 'mlflow.db'}")) == before


@pytest.mark.slow
def test_deleted_image_fails_validate_naming_it(piped, tmp_path):
    ws = _copy_ws(piped[0], tmp_path / "repo")
    t = pd.read_parquet(ws / "data/tuples/tuples.parquet")
    victim = t["query_image"].iloc[5]
    target = ws / "data" / victim
    target.unlink()
    proc = dvc(ws, "repro", "--downstream", "validate", check=False)
    assert proc.returncode != 0
    assert victim in proc.stdout + proc.stderr
    assert not target.exists()


@pytest.mark.slow
def test_bad_param_stops_before_any_stage(tmp_path):
    # a key the smoke overlay does not set (the overlay wins over params.yaml)
    ws = make_workspace(tmp_path / "repo", overrides={"world.identity_drift": 5.0})
    proc = ard(ws, "pipeline", "run", check=False)
    assert proc.returncode != 0
    assert "world.identity_drift" in proc.stdout + proc.stderr
    assert not (ws / "data/exemplars").exists()


@pytest.mark.slow
def test_dvc_experiment_with_another_world_seed(piped, tmp_path):
    ws = _copy_ws(piped[0], tmp_path / "repo")
    before = digest(ws / "data/tuples/tuples.parquet")
    # up to the data gate (the whole pipeline runs in the tests above): the world's stages re-run, nothing after the target
    proc = dvc(ws, "exp", "run", "-S", "world.seed=3", "--name", "seed3", "validate")
    for stage in ("exemplars", "generate", "tuples", "validate"):
        assert f"Running stage '{stage}'" in proc.stdout, stage  # the world changed, so its stages re-ran
    assert "Running stage 'pretrain'" not in proc.stdout
    assert digest(ws / "data/tuples/tuples.parquet") != before  # another world: other tuples, in the workspace
    shown = dvc(ws, "exp", "show", "--csv").stdout
    row = next(line for line in shown.splitlines() if "seed3" in line)
    header = shown.splitlines()[0].split(",")
    assert row.split(",")[header.index("world.seed")] == "3"


def _set_params(ws, **dotted) -> None:
    import yaml

    params = yaml.safe_load((ws / "params.yaml").read_text())
    for key, value in dotted.items():
        *path, last = key.split("__")
        node = params
        for part in path:
            node = node[part]
        node[last] = value
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_dvc_repro_stops_at_the_check_stage_before_the_data(piped, tmp_path):
    """`dvc repro` / `dvc exp run` bypass `ard pipeline run`'s own check: the first stage, `check`, stops them."""
    ws = _copy_ws(piped[0], tmp_path / "repo")
    for p in ("data/exemplars", "data/generated", "data/world2"):
        shutil.rmtree(ws / p)  # the data stages would run now, were they reached
    _set_params(ws, model__pretrained=str(tmp_path / "no-such-checkpoint"))
    proc = dvc(ws, "repro", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "[check] FAILED: model.pretrained=" in out and "no-such-checkpoint' does not exist on this machine" in out, out
    assert "Running stage 'exemplars'" not in out and "Running stage 'world2'" not in out
    assert not (ws / "data/exemplars").exists() and not (ws / "data/world2").exists()


@pytest.mark.slow
def test_a_changed_model_setting_reruns_the_check_alone(piped, tmp_path):
    ws = _copy_ws(piped[0], tmp_path / "repo")
    before = digest(ws / "data/check.json")
    _set_params(ws, model__device="cpu")  # a model setting: the check's param, not the data stages'
    proc = dvc(ws, "repro", "validate", "world2")
    assert "Running stage 'check'" in proc.stdout
    for stage in ("exemplars", "generate", "tuples", "validate", "world2"):
        assert f"Running stage '{stage}'" not in proc.stdout, stage  # the check's output is the same file: nothing cascades
    assert digest(ws / "data/check.json") == before
    assert json.loads((ws / "data/check.json").read_text())["passed"]


@pytest.mark.slow
def test_a_killed_evaluation_goes_on_from_the_queries_it_scored(piped, tmp_path):
    import os
    import signal
    import time

    ws = _copy_ws(piped[0], tmp_path / "repo")
    want = json.loads((ws / "reports/metrics.json").read_text())
    kept = ws / "reports/.evaluate-work"
    cmd = [str(BIN / "python"), "-m", "ardetect.stages.evaluate"]
    proc = subprocess.Popen(cmd, cwd=ws, env=run_env(ws), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(kept.rglob("*.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "evaluate ended before it kept a block of scored queries"
    os.kill(proc.pid, signal.SIGTERM)  # as a cancelled `dvc repro` would
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert list(kept.rglob("*.pt")) and json.loads((ws / "reports/metrics.json").read_text()) == want  # the last results stand
    again = subprocess.run(cmd, cwd=ws, env=run_env(ws), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "queries read back from reports/.evaluate-work/" in again.stdout, again.stdout[-3000:]
    assert json.loads((ws / "reports/metrics.json").read_text()) == want  # the same figures as the run never killed
    assert not kept.exists()  # gone once the evaluation is written


@pytest.mark.slow
def test_ctrl_c_ends_the_stage_cleanly_and_the_next_run_goes_on(piped, tmp_path):
    """SIGINT to `ard pipeline run` alone (`kill -INT`; a terminal's Ctrl-C reaches every process of the group): the
    stage below DVC still gets it (DVC ignores SIGINT while its stage runs) and ends leaving nothing half-written, the
    runs end as KILLED, not FAILED, no process is left behind, and the next run goes on."""
    import signal
    import time

    import mlflow
    import psutil

    ws = _copy_ws(piped[0], tmp_path / "repo")
    _set_params(ws, pretrain__seed=1)  # pretrain is stale: it runs again
    before = digest(ws / "models/pretrain/model.pt")
    # SIGINT as a terminal's session has it: a suite started as a background job inherits it ignored, and every
    # process below would keep it ignored (as Python and the stages do)
    proc = subprocess.Popen([str(BIN / "ard"), "pipeline", "run", "--stage", "pretrain"], cwd=ws, env=run_env(ws),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, started, deadline = [], False, time.monotonic() + 300
    for line in proc.stdout:  # the stage is in its body (its handlers set) once it loads the text encoder's weights
        lines.append(line)
        started = started or "Running stage 'pretrain'" in line
        if started and "Loading weights" in line:
            below = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGINT)
            break
        assert time.monotonic() < deadline, "".join(lines)
    assert started, "".join(lines)
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=300) == 128 + signal.SIGINT, out
    assert "[pretrain] interrupted after" in out and "interrupted (Ctrl-C) at `dvc repro pretrain`" in out, out
    assert "Traceback" not in out, out
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in below if _alive(p)), below
    assert not [p for p in ws.rglob("*.tmp-*")], list(ws.rglob("*.tmp-*"))  # nothing half-written
    assert not (ws / "models/pretrain/model.pt").exists()  # DVC clears a stage's outputs before it runs the stage ...
    dvc(ws, "checkout", "models/pretrain/model.pt")
    assert digest(ws / "models/pretrain/model.pt") == before  # ... and its cache gives back the last ones
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ardetect"], order_by=["start_time DESC"], max_results=2)
    assert sorted(runs["status"]) == ["KILLED", "KILLED"], runs[["status", "tags.mlflow.runName"]]
    assert set(runs["tags.mlflow.runName"]) == {"pipeline [smoke]", "pretrain"}
    again = ard(ws, "pipeline", "run", "--stage", "pretrain")
    assert "stages run: pretrain" in again.stdout
    assert digest(ws / "models/pretrain/model.pt") != before  # the new seed's pre-training, finished


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running()
    except psutil.Error:
        return False
