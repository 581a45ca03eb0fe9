"""A rendered synthetic world on disk for the data-quality tests, and table helpers they share."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ardetect.config import SplitConfig
from ardetect.data.schema import NEGATIVE_COLUMNS
from ardetect.data.tuples import assign_splits


def negatives_for(tuples: pd.DataFrame) -> pd.DataFrame:
    """The negatives of each tuple: the training image of every other concept in its split."""
    concepts = tuples.drop_duplicates("concept_id")[["concept_id", "split", "train_image"]].rename(
        columns={"concept_id": "neg_concept_id", "train_image": "neg_image"}
    )
    pairs = tuples[["tuple_id", "concept_id", "split"]].merge(concepts, on="split")
    pairs = pairs[pairs["concept_id"] != pairs["neg_concept_id"]]
    return pairs[list(NEGATIVE_COLUMNS)].reset_index(drop=True)


@dataclass(frozen=True)
class World:
    """A rendered synthetic world on disk: every table of the record, as the stages write them."""

    root: Path
    exemplars: pd.DataFrame
    generated: pd.DataFrame
    objects: pd.DataFrame
    tuples: pd.DataFrame
    negatives: pd.DataFrame

    def copy(self, root: Path | None = None) -> "World":
        """Fresh copies of the tables; with ``root``, the files copied there too."""
        if root is not None:
            shutil.copytree(self.root, root)
        return World(root or self.root, *(getattr(self, f).copy(deep=True)
                                          for f in ("exemplars", "generated", "objects", "tuples", "negatives")))


WORLD_SPLIT = SplitConfig(train=0.6, val=0.2, test=0.2)  # 10 concepts: 6 / 2 / 2, so every tuple has a negative


def draw_world(root: Path) -> World:
    """10 concepts x 2 queries of the synthetic world at 96 px (as the smoke profile draws it), under ``root``."""
    from ardetect.config import WorldConfig
    from ardetect.data.tuples import build_negatives, build_tuples
    from ardetect.data.world import make_exemplars, make_generated

    cfg = WorldConfig(n_concepts=10, queries_per_concept=2, image_size=96, workers=1)
    ex, ex_obj = make_exemplars(cfg, root / "exemplars", root)
    gen, gen_obj = make_generated(cfg, ex, root / "generated", root)
    splits = assign_splits(ex, WORLD_SPLIT, 0)
    tuples = build_tuples(ex, gen, splits)
    return World(root, ex, gen, pd.concat([ex_obj, gen_obj], ignore_index=True), tuples, build_negatives(tuples, ex, splits))

