"""Run the DVC stages in order, one at a time, and tell which ran and which were up to date.

Used by ``ard pipeline run`` (what ``make run`` calls) and by the Prefect flow, so
both drive the same reproduction of each stage and DVC alone decides what is stale.

Each stage is reproduced by a child Python process that calls DVC's own API
(``dvc.repo.Repo.reproduce``, what ``dvc repro <stage>`` runs) and records, for every
stage DVC considered, whether it ran, was up to date or failed; it hands that record
back as JSON. Its output (DVC's messages and the stage commands' own, progress bars
included) streams to the caller meanwhile; nothing is read from that text to decide
what happened.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Signs, in a failed stage's output, of a failure that may pass on its own (another
# process holding a lock, a dropped connection): worth retrying, unlike a bad input.
# DVC's own lock contention is recognised from its exception (``lock_error``).
TRANSIENT = ("Unable to acquire lock", "database is locked", "Connection reset", "Temporary failure")
HEADLINE_KEYS = ("recall@1", "recall@5", "recall@10", "box_accuracy")
HEADLINE_WORLDS = ("test", "world2")
METRICS_FILE = "reports/metrics.json"


@dataclass
class StageOutcome:
    """What reproducing one target stage did: DVC's record of each stage it considered."""

    stage: str
    returncode: int
    ran: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    output: str = ""
    error: str | None = None
    error_type: str | None = None
    lock_error: bool = False
    command_exit: int | None = None  # the stage command's exit status, as DVC saw it (negative: ended by that signal)
    changed_during: dict[str, list[str]] = field(default_factory=dict)  # stage -> its inputs that changed while it ran
    seconds: float | None = None  # wall time of this step (its `dvc repro`, retries included); None: not measured

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def command_signal(self) -> int | None:
        """The signal that ended the stage's command, if one did (-N from DVC, or 128 + N from a shell or a stage
        that turned the signal into its exit status)."""
        status = self.command_exit
        if status is None or status == 0:
            return None
        number = -status if status < 0 else status - 128
        return number if number in set(signal.Signals) else None

    def describe_failure(self) -> str:
        """What failed, and for a stage killed outright what most likely killed it and what to do."""
        text = self.error or f"exit {self.returncode}"
        number = self.command_signal
        if number == signal.SIGKILL:
            text += (". SIGKILL ended the stage: where no one sent it (`kill -9`), it is the kernel's out-of-memory killer, "
                     "which ends the largest process when memory runs out (`dmesg | grep -i 'killed process'` tells). Give it "
                     "more memory, or lower its batch size or worker count in params.yaml; run the same command again to go "
                     "on from the stage's last resume point")
        elif number is not None:
            text += f" ({signal.Signals(number).name} ended the stage)"
        holders = _busy_holders(text)
        return f"{text.rstrip('. ')}. {holders}" if holders else text

    @property
    def skipped(self) -> list[str]:  # the older name of up_to_date
        return self.up_to_date

    @property
    def transient(self) -> bool:
        """A failure worth retrying (lock contention, a dropped connection), not a bad input."""
        if self.ok:
            return False
        return self.lock_error or any(t in self.output for t in TRANSIENT)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "returncode": self.returncode, "ran": self.ran, "up_to_date": self.up_to_date,
            "failed": self.failed, "error": self.error, "error_type": self.error_type, "lock_error": self.lock_error,
            "command_exit": self.command_exit, "changed_during": self.changed_during, "seconds": self.seconds,
        }


