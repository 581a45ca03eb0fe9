"""Temporary folders beside their final place, named as the caller names the place."""

from __future__ import annotations

import tempfile
from pathlib import Path


def temp_dir_beside(target: Path, prefix: str | None = None, suffix: str = "") -> Path:
    """Make a fresh folder next to ``target`` (``.<name>.tmp-xxxx`` unless ``prefix`` says otherwise).

    The result is relative when ``target`` is: from Python 3.12 ``tempfile.mkdtemp`` returns an
    absolute path even for a relative ``dir``, and the stages record their files relative to the
    data root, so they would no longer find the temp folder under it.
    """
    target = Path(target)
    made = tempfile.mkdtemp(prefix=f".{target.name}.tmp-" if prefix is None else prefix, suffix=suffix, dir=target.parent)
    return target.parent / Path(made).name
