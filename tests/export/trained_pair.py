"""Helpers of the export tests: negatives of a tiny world, and a detector trained on it through both phases."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def negatives_of(tuples: pd.DataFrame) -> pd.DataFrame:
    """Each tuple's negatives: the training images of the other concepts of its split."""
    rows = []
    for t in tuples.itertuples(index=False):
        pool = tuples[(tuples["split"] == t.split) & (tuples["concept_id"] != t.concept_id)].drop_duplicates("concept_id")
        rows += [{"tuple_id": t.tuple_id, "neg_image": x, "neg_concept_id": c} for x, c in zip(pool["train_image"], pool["concept_id"])]
    return pd.DataFrame(rows)


def train_pair(cfg, tuples: pd.DataFrame, root: Path, out: Path) -> tuple[Path, Path]:
    """(phase-1, phase-2) checkpoints of ``cfg`` trained a few steps on ``tuples``."""
    from ardetect.train.phases import run_phase1, run_phase2

    run_phase1(cfg, tuples, root, out / "p1", resume=False)
    run_phase2(cfg, out / "p1" / "best.pt", tuples, root, out / "p2", resume=False)
    return out / "p1" / "best.pt", out / "p2" / "best.pt"
