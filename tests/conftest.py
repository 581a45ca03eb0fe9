"""Shared fixtures: an isolated DVC workspace on the smoke profile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workspace import dvc, make_workspace

# Prefect's ephemeral API server migrates its database on its first start: more than its 20-s default
# on a busy 2-core machine (read when prefect is imported; `make test` sets it too)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Registered versions a test downloads go to the run's temporary folder, not the user's cache."""
    if "ARD_MODEL_CACHE" not in os.environ:
        os.environ["ARD_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    return Path(os.environ["ARD_MODEL_CACHE"])


@pytest.fixture(scope="session")
def smoke_workspace(tmp_path_factory) -> Path:
    """A smoke-profile workspace with the data stages run once (shared, treat as read-only)."""
    ws = make_workspace(tmp_path_factory.mktemp("ws") / "repo")
    dvc(ws, "repro")
    return ws


# The end-to-end pipeline files take most of the suite's time. Collected first, a parallel run
# (`make test`: pytest -n, --dist loadfile, --no-loadscope-reorder) starts them at once on
# different workers instead of leaving them for last.
LONGEST_FIRST = ("test_pipeline.py", "test_flow.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every other test keeps its order