def stages_in_order(root: Path) -> list[str]:
    """Stage names as ``dvc.yaml`` lists them (its order is the pipeline's order)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    return list(spec.get("stages", {}))


def requested_stages(requested: Iterable[str] | None, order: list[str], option: str = "--stage") -> list[str]:
    """The stages to run: ``requested`` (all of ``order`` when none), each checked to be one of ``dvc.yaml``'s;
    ``option`` is what the user gave them as (the CLI's ``--stage``, the flow's ``stages`` parameter).

    Raises ``ValueError`` naming what is not, with the closest stage name and the pipeline's stages, before any run is
    opened (DVC's own "Stage 'x' not found inside 'dvc.yaml' file" came after, in a FAILED run)."""
    from ardetect.config import closest

    names = list(requested or order)
    unknown = [s for s in names if s not in order]
    if unknown:
        hints = [f"{s!r}: did you mean {close!r}?" for s in unknown if (close := closest(s, order))]
        raise ValueError(f"{option} {', '.join(map(repr, unknown))}: not a stage of dvc.yaml" + (f" ({'; '.join(hints)})" if hints else "")
                         + f"; its stages: {', '.join(order)}")
    return names


def dvc_executable() -> str:
    """The ``dvc`` beside the running interpreter (the project's venv), else the one on PATH."""
    candidate = Path(sys.executable).with_name("dvc")
    return str(candidate) if candidate.exists() else "dvc"


class RepositoryError(RuntimeError):
    """The source tree is not a repository DVC can run in, and one could not be made."""


def _busy_holders(error: str) -> str:
    """For DVC's "is busy, it is being blocked by: (PID n): ..." (another DVC process, a `dvc exp run` say, holds what
    the stage needs): which of those processes still run, since DVC's own advice, to remove '.dvc/tmp/rwlock' by hand,
    would break a running one. Empty for any other error."""
    if "is busy" not in error:
        return ""
    import psutil

    running = []
    for pid in dict.fromkeys(int(p) for p in re.findall(r"\(PID (\d+)\)", error)):
        try:
            running.append(f"PID {pid} (`{' '.join(psutil.Process(pid).cmdline())[:120]}`)")
        except psutil.Error:
            continue
    if not running:
        return ""
    return (f"{', '.join(running)} {'is' if len(running) == 1 else 'are'} still running: wait for it to end and run again; "
            "do not remove the rwlock while it runs")


class PipelineBusy(RuntimeError):
    """Another pipeline (``ard pipeline run`` or the Prefect flow) is running in this repository."""


PIPELINE_LOCK = Path(".dvc") / "tmp" / "ard-pipeline.lock"


def hold_pipeline_lock(root: Path, what: str):
    """Take the repository's pipeline lock for the caller's run (``what``: ``ard pipeline run``, the flow) and return
    the open lock file, which holds it until closed (or the process ends, however it ends: an OS lock, no stale file).

    Raises ``PipelineBusy`` naming the run that holds it. A second pipeline in the same repository used to open its own
    MLflow run, then fail at its first stage on DVC's "is busy, it is being blocked by (PID ...)" with "you can manually
    remove '.dvc/tmp/rwlock'", advice that breaks the running one. None where the tree has no ``.dvc`` folder (DVC
    itself then refuses to run)."""
    from ardetect.tmpdirs import LockHeld, hold_lock

    path = Path(root) / PIPELINE_LOCK
    if not path.parent.parent.is_dir():
        return None
    path.parent.mkdir(exist_ok=True)
    try:
        return hold_lock(path, what)
    except LockHeld as held:
        raise PipelineBusy(f"another pipeline is running in {Path(root).resolve()} ({held.who()}): wait for it to end, or stop "
                           f"it (Ctrl-C in its terminal{held.kill_hint()}); two at once would write the same outputs") from None


def git_executable() -> str | None:
    return shutil.which("git")


def _no_scm_set(root: Path) -> bool:
    local = root / ".dvc" / "config.local"
    return local.is_file() and re.search(r"^\s*no_scm\s*=\s*true\s*$", local.read_text(), re.M | re.I) is not None


def ensure_repository(root: Path) -> str | None:
    """Make ``root`` a tree DVC can run in; returns what was done, for the caller to say, or None.

    DVC runs inside a git work tree, or with its ``core.no_scm`` setting. A tree unpacked from
    an archive (a release's zip, a copy without ``.git``) has neither, and every stage would
    fail with DVC's bare "not a git repository". With git on this machine the tree becomes a
    repository whose first commit is the tree as found (``.gitignore`` applies), as the
    Dockerfile does, so ``dvc exp run`` works too; without git, ``core.no_scm`` is set in
    ``.dvc/config.local`` (this machine's own DVC settings), where ``dvc repro`` works and
    ``dvc exp run`` does not. A tree inside another repository's work tree is left as it is.
    """
    root = Path(root)
    if _no_scm_set(root):
        return None
    git = git_executable()
    if git is None:
        # no analytics: without a network their report would stay behind in the system's temp folder
        done = subprocess.run([dvc_executable(), "config", "--local", "core.no_scm", "true"], cwd=root, capture_output=True, text=True,
                              env={**os.environ, "DVC_NO_ANALYTICS": "1"})
        if done.returncode:
            raise RepositoryError(f"{root} is not a git repository and git is not installed; setting DVC's core.no_scm "
                                  f"failed: {(done.stderr or done.stdout).strip()}")
        return (f"{root} is not a git repository and git is not installed: set DVC's core.no_scm in .dvc/config.local, "
                "so the stages run without git; `dvc exp run` (the seeds' command) needs git")
    inside = subprocess.run([git, "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True, text=True)
    if inside.returncode == 0 or "not a git repository" not in inside.stderr.lower():
        return None  # a work tree, or one git refuses for its own reason (ownership, say), which DVC then reports
    identity = ["-c", "user.name=ardetect", "-c", "user.email=pipeline@ardetect.invalid"]
    message = "The source tree as the pipeline found it (DVC needs a git repository)"
    for step, args in (("init", ["init", "-q"]), ("add", ["add", "-A"]), ("commit", [*identity, "commit", "-q", "--no-verify", "-m", message])):
        done = subprocess.run([git, *args], cwd=root, capture_output=True, text=True)
        if done.returncode:
            raise RepositoryError(f"{root} is not a git repository, which DVC needs, and `git {step}` "
                                  f"failed making one: {(done.stderr or done.stdout).strip()}. Run `git init` there yourself, "
                                  "or `dvc config --local core.no_scm true` to run without git")
    return (f"{root} was not a git repository, which DVC needs: made one (`git init`), its first commit the tree as found; "
            "`git log` shows it")


# glibc malloc kept from handing freed memory back to the OS between training steps:
# PyTorch on CPU otherwise re-faults its large buffers every step (measured: 10-15% of
# a phase-1 step on 2 cores). The Makefile exports the same values for the tests.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184", "MALLOC_TOP_PAD_": "1073741824"}


class OutputRelay:
    """Passes a stage's output on, as it arrives, to a terminal and/or a line logger.

    ``write`` gets the text unchanged, carriage returns included, so a progress bar
    redraws in place in a terminal. ``log`` gets one call per line (``\\n``), and a line
    a program redrew with ``\\r`` (a tqdm bar) arrives once, in its final state: the
    last non-blank segment before the bar was cleared or the line ended. Blank lines
    are not logged. ``lines`` keeps every line so logged (blank ones too), in order.
    """

    def __init__(self, write: Callable[[str], Any] | None = None, log: Callable[[str], Any] | None = None):
        self._write = write
        self._log = log
        self._current = ""  # the segment being drawn since the last \r or \n
        self._last: str | None = None  # the last complete non-blank segment of this line
        self.lines: list[str] = []

    def feed(self, text: str) -> None:
        if not text:
            return
        if self._write is not None:
            self._write(text)
        pieces = text.split("\n")
        for i, piece in enumerate(pieces):
            segments = piece.split("\r")
            self._current += segments[0]
            for seg in segments[1:]:
                self._carriage_return()
                self._current = seg
            if i < len(pieces) - 1:
                self._end_line()

    def close(self) -> None:
        """Flush a last line that had no newline."""
        if self._current or self._last is not None:
            self._end_line()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def _carriage_return(self) -> None:
        if self._current.strip():
            self._last = self._current
        elif self._last is not None:  # the bar was cleared (tqdm leave=False): its final state
            self._emit(self._last)
            self._last = None
        self._current = ""

    def _end_line(self) -> None:
        if self._current.strip():
            self._emit(self._current)
        elif self._last is not None:
            self._emit(self._last)
        else:
            self._emit("")
        self._current, self._last = "", None

    def _emit(self, line: str) -> None:
        line = line.rstrip()
        self.lines.append(line)
        if self._log is not None and line.strip():
            self._log(line)


def _stage_env() -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # stage commands use the venv's python
    env.setdefault("GX_ANALYTICS_ENABLED", "False")
    env.setdefault("PYTHONUNBUFFERED", "1")  # output streams as it is written
    for key, value in MALLOC_ENV.items():
        env.setdefault(key, value)
    src = str(Path(__file__).resolve().parents[1])  # the child imports this very ardetect
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


_CHILD = "import sys; from ardetect.pipeline import _reproduce_child; sys.exit(_reproduce_child(sys.argv[1:]))"


def repro_stage(
    stage: str,
    root: Path,
    echo: Callable[[str], Any] | None = None,
    force: bool = False,
    write: Callable[[str], Any] | None = None,
) -> StageOutcome:
    """Reproduce ``stage`` (its upstream stages too, when stale) as ``dvc repro <stage>`` does.

    The output streams to ``write`` (raw: carriage returns kept, for a terminal) and
    to ``echo`` (one call per line, each progress bar once in its final state). Which
    stages ran, were up to date or failed comes from DVC's API in the child process.
    """
    root = Path(root).resolve()
    fd, result_path = tempfile.mkstemp(prefix=".ard-repro-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-c", _CHILD, str(root), stage, result_path] + (["--force"] if force else [])
    relay = OutputRelay(write=write, log=echo)
    try:
        # a process group of its own: a stop sent to this process's group (`kill -TERM -PGID`, `timeout make run`, a
        # terminal's Ctrl-C) reaches the DVC child and its stage once, passed on by `_stop_child`, and not also
        # directly, where it ended the DVC child at once and left its stage alone; no terminal input is read
        proc = subprocess.Popen(cmd, cwd=root, env=_stage_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, bufsize=0, process_group=0)
        assert proc.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fileno = proc.stdout.fileno()
        try:
            with _suspended_together(proc.pid):
                while True:
                    chunk = os.read(fileno, 65536)
                    if not chunk:
                        break
                    relay.feed(decoder.decode(chunk))
        except BaseException:  # Ctrl-C, SIGTERM as an orchestrator raises it (Prefect's TerminationSignal), an error
            _stop_child(proc, fileno, relay, decoder)  # in the relay: the stage is stopped, not left running alone
            raise
        relay.feed(decoder.decode(b"", final=True))
        relay.close()
        proc.stdout.close()
        rc = proc.wait()
        try:
            record = json.loads(Path(result_path).read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            record = {}
    finally:
        Path(result_path).unlink(missing_ok=True)
    if not record:
        record = {"error": f"the DVC child process left no result (exit {rc})", "error_type": "NoResult"}
        rc = rc or 1
    changed = dict(record.get("changed_during") or {})
    if changed and rc == 0:  # the stage ran and its outputs are kept, but the pipeline goes no further on them
        rc = 1
        record["error"], record["error_type"] = inputs_changed_message(changed), INPUTS_CHANGED
    return StageOutcome(
        stage,
        rc,
        ran=list(record.get("ran", [])),
        up_to_date=list(record.get("up_to_date", [])),
        failed=list(record.get("failed", [])),
        output=relay.text,
        error=record.get("error"),
        error_type=record.get("error_type"),
        lock_error=bool(record.get("lock_error", False)),
        command_exit=record.get("command_exit"),
        changed_during=changed,
    )


@contextlib.contextmanager
def _suspended_together(group: int):
    """In the block, Ctrl-Z (SIGTSTP) suspends the DVC child's process group ``group`` with this process, and ``fg``
    or ``bg`` (SIGCONT) resumes it: the terminal's job control reaches only this process's own group, and the child
    has one of its own (:func:`repro_stage`). Main thread only; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTSTP) is signal.SIG_IGN:
        yield
        return

    def suspend(signum, frame):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here until SIGCONT (the kernel drops it in an orphaned group)
        signal.signal(signal.SIGTSTP, suspend)
        resume(signal.SIGCONT, None)

    def resume(signum, frame):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGCONT)

    previous = signal.signal(signal.SIGTSTP, suspend), signal.signal(signal.SIGCONT, resume)
    try:
        yield
    finally:
        signal.signal(signal.SIGTSTP, previous[0])
        signal.signal(signal.SIGCONT, previous[1])


class PipelineStopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP stopped the pipeline: it ends as Ctrl-C ends it (:func:`_stop_child`)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# a SIGTERM or SIGHUP this soon after the last is the same stop come by another route (make passes on the SIGTERM that
# `kill -TERM -PGID` sent the whole group), not a second one asking to stop waiting for the stage's clean-up
SAME_STOP_S = 2.0

STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP (its terminal closed)"}


@contextlib.contextmanager
def stop_signals_interrupt():
    """In the block, SIGTERM (``kill``, a scheduler cancelling the job) and SIGHUP (the terminal or
    SSH session closed) stop the pipeline as Ctrl-C does: its stage ends cleanly and the runs end KILLED. Without
    this, either ends the process at once and the DVC child and its stage go on alone. A signal ignored from the
    start (``nohup``) stays ignored. Main thread only."""

    raised_at: list[float] = []  # when the last stop was raised

    def stop(signum, frame):
        if raised_at and time.monotonic() - raised_at[0] < SAME_STOP_S:
            return  # the same stop come by another route: make passes on the SIGTERM `kill -TERM -PGID` sent us too
        raised_at[:] = [time.monotonic()]
        raise PipelineStopped(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# seconds the DVC child and its stage get to end after a stop signal (a stage bounds its own clean-up at 60)
STOP_GRACE_S = 120.0
# seconds what is still running after the grace gets to end on SIGTERM before it is killed
KILL_AFTER_S = 10.0


def _stop_child(proc: subprocess.Popen, fileno: int, relay: OutputRelay, decoder, grace_s: float | None = None) -> None:
    """After Ctrl-C (or anything else that stops the reading of the child's output): let the DVC child and its stage
    end as they end on SIGINT (temp folders removed, the stage's run closed as KILLED, DVC's lock released) and relay
    what they still print, before the pipeline says it stopped.

    They run in a process group of their own (:func:`repro_stage`), so a terminal's Ctrl-C and a stop sent to this
    process's group do not reach them: the signal is passed on here to the DVC child and every process below it. DVC
    ignores it while its stage runs, and the stage takes only the first stop signal (``stages.common``). What has not
    ended after ``grace_s`` is terminated, and what ignores that too is killed ``KILL_AFTER_S`` later.
    """
    import psutil

    grace_s = STOP_GRACE_S if grace_s is None else grace_s
    try:
        child = psutil.Process(proc.pid)
        below = child.children(recursive=True)
    except psutil.Error:  # the DVC child has ended already
        child, below = None, []
    for p in [child, *below] if child is not None else below:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGINT)
            p.resume()  # SIGCONT: one suspended with this process (Ctrl-Z) ends too
    signalled = time.monotonic()
    deadline = signalled + grace_s
    with contextlib.suppress(KeyboardInterrupt, OSError):  # a second Ctrl-C ends the waiting, not the clean-up
        _relay_until_ended(proc, below, fileno, relay, decoder, deadline)
    lingering = [p for p in below if _running(p)]
    if lingering or proc.poll() is None:  # said: a stage ended by SIGTERM may not say it was interrupted
        relay.feed(f"\nstill running {time.monotonic() - signalled:.0f} s after the signal: "
                   f"{', '.join(f'PID {p.pid}' for p in lingering) or f'PID {proc.pid}'}; stopping with SIGTERM\n")
    for p in lingering:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    if proc.poll() is None:
        proc.terminate()
    with contextlib.suppress(KeyboardInterrupt):  # what ignores SIGTERM too (a stopped stage does) is killed
        _, alive = psutil.wait_procs(lingering, timeout=KILL_AFTER_S)
        if alive:
            relay.feed(f"still running {KILL_AFTER_S:.0f} s after SIGTERM: {', '.join(f'PID {p.pid}' for p in alive)}; "
                       "killing it (its next run removes the temp files it left and ends its MLflow run as KILLED)\n")
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
        proc.wait(timeout=30)
    # what the child printed as it ended (the stage's "interrupted" line) may reach the pipe after the last wait
    with contextlib.suppress(KeyboardInterrupt, OSError):
        while select.select([fileno], [], [], 0.5)[0]:
            chunk = os.read(fileno, 65536)
            if not chunk:
                break
            relay.feed(decoder.decode(chunk))
    relay.feed(decoder.decode(b"", final=True))
    relay.close()


def _relay_until_ended(proc: subprocess.Popen, below: list, fileno: int, relay: OutputRelay, decoder, deadline: float) -> None:
    """Relay the child's output until it and every process that was below it have ended, or until ``deadline``
    (the DVC child can end before its stage: it dies at once on a SIGTERM a service manager sends every process of
    its control group)."""
    closed = False  # the output's end comes as a process closes it, a moment before it has ended
    while time.monotonic() < deadline:
        if closed:
            time.sleep(0.05)
        elif select.select([fileno], [], [], max(0.0, min(1.0, deadline - time.monotonic())))[0]:
            chunk = os.read(fileno, 65536)
            relay.feed(decoder.decode(chunk))
            closed = not chunk
            continue
        if proc.poll() is not None and not any(_running(p) for p in below):
            return


def _running(p) -> bool:
    """``p`` (a psutil process) runs and is not a zombie its parent has yet to reap."""
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def repro_with_retries(
    stage: str,
    root: Path,
    retries: int = 2,
    delay_s: float = 5.0,
    notify: Callable[[str], Any] | None = None,
    **kwargs: Any,
) -> StageOutcome:
    """:func:`repro_stage`, tried again (up to ``retries`` times) after a transient failure; the outcome's
    ``seconds`` is the whole step's wall time, its retries and their waits included."""
    start = time.perf_counter()
    outcome = repro_stage(stage, root, **kwargs)
    for attempt in range(retries):
        if not outcome.transient:
            break
        if notify is not None:
            notify(f"stage {stage!r}: transient failure ({outcome.error or 'see output'}); retry {attempt + 1}/{retries} in {delay_s:g} s")
        time.sleep(delay_s)
        outcome = repro_stage(stage, root, **kwargs)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _watch_parent(parent: int, every_s: float = 1.0) -> threading.Thread:
    """Start a daemon thread that, once the process that started this one is gone (``kill -9`` of ``ard pipeline
    run``, or of the Prefect flow's process), passes SIGINT on to every process below this one: the stage ends as on
    Ctrl-C (temp folders removed, its run KILLED) instead of running on with no one to read what it prints."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        import psutil

        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGINT)

    thread = threading.Thread(target=watch, name="ard-parent-watch", daemon=True)
    thread.start()
    return thread


def _own_output() -> Callable[[], None]:
    """Put a pipe of this process's own between what runs below it and the caller's pipe; returns what ends it.

    The stage inherits the DVC child's stdout and stderr. Were they the caller's pipe itself, a caller killed
    outright would leave the stage writing into a closed pipe: a stage that prints often would die of it (a
    BrokenPipeError, the stage FAILED) before ``_watch_parent`` tells it to stop. Here fds 1 and 2 are a pipe that a
    thread copies on to the caller's; once the caller is gone, what comes is read and dropped, so the stage always
    meets the SIGINT and ends cleanly. The returned function lets everything written so far through and ends the copy.
    """
    out = os.dup(1)
    read_end, write_end = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)

    def copy() -> None:
        caller_there = True
        while chunk := os.read(read_end, 65536):
            view = memoryview(chunk)
            while caller_there and view:
                try:
                    view = view[os.write(out, view):]
                except OSError:  # the caller is gone: drop the rest, keep reading so that no writer below blocks or fails
                    caller_there = False
        os.close(read_end)

    thread = threading.Thread(target=copy, name="ard-output-copy", daemon=True)
    thread.start()

    def finish() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)  # the pipe's last write ends here (a process left below, holding it, is not waited on)
        os.dup2(quiet, 2)
        os.close(quiet)
        thread.join(timeout=10)

    return finish


def _reproduce_child(argv: list[str]) -> int:
    """In the child process: ``Repo(root).reproduce(stage)``, recording what DVC did with each stage."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started with SIGINT ignored (a shell without job control starts background commands so, and exec keeps it):
        # the pipeline's stop, passed on as SIGINT (this process group gets it from no one else), would reach no one
        signal.signal(signal.SIGINT, signal.default_int_handler)
    finish_output = _own_output()
    try:
        return _reproduce_in_child(argv)
    finally:
        finish_output()


def _reproduce_in_child(argv: list[str]) -> int:
    root, stage, result_path = argv[0], argv[1], argv[2]
    parent = os.getppid()
    _watch_parent(parent)
    force = "--force" in argv[3:]
    os.chdir(root)
    import logging

    import dvc  # noqa: F401 - sets up DVC's logging as the dvc command has it
    from dvc.lock import LockError
    from dvc.repo import Repo
    from dvc.ui import ui

    try:
        from dvc.repo.reproduce import _reproduce_stage as dvc_reproduce_stage
    except ImportError:  # pragma: no cover - DVC renamed its helper: do what it does
        def dvc_reproduce_stage(st, **kwargs):
            ret = st.reproduce(**kwargs)
            if ret and not kwargs.get("dry", False):
                st.dump(update_pipeline=False)
            return ret

    from ardetect.stage_inputs import WATCHED_ENV

    os.environ[WATCHED_ENV] = "1"  # the stage commands leave the check of their inputs to _watch_inputs
    ui.enable()
    record: dict[str, Any] = {"stage": stage, "ran": [], "up_to_date": [], "failed": [], "error": None,
                              "error_type": None, "lock_error": False, "changed_during": {}}

    def recording_repro_fn(st, **kwargs):
        _watch_inputs(st, record["changed_during"])
        try:
            ret = dvc_reproduce_stage(st, **kwargs)
        except BaseException:
            record["failed"].append(st.addressing)
            raise
        record["ran" if ret else "up_to_date"].append(st.addressing)
        return ret

    rc = 0
    try:
        with Repo(root) as repo:
            ran = repo.reproduce(stage, force=force, single_item=force, repro_fn=recording_repro_fn)
        if not ran:
            ui.write("Data and pipelines are up to date.")
    except Exception as exc:  # noqa: BLE001 - reported in the record and on stderr, as `dvc repro` does
        rc = 255
        chain = []
        cause: BaseException | None = exc
        while cause is not None:
            chain.append(cause)
            cause = cause.__cause__
        record["error"] = re.sub(r"\x1b\[[0-9;]*m", "", ": ".join(str(c) for c in chain if str(c)))  # no colour codes
        record["error_type"] = type(exc).__name__
        record["lock_error"] = any(isinstance(c, LockError) for c in chain)
        for c in chain:  # DVC's StageCmdFailedError keeps the status in its message only
            status = re.search(r", exited with (-?\d+)$", str(c))
            if status:
                record["command_exit"] = int(status[1])
        logging.getLogger("dvc").exception("")  # "ERROR: failed to reproduce ...", as the dvc command prints it
    except KeyboardInterrupt:
        rc = 252
        record["error"], record["error_type"] = "interrupted", "KeyboardInterrupt"
    if os.getppid() != parent:  # the pipeline that asked was killed outright: no one will read or remove its file
        Path(result_path).unlink(missing_ok=True)
        return rc
    with contextlib.suppress(FileNotFoundError):  # a pipeline that stopped waiting removed it: it is not made again
        with os.fdopen(os.open(result_path, os.O_WRONLY | os.O_TRUNC), "w") as out:
            out.write(json.dumps(record))
    return rc


def _watch_inputs(st, changed: dict[str, list[str]]) -> None:
    """Have stage ``st`` record in ``dvc.lock`` the inputs it started with, where one changed while it ran.

    DVC hashes a stage's dependencies and params after its command ends and writes those hashes to ``dvc.lock`` (and
    to its run cache) as what the outputs were made from. A file edited while the stage ran (the code, for the next
    run) was therefore recorded as used, and the next ``dvc repro`` called the stale outputs up to date. Here each
    input is hashed as the command starts; an input whose hash differs when DVC saves the stage keeps its starting
    hash in the lock, so the next run sees the change and re-runs the stage, and the run cache gets no entry for the
    mix. What changed is listed under the stage's address in ``changed``.
    """
    from ardetect.stage_inputs import InputState, describe_change, input_state

    run, save = st.run, st.save
    started: dict[int, InputState | None] = {}

    def watched_run(*args: Any, **kwargs: Any):
        started.update({id(dep): input_state(dep) for dep in st.deps})
        return run(*args, **kwargs)

    def watched_save(allow_missing: bool = False, run_cache: bool = True):
        save(allow_missing=allow_missing, run_cache=False)
        moved = []
        for dep in st.deps:
            state = started.get(id(dep))
            if state is None or state.hash_info.value == dep.hash_info.value:
                continue
            now = input_state(dep) if state.files is not None else None  # a folder: walked again to name its files
            moved.append(describe_change(dep, state, now or InputState(dep.meta, dep.hash_info, None)) or str(dep))
            dep.meta, dep.hash_info = state.meta, state.hash_info
        if moved:
            changed[st.addressing] = moved
            st.md5 = st.compute_md5()
        elif run_cache:
            st.repo.stage_cache.save(st)

    st.run, st.save = watched_run, watched_save


def collate(outcomes: Iterable[StageOutcome], order: list[str] | None = None) -> dict[str, list[str]]:
    """Across the steps of one pipeline execution: the stages that ran, were up to date, failed.

    A later step re-checks the stages an earlier one ran (they are up to date by
    then); a stage counts as ran if any step ran it.
    """
    outcomes = list(outcomes)
    ran = list(dict.fromkeys(s for o in outcomes for s in o.ran))
    failed = list(dict.fromkeys(s for o in outcomes for s in o.failed))
    up = list(dict.fromkeys(s for o in outcomes for s in o.up_to_date if s not in ran and s not in failed))
    if order:
        rank = {name: i for i, name in enumerate(order)}
        ran, up, failed = (sorted(x, key=lambda s: rank.get(s, len(rank))) for x in (ran, up, failed))
    return {"ran": ran, "up_to_date": up, "failed": failed}


SETTINGS_CHANGED = "SettingsChanged"
INPUTS_CHANGED = "InputsChangedDuringRun"


def inputs_changed_message(changed: dict[str, list[str]]) -> str:
    """What to tell of stages whose inputs (code, params) changed while they ran (``_watch_inputs``)."""
    said = "; ".join(f"{stage!r}: {', '.join(inputs)}" for stage, inputs in changed.items())
    return (f"inputs changed while the stage ran ({said}). Its outputs are kept, and dvc.lock records those inputs as they "
            "were when it started, so the next run re-runs it with them as they are now (`dvc status` lists it). The "
            "pipeline stops here rather than run the next stages on outputs made from the inputs before the change")


def settings_drift(params: Path, started: dict) -> str | None:
    """Why the pipeline must stop before its next stage: ``params`` (with its profile overlay) no longer says what it
    said when the pipeline started (``started``: the effective configuration then, as logged to the parent run), or no
    longer loads. None when it says the same.

    DVC reads ``params.yaml`` afresh for each stage: edited during a run (for the next one, say), the stages after the
    edit ran with the new settings, those before with the old, and the parent run recorded the old ones beside
    metrics made under the new."""
    from ardetect.config import ConfigError, load_config
    from ardetect.tracking import flatten

    try:
        now = load_config(params).model_dump(by_alias=True)
    except ConfigError as err:
        said = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        return f"{params} no longer loads ({said[:300]}{'...' if len(said) > 300 else ''})"
    if now == started:
        return None
    before, after = flatten(started), flatten(now)
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    shown = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed[:4]) + (" ..." if len(changed) > 4 else "")
    return f"{params} changed since this pipeline started ({shown})"


def settings_changed_outcome(stage: str, drift: str) -> StageOutcome:
    """The outcome of a stage the pipeline did not run because its settings changed under it (``settings_drift``)."""
    return StageOutcome(stage, 1, error=(f"not run: {drift}. The stages before ran with the settings this run recorded; the rest "
                                         "would have run with the new ones. Run again to go on with the new settings (DVC re-runs "
                                         "what they change), or put the old ones back to go on with those"),
                        error_type=SETTINGS_CHANGED)


def summarize(outcomes: list[StageOutcome]) -> str:
    """A markdown table of what each step did and how long it took (the step's whole `dvc repro`: DVC's checks and
    the stage's start-up besides the stage's own ``done in`` time)."""
    rows = ["| stage | result | seconds | stages run | up to date |", "|---|---|---|---|---|"]
    for o in outcomes:
        result = ("ok" if o.ok else "not run: settings changed" if o.error_type == SETTINGS_CHANGED
                  else "ran; its inputs changed meanwhile" if o.error_type == INPUTS_CHANGED else f"FAILED (exit {o.returncode})")
        seconds = "-" if o.seconds is None else f"{o.seconds:,.1f}"
        rows.append(f"| {o.stage} | {result} | {seconds} | {', '.join(o.ran) or '-'} | {', '.join(o.up_to_date) or '-'} |")
    return "\n".join(rows)


def step_banner(stage: str, index: int, total: int, elapsed_s: float) -> str:
    """The line that opens a pipeline step: which of how many, and the pipeline's time so far."""
    minutes, seconds = divmod(int(elapsed_s), 60)
    return f"==> [{index}/{total}] dvc repro {stage} (pipeline {minutes} min {seconds:02d} s so far)"


def stage_outputs(root: Path, kinds: tuple[str, ...] = ("outs", "metrics", "plots")) -> dict[str, list[str]]:
    """Each stage of ``dvc.yaml`` with the paths it declares as ``kinds`` (outputs, metrics, plots), in order."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    return {name: [str(next(iter(entry)) if isinstance(entry, dict) else entry) for key in kinds for entry in stage.get(key) or []]
            for name, stage in (spec.get("stages") or {}).items()}


def metrics_producer(root: Path, path: str = METRICS_FILE) -> str | None:
    """The stage of ``dvc.yaml`` that declares ``path`` as an output or metric."""
    return next((name for name, paths in stage_outputs(root, ("outs", "metrics")).items() if path in paths), None)


def headline_metrics(metrics: dict) -> dict[str, float]:
    """The evaluation's headline figures as flat metrics: ``test.ARD.recall@10`` and so on.

    Reads the method dicts of ``test`` and ``world2`` (any layout whose methods map
    to dicts); only Recall@1/5/10 and box accuracy, nulls and non-numbers skipped.
    """
    out: dict[str, float] = {}
    for world in HEADLINE_WORLDS:
        methods = metrics.get(world)
        if not isinstance(methods, dict):
            continue
        for method, values in methods.items():
            if not isinstance(values, dict):
                continue
            for key in HEADLINE_KEYS:
                v = values.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{world}.{method}.{key}"] = float(v)
    return out


def record_parent_run(outcomes: list[StageOutcome], root: Path, seconds: float, order: list[str] | None = None) -> dict:
    """Log to the active pipeline parent run what this execution did and what it scores.

    Tags ``ard.stages_ran`` / ``ard.stages_up_to_date`` / ``ard.stages_failed`` (comma
    lists, pipeline order), metrics ``pipeline_seconds`` and ``stages_run``, and the
    evaluation's headline metrics from ``reports/metrics.json`` when the stage that
    writes it was part of this execution and is current (ran or up to date), so every
    full pipeline run carries them; absent file, nothing logged.
    """
    import mlflow

    from ardetect import tracking

    root = Path(root)
    done = collate(outcomes, order)
    active = mlflow.active_run()
    if active is not None and not all(o.ok for o in outcomes):  # a stage killed (out of memory) could not close its run
        tracking.close_abandoned_runs(mlflow.get_tracking_uri(), experiment_id=active.info.experiment_id)
    tracking.set_tags(
        {
            "ard.stages_ran": ",".join(done["ran"]),
            "ard.stages_up_to_date": ",".join(done["up_to_date"]),
            "ard.stages_failed": ",".join(done["failed"]),
            "ard.status": "ok" if outcomes and all(o.ok for o in outcomes) else "failed",
        }
    )
    tracking.log_metrics({"pipeline_seconds": seconds, "stages_run": len(done["ran"])})
    headline: dict[str, float] = {}
    producer = metrics_producer(root)
    path = root / METRICS_FILE
    if producer is not None and producer in done["ran"] + done["up_to_date"] and path.is_file():
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            metrics = {}
        headline = headline_metrics(metrics)
        tracking.log_metrics(headline)
        bars = metrics.get("bars")
        if isinstance(bars, dict) and bars:
            tracking.set_tags({"ard.bars_met": f"{sum(bool(v) for v in bars.values())}/{len(bars)}"})
        if headline:
            tracking.log_dict({"metrics_file": METRICS_FILE, "headline": headline, "bars": bars or {}}, "pipeline/headline.json")
    tracking.log_dict({**done, "steps": [o.to_dict() for o in outcomes], "seconds": seconds}, "pipeline/outcome.json")
    return {**done, "headline": headline}
