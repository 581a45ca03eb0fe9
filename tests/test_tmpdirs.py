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
