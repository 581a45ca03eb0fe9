"""Fixtures of the training tests: a tiny hand-drawn tuple set."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tiny_world import draw_world


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    root = tmp_path_factory.mktemp("tinyworld")
    return draw_world(root), root
