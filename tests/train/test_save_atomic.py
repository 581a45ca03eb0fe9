"""Checkpoints are written atomically, byte for byte the same for the same weights, and an unreadable resume point is set aside."""

from __future__ import annotations

import hashlib

import pytest
import torch

from ardetect.train.engine import read_resume_point, save_atomic


def _digest(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(8, 4, generator=g), "b": torch.zeros(4)}, "epochs": 3, "history": [{"loss": 0.5}]}


def test_equal_weights_give_equal_files(tmp_path):
    # DVC tracks the model files by digest: a re-run that trains the same weights must not look
    # like a changed output (that would re-run every stage after it)
    a = save_atomic(_state(0), tmp_path / "a" / "model.pt")
    b = save_atomic(_state(0), tmp_path / "b" / "model.pt")
    again = _digest(a)
    save_atomic(_state(0), a)
    assert _digest(a) == _digest(b) == again
    assert _digest(save_atomic(_state(1), tmp_path / "c" / "model.pt")) != again
    loaded = torch.load(a, weights_only=False)
    assert torch.equal(loaded["model"]["w"], _state(0)["model"]["w"]) and loaded["epochs"] == 3
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.pt"]  # no temp file left


def test_failed_save_keeps_the_old_file(tmp_path):
    path = save_atomic(_state(0), tmp_path / "model.pt")
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_atomic({"model": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("how", ["truncated", "garbage", "not a dict"])
def test_unreadable_resume_point_is_moved_aside_not_lost(tmp_path, capsys, how):
    # a resume checkpoint cut short or overwritten from outside would fail every later run of the
    # stage: it is set aside (its bytes kept) and the stage starts afresh
    latest = save_atomic(_state(0), tmp_path / "latest.pt")
    data = latest.read_bytes()
    if how == "truncated":
        latest.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        latest.write_bytes(b"not a checkpoint at all")
    else:
        torch.save([1, 2, 3], latest)
    bad = latest.read_bytes()
    assert read_resume_point(latest, "phase 1") is None
    assert not latest.exists()
    assert (tmp_path / "latest.pt.unreadable").read_bytes() == bad
    out = capsys.readouterr().out
    assert f"[phase 1] {latest} cannot be read" in out and "starting afresh" in out


def test_readable_or_missing_resume_point(tmp_path):
    assert read_resume_point(tmp_path / "latest.pt", "pretrain") is None  # none yet
    latest = save_atomic(_state(1), tmp_path / "latest.pt")
    ck = read_resume_point(latest, "pretrain")
    assert torch.equal(ck["model"]["w"], _state(1)["model"]["w"]) and ck["epochs"] == 3
    assert latest.exists() and not (tmp_path / "latest.pt.unreadable").exists()


def test_out_of_memory_while_reading_keeps_the_resume_point(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_atomic(_state(0), path)
    before = _digest(path)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, "load", no_memory)
    with pytest.raises(MemoryError):
        read_resume_point(path, "pretrain")
    assert _digest(path) == before and not (tmp_path / "latest.pt.unreadable").exists()
