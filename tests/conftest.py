"""Shared fixtures: an isolated DVC workspace on the smoke profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from workspace import dvc, make_workspace


@pytest.fixture(scope="session")
def smoke_workspace(tmp_path_factory) -> Path:
    """A smoke-profile workspace with the data stages run once (shared, treat as read-only)."""
    ws = make_workspace(tmp_path_factory.mktemp("ws") / "repo")
    dvc(ws, "repro")
    return ws
