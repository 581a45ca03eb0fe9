"""Fixtures for the data-quality tests: a small, valid tuple data set on disk."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ardetect.config import SplitConfig
from ardetect.data.schema import NEGATIVE_COLUMNS, TUPLE_COLUMNS
from ardetect.data.tuples import assign_splits
from content_world import World, draw_world, negatives_for

CLASSES = ("cat", "dog", "mug", "car")
MEDIA = ("photo", "charcoal sketch", "oil painting")


@dataclass(frozen=True)
class TupleData:
    """A tuple data set: the two tables and the data root their image paths are relative to."""

    root: Path
    tuples: pd.DataFrame
    negatives: pd.DataFrame

    def copy(self, root: Path | None = None) -> "TupleData":
        """Fresh copies of the tables; with ``root``, the image files copied there too."""
        if root is not None:
            shutil.copytree(self.root, root)
        return replace(
            self,
            root=root or self.root,
            tuples=self.tuples.copy(deep=True),
            negatives=self.negatives.copy(deep=True),
        )

    def with_tables(self, tuples: pd.DataFrame | None = None, negatives: pd.DataFrame | None = None) -> "TupleData":
        """The same data root with other tables."""
        return replace(
            self,
            tuples=self.tuples if tuples is None else tuples,
            negatives=self.negatives if negatives is None else negatives,
        )

    @staticmethod
    def negatives_for(tuples: pd.DataFrame) -> pd.DataFrame:
        """Negatives rebuilt from a tuples table (see :func:`negatives_for`)."""
        return negatives_for(tuples)


def _png(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_tuple_data(
    root: Path,
    n_concepts: int = 20,
    per_concept: int = 2,
    size: int = 32,
    classes: tuple[str, ...] = CLASSES,
    split: SplitConfig | None = None,
) -> TupleData:
    """Write a valid data set under ``root``: PNGs, tuples table (by-concept splits), negatives."""
    split = split or SplitConfig()
    exemplars = pd.DataFrame(
        {
            "concept_id": [f"c{i:05d}" for i in range(n_concepts)],
            "base_class": [classes[i % len(classes)] for i in range(n_concepts)],
        }
    )
    splits = assign_splits(exemplars, split, seed=0)
    rows = []
    for i, (cid, cls) in enumerate(exemplars.itertuples(index=False)):
        train_image = f"exemplars/images/{cid}.png"
        _png(root / train_image, (size, size), seed=i)
        for j in range(per_concept):
            qid = f"{i:05d}_{j:02d}"
            query_image = f"generated/images/q{qid}.png"
            _png(root / query_image, (size, size), seed=10_000 + i * 100 + j)
            medium = MEDIA[(i + j) % len(MEDIA)]
            template = f"A {medium} of a {{}} sitting on a rock."
            rows.append(
                {
                    "tuple_id": f"t{qid}",
                    "split": splits[cid],
                    "concept_id": cid,
                    "base_class": cls,
                    "group": "misc_objects",
                    "prompt": template.format(f"V* {cls}"),
                    "concept_phrase": f"V* {cls}",
                    "template": template,
                    "medium": medium,
                    "query_image": query_image,
                    "query_box": [2.0 + j, 3.0, size * 0.7 + j, size * 0.8],
                    "query_width": size,
                    "query_height": size,
                    "train_image": train_image,
                    "train_box": [4.0, 4.5, size * 0.75, size - 2.0],
                    "train_width": size,
                    "train_height": size,
                    "generator": "synthetic",
                    "gen_seed": i * 100 + j,
                }
            )
    tuples = pd.DataFrame(rows, columns=list(TUPLE_COLUMNS))
    tuples["query_width"] = tuples["query_width"].astype("int64")
    negatives = negatives_for(tuples)
    for col in NEGATIVE_COLUMNS:  # as the tuples stage writes them
        negatives[col] = negatives[col].astype("category")
    return TupleData(root=root, tuples=tuples, negatives=negatives)


@pytest.fixture(scope="session")
def tuple_data(tmp_path_factory) -> TupleData:
    """20 concepts (4 classes) x 2 tuples, 32-px PNGs; valid. Treat as read-only: use ``.copy()``."""
    return make_tuple_data(tmp_path_factory.mktemp("tuple_data") / "data")


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    """10 concepts x 2 queries of the synthetic world at 96 px (as the smoke profile draws it). Read-only: ``.copy()``."""
    return draw_world(tmp_path_factory.mktemp("world") / "data")
