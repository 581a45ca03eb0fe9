"""Fixtures of the export tests: a tiny world and a detector trained on it through both phases."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from tiny_world import draw_world, fast_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trained_pair import negatives_of, train_pair  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(tuples with more test concepts, negatives, data root, phase-1 path, phase-2 path) of a nano detector."""
    root = tmp_path_factory.mktemp("exportworld")
    tuples = draw_world(root, n_concepts=16)
    tuples.loc[tuples["concept_id"].isin([f"c{c:03d}" for c in range(8, 12)]), "split"] = "test"  # 6 test concepts
    cfg = fast_config(train_phase1={"epochs": 1, "max_steps_per_epoch": 4}, train_phase2={"max_steps_per_epoch": 2})
    p1, p2 = train_pair(cfg, tuples, root, root / "models")
    return tuples, negatives_of(tuples), root, p1, p2
