"""Temp folders beside their target keep the caller's relative form (Python 3.12's mkdtemp does not); temp files
and folders take the permissions the umask gives, not tempfile's 0600 and 0700; an atomic write that fails keeps the old file."""

import os
import stat
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from ardetect.stages.common import atomic_dir, rebase_paths
from ardetect.tmpdirs import current_umask, replaced_atomically, temp_dir_beside


def _absolute_mkdtemp(monkeypatch):
    real = tempfile.mkdtemp
    # Python >= 3.12: "mkdtemp() now always returns an absolute path, even if dir is relative"
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: os.path.abspath(real(*a, **k)))


def test_relative_target_gives_relative_folder_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _absolute_mkdtemp(monkeypatch)
    Path("data").mkdir()
    made = temp_dir_beside(Path("data") / "exemplars")
    assert not made.is_absolute()
    assert made.parent == Path("data") and made.name.startswith(".exemplars.tmp-") and made.is_dir()
    custom = temp_dir_beside(Path("data/docs"), prefix=".docs.", suffix=".tmp")
    assert custom.parent == Path("data") and custom.name.startswith(".docs.") and custom.name.endswith(".tmp")
    absolute = temp_dir_beside(tmp_path / "data" / "x")
    assert absolute.is_absolute() and absolute.parent == tmp_path / "data"


def test_stage_records_paths_under_data_root_with_absolute_mkdtemp(tmp_path, monkeypatch):
    # the device's Python 3.12 failed the exemplars stage: "'/…/data/.exemplars.tmp-…' is not in the subpath of 'data'"
    monkeypatch.chdir(tmp_path)
    _absolute_mkdtemp(monkeypatch)
    root, final = Path("data"), Path("data") / "exemplars"
    with atomic_dir(final) as tmp:
        (tmp / "a.png").write_bytes(b"x")
        written = [(tmp / "a.png").relative_to(root).as_posix()]
        assert rebase_paths(pd.Series(written), tmp, final, root) == ["exemplars/a.png"]
    assert (final / "a.png").read_bytes() == b"x"
    assert [p.name for p in root.iterdir()] == ["exemplars"]


@pytest.fixture
def umask():
    """Set the process umask for one test, and restore it."""
    before = os.umask(0o022)
    os.umask(before)
    yield lambda mask: os.umask(mask)
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002])
def test_temp_files_and_folders_take_the_umask_permissions(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    target = tmp_path / "out" / "metrics.json"
    with replaced_atomically(target) as tmp:
        Path(tmp).write_text("{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # as open(target, "w") would make it
    folder = temp_dir_beside(tmp_path / "exemplars")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask  # as mkdir would make it
    plain = tmp_path / "plain"
    plain.write_text("")
    assert stat.S_IMODE(plain.stat().st_mode) == stat.S_IMODE(target.stat().st_mode)


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk gone"), replaced_atomically(target) as tmp:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("disk gone")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    with replaced_atomically(target, suffix=".png") as tmp:
        assert tmp.endswith(".png") and Path(tmp).parent == tmp_path
        Path(tmp).write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def _dead_pid() -> int:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_what_a_killed_writer_left_is_removed_by_the_next_write_and_nothing_else(tmp_path, caplog):
    """A process killed before its clean-up (kill -9, out of memory) leaves its temp file or folder; the next write
    of the same target removes it. Kept: a live process's (another writer at work), another host's or container's
    (its process ids mean nothing here), another target's, and names this project did not make."""
    from ardetect.tmpdirs import HOST_TAG, swap_into_place

    dead = _dead_pid()
    mine, other_host = f"{HOST_TAG}-{dead}-", f"{'0' if HOST_TAG[0] != '0' else '1'}{HOST_TAG[1:]}-{dead}-"
    left = {
        f".model.pt.{mine}abc.tmp": "file", f".exemplars.tmp-{mine}xyz": "dir", f".exemplars.old-{mine}": "dir",
    }
    kept = {
        f".model.pt.{HOST_TAG}-{os.getpid()}-live.tmp": "file", f".model.pt.{other_host}abc.tmp": "file",
        f".other.pt.{mine}abc.tmp": "file", ".model.pt.legacy.tmp": "file", f".exemplars.tmp-{other_host}xyz": "dir",
    }
    for name, kind in {**left, **kept}.items():
        (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_text("half")
    with caplog.at_level("WARNING", logger="ardetect"), replaced_atomically(tmp_path / "model.pt") as tmp:
        Path(tmp).write_text("new")
    assert not (tmp_path / f".model.pt.{mine}abc.tmp").exists() and f"left by process {dead}, which no longer runs" in caplog.text
    made = temp_dir_beside(tmp_path / "exemplars")
    assert made.name.startswith(f".exemplars.tmp-{HOST_TAG}-{os.getpid()}-")
    (tmp_path / "exemplars").mkdir()
    swap_into_place(made, tmp_path / "exemplars")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "model.pt", "exemplars"])


def test_a_lock_removed_on_release_leaves_no_file_and_never_lets_two_hold_it(tmp_path, monkeypatch):
    """A lock file in a shared folder (the export's, in the temp folder) was left there, one per --out ever used. Now it
    is removed on release, while still held; a process that opened it just before the removal locks a file no path
    names any more, sees so and locks the path's file as it is now, so two never hold the lock at once."""
    import fcntl

    from ardetect.tmpdirs import LockHeld, hold_lock

    path = tmp_path / "x.lock"
    first = hold_lock(path, "first", remove_on_release=True)
    with pytest.raises(LockHeld, match="first"):
        hold_lock(path, "second", remove_on_release=True)
    first.close()
    first.close()  # a second close does nothing
    assert not path.exists()

    # The race: "late" opened the file of a holder that then removed it and released it; a third took the path anew.
    stale = open(path, "a+")  # noqa: SIM115 - the file "late" opened, about to be removed
    path.unlink()
    third = hold_lock(path, "third", remove_on_release=True)
    opened = []
    real_open = open

    def late_open(p, mode="r", *a, **k):  # the first open "late" makes gets the removed file; later ones the path's
        opened.append(p)
        return stale if len(opened) == 1 else real_open(p, mode, *a, **k)

    monkeypatch.setattr("builtins.open", late_open)
    with pytest.raises(LockHeld, match="third"):
        hold_lock(path, "late", remove_on_release=True)  # not given the removed file's lock as if it were the lock
    assert len(opened) == 2 and stale.closed
    monkeypatch.undo()
    third.close()
    kept = hold_lock(path, "kept")  # without the option: the file stays after release, as the pipeline's lock does
    kept.close()
    assert path.exists()
    with open(path) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and nothing holds it
