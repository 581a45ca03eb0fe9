"""Temporary files and folders beside their final place, named as the caller names the place.

``tempfile`` makes its files 0600 and its folders 0700 whatever the umask; what the project
writes through them (the stages' outputs, the reports, the checkpoints, the index) gets the
permissions a plain ``open`` or ``mkdir`` would give instead, so that another user (a service,
a container, a colleague on a shared machine) can read what a run made, as it could before any
file was written atomically.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def temp_dir_beside(target: Path, prefix: str | None = None, suffix: str = "") -> Path:
    """Make a fresh folder next to ``target`` (``.<name>.tmp-xxxx`` unless ``prefix`` says otherwise).

    The result is relative when ``target`` is: from Python 3.12 ``tempfile.mkdtemp`` returns an
    absolute path even for a relative ``dir``, and the stages record their files relative to the
    data root, so they would no longer find the temp folder under it.
    """
    target = Path(target)
    made = tempfile.mkdtemp(prefix=f".{target.name}.tmp-" if prefix is None else prefix, suffix=suffix, dir=target.parent)
    os.chmod(made, 0o777 & ~current_umask())
    return target.parent / Path(made).name


@contextmanager
def replaced_atomically(target: str | Path, suffix: str = ".tmp") -> Iterator[str]:
    """Yield the path of a fresh temp file beside ``target``; it replaces ``target`` when the block ends.

    A block that raises leaves ``target`` as it was and the temp file removed. The file has the
    permissions ``open(target, "w")`` would give it. The caller writes it by path (or opens it).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
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
