"""Shared fixtures: an isolated DVC workspace on the smoke profile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ardetect.procs import usable_cores
from checkout import CHECKOUT, allowed_folders, checkout_extras, left_in_checkout
from workspace import dvc, make_workspace

# Prefect's ephemeral API server migrates its database on its first start: more than its 20-s default
# on a busy 2-core machine (read when prefect is imported; `make test` sets it too)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

# The stages and commands the tests start write Python's bytecode beside the code, as on most machines: one whose
# environment says not to (PYTHONDONTWRITEBYTECODE) hid that the caches counted as inputs edited while a stage ran
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def worker_threads() -> int | None:
    """Intra-op threads for each of a parallel run's workers: the cores divided among them (None outside
    pytest-xdist). Each worker's torch, and every process it starts (the stages, through OMP_NUM_THREADS), would
    otherwise take every core: two smoke pipelines side by side on 2 cores took 184-202 s that way, 110-127 s
    with one thread each."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2:
        return None
    return max(1, usable_cores() // workers)


THREADS = worker_threads()
if THREADS is not None:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))  # read by torch when it is first imported, here or in a subprocess


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (the Makefile's default): one worker a usable core, a cgroup's CPU quota included, where
    pytest-xdist would count the machine's cores."""
    return usable_cores()


def pytest_configure(config):
    if THREADS is not None:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch before this file


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


# Nothing a test does may land in the checkout itself (a user's `make test` left MLflow artifacts and kept evaluation
# scores there, and a later run could read those scores back). What git lists as untracked or ignored when the run ends,
# and did not list as it started, is named; on CI (`.ci/run` sets CI) the run fails on it.
_EXTRAS_KEY = pytest.StashKey[set]()


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controller of a parallel run, or the only process
        session.config.stash[_EXTRAS_KEY] = checkout_extras()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_EXTRAS_KEY, None)
    if before is None or hasattr(session.config, "workerinput"):
        return
    after = checkout_extras()
    if after is None:
        return
    left = left_in_checkout(before, after, allowed_folders(os.environ.get("ARD_SCREENSHOT_DIR")))
    if not left:
        return
    ci = bool(os.environ.get("CI"))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"{'FAILED' if ci else 'warning'}: the test run wrote into the checkout {CHECKOUT}: "
                            f"{', '.join(left)}", red=True)
    if ci and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
