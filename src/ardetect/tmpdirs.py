"""Temporary files and folders beside their final place, named as the caller names the place.

``tempfile`` makes its files 0600 and its folders 0700 whatever the umask; what the project
writes through them (the stages' outputs, the reports, the checkpoints, the index) gets the
permissions a plain ``open`` or ``mkdir`` would give instead, so that another user (a service,
a container, a colleague on a shared machine) can read what a run made, as it could before any
file was written atomically.

A temp name holds its maker's host and process id (``.model.pt.<host>-<pid>-xxxx.tmp``). A process
killed without its clean-up (``kill -9``, the kernel's out-of-memory killer, a power cut) leaves
its temp files and folders behind; the next write of the same target removes those whose maker
ran on this host, in this process namespace, and runs no more, so they cannot pile up beside the
outputs and fill the disk. One whose maker still runs, or ran on another host (a shared file
system) or in another container, is left alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def current_umask() -> int:
    """This process's umask, read without changing it where Linux says it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic across threads; only where /proc is missing)
    os.umask(mask)
    return mask


log = logging.getLogger("ardetect")


def _host_tag() -> str:
    """Six hex digits naming this host and pid namespace: a process id means something only within both (a
    container has its own namespace, and a shared file system other hosts)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha1(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:6]


HOST_TAG = _host_tag()


def owner_tag() -> str:
    """``<host>-<pid>-``: who made a temp name, read back by :func:`sweep_left_behind`."""
    return f"{HOST_TAG}-{os.getpid()}-"


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs in this process namespace."""
    if pid <= 0:  # (os.kill would signal a process group)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: it runs
        return False
    return False


def sweep_left_behind(folder: str | Path, prefix: str) -> list[Path]:
    """Remove the entries of ``folder`` named ``<prefix><host>-<pid>-…`` whose maker ran on this host and runs no
    more (killed before its clean-up); return them. Each one removed is logged."""
    folder = Path(folder)
    owned = re.compile(re.escape(prefix) + r"(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-")
    removed = []
    try:
        names = [e.name for e in os.scandir(folder) if e.name.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        m = owned.match(name)
        if m is None or m["host"] != HOST_TAG or not process_gone(int(m["pid"])):
            continue
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not os.path.lexists(path):
            log.warning("removed %s: left by process %s, which no longer runs (killed before its clean-up)", path, m["pid"])
            removed.append(path)
    return removed


def swap_into_place(made: Path, target: Path) -> None:
    """Replace the folder ``target`` (if any) with the folder ``made``: two renames, then the old one is removed
    (a kill in between leaves it under a temp name the next swap removes)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{owner_tag()}"
        sweep_left_behind(target.parent, f".{target.name}.old-")
        os.replace(target, old)
    os.replace(made, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def temp_dir_beside(target: Path, prefix: str | None = None, suffix: str = "") -> Path:
    """Make a fresh folder next to ``target`` (``.<name>.tmp-<host>-<pid>-xxxx`` unless ``prefix`` says otherwise),
    after removing those of the same name that killed processes left (:func:`sweep_left_behind`).

    The result is relative when ``target`` is: from Python 3.12 ``tempfile.mkdtemp`` returns an
    absolute path even for a relative ``dir``, and the stages record their files relative to the
    data root, so they would no longer find the temp folder under it.
    """
    target = Path(target)
    prefix = f".{target.name}.tmp-" if prefix is None else prefix
    sweep_left_behind(target.parent, prefix)
    made = tempfile.mkdtemp(prefix=prefix + owner_tag(), suffix=suffix, dir=target.parent)
    os.chmod(made, 0o777 & ~current_umask())
    return target.parent / Path(made).name


@contextmanager
def replaced_atomically(target: str | Path, suffix: str = ".tmp") -> Iterator[str]:
    """Yield the path of a fresh temp file beside ``target``; it replaces ``target`` when the block ends.

    A block that raises leaves ``target`` as it was and the temp file removed. The file has the
    permissions ``open(target, "w")`` would give it. The caller writes it by path (or opens it). Temp files of the
    same target that killed processes left are removed first (:func:`sweep_left_behind`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_left_behind(target.parent, f".{target.name}.")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}." + owner_tag(), suffix=suffix, dir=target.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class LockHeld(RuntimeError):
    """Another process holds the lock; ``holder`` is what it recorded (what, pid, started), or {} before it has."""

    def __init__(self, path: Path, holder: dict):
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.holder = holder

    def who(self) -> str:
        h = self.holder
        return f"{h.get('what', '?')}, PID {h['pid']}, started {h.get('started', '?')}" if h.get("pid") else "it has not said who it is yet"

    def kill_hint(self) -> str:
        return f", or kill {self.holder['pid']}" if self.holder.get("pid") else ""


def hold_lock(path: Path, what: str, remove_on_release: bool = False):
    """Take the operating system's lock on ``path`` (``flock``, made if absent) for this process, recording ``what`` holds
    it, its PID and start in the file; return the open file, which holds the lock until it is closed or the process
    ends, however it ends (no stale lock). ``LockHeld`` when another process holds it.

    ``remove_on_release`` (a lock file in a shared folder, such as the temp folder): return a ``RemovedLock``, whose
    ``close`` removes the file while still holding it. A process that locked the file just as it was removed finds
    the path no longer names its file and tries again, so two never hold "the" lock at once."""
    import fcntl
    import json
    import time

    while True:
        lock = open(path, "a+")  # noqa: SIM115 - held open for the caller's work: the caller closes it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            try:
                holder = json.loads(lock.read() or "{}")
            except json.JSONDecodeError:  # being written this instant
                holder = {}
            lock.close()
            raise LockHeld(path, holder if isinstance(holder, dict) else {}) from None
        try:
            current = os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current or not remove_on_release:
            break
        lock.close()  # removed by its last holder after this process opened it: lock the path's file as it is now
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps({"what": what, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    lock.flush()
    return RemovedLock(lock, Path(path)) if remove_on_release else lock


class RemovedLock:
    """A lock taken by ``hold_lock(..., remove_on_release=True)``: ``close`` removes its file, then releases it."""

    def __init__(self, file, path: Path):
        self.file, self.path = file, path

    def close(self) -> None:
        if self.file.closed:
            return
        with suppress(FileNotFoundError):
            os.unlink(self.path)
        self.file.close()
