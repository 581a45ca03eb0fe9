"""A DVC stage's inputs (its dependencies and params) as DVC hashes them, and what changed in them while it ran.

DVC hashes a stage's inputs after its command ends and records those hashes in ``dvc.lock`` (and its run cache) as
what the outputs came from; an input edited while the command ran (the code, for the next experiment) is then recorded
as used. The pipeline's DVC child (``ardetect.pipeline``) and a stage run by a ``dvc repro`` or ``dvc exp run`` of the
user's own (``watch_own_inputs``) hash the inputs as the stage starts and compare when it ends.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

WATCHED_ENV = "ARDETECT_INPUTS_WATCHED"  # set by the pipeline's DVC child, which keeps the lock right itself
SHOWN_FILES = 3


class InputState(NamedTuple):
    meta: Any
    hash_info: Any
    files: dict[str, str] | None  # a folder's files (path inside it -> hash); None for a file or params


def input_state(dep) -> InputState | None:
    """A stage input's DVC hash (and size, and a folder's files), as DVC computes it; None where it cannot be read now."""
    from dvc.dependency.param import ParamsDependency

    try:
        if isinstance(dep, ParamsDependency):
            return InputState(dep.meta, dep.get_hash(), None)
        try:  # one walk of a folder for hash, size and files (DVC 3's get_meta and get_hash each walk it)
            _, meta, obj = dep._build(dep.cache if dep.use_cache else dep.local_cache, dep.fs_path, dep.fs, dep.hash_name,
                                      ignore=dep.dvcignore, dry_run=not dep.use_cache, no_progress_bar=True)
        except (AttributeError, TypeError):  # pragma: no cover - DVC changed its helper: its public API, two walks
            return InputState(dep.get_meta(), dep.get_hash(), None)
        files = {"/".join(key): hi.value for key, _, hi in obj} if obj.hash_info.isdir else None
        return InputState(meta, obj.hash_info, files)
    except Exception:  # noqa: BLE001 - missing or unreadable: DVC itself reports it when the stage runs
        return None


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """The dotted params keys whose values differ between two params hashes (DVC keeps them as nested dicts)."""
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return [prefix.rstrip(".")] if prefix and before != after else []
    return [key for k in sorted(set(before) | set(after), key=str)
            for key in changed_keys(before.get(k), after.get(k), f"{prefix}{k}.")]


def changed_files(before: dict[str, str] | None, after: dict[str, str] | None) -> list[str]:
    """A folder's files that were edited, added or removed between two of its states."""
    if before is None or after is None:
        return []
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def describe_change(dep, before: InputState, after: InputState | None) -> str | None:
    """How input ``dep`` moved from ``before`` (``after``: now; None: gone), e.g. ``params.yaml (world.seed)`` or
    ``src/ardetect/train (phase1.py)``; None when it did not."""
    if after is not None and before.hash_info.value == after.hash_info.value:
        return None
    if after is None:
        return f"{dep} (removed)"
    inside = changed_keys(before.hash_info.value, after.hash_info.value) or changed_files(before.files, after.files)
    if not inside:
        return str(dep)
    more = f", ... {len(inside) - SHOWN_FILES} more" if len(inside) > SHOWN_FILES else ""
    return f"{dep} ({', '.join(inside[:SHOWN_FILES])}{more})"


def inputs_changed_text(inputs: list[str]) -> str:
    return f"inputs changed while the stage ran ({', '.join(inputs)})"


def watch_own_inputs() -> Callable[[], list[str]] | None:
    """For a stage command that DVC runs (``DVC_STAGE``, ``DVC_ROOT`` set) outside the pipeline's DVC child: hash the
    stage's inputs now and return a function that lists those that changed since. None elsewhere (run by hand, under
    the pipeline, or where DVC cannot load the stage)."""
    address, root = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    if not address or not root or os.environ.get(WATCHED_ENV):
        return None
    try:
        from dvc.repo import Repo

        repo = Repo(root)
        path, _, name = address.rpartition(":")
        stage = repo.stage.load_one(os.path.join(root, path or "dvc.yaml"), name)
    except Exception:  # noqa: BLE001 - DVC reads the same file to run the stage: it reports what is wrong there
        return None
    started = [(dep, input_state(dep)) for dep in stage.deps]

    def moved() -> list[str]:
        said = (describe_change(dep, state, input_state(dep)) for dep, state in started if state is not None)
        return [s for s in said if s]

    return moved
