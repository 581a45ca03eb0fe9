"""Temp folders beside their target keep the caller's relative form (Python 3.12's mkdtemp does not)."""

import os
import tempfile
from pathlib import Path

import pandas as pd

from ardetect.stages.common import atomic_dir, rebase_paths
from ardetect.tmpdirs import temp_dir_beside


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
