"""Ceilings of a score that reads classes only: methods that know every object's base class.

The record's ``objects`` table lists every object of every image with its base class and
box. A score that finds the query's class perfectly, and nothing else, ranks the candidates
that hold an object of that class first, in no particular order among themselves: that is
``ClassOracle``. Where many training images also hold an object of the class as a
distractor, even this perfect class detector leaves the class R-precision well short of 1;
``ClassOracle(by_size=True)`` also prefers the image whose object of the class is largest
(concepts are drawn larger than distractors), the most a class-and-size score can reach.

They are references, as chance is: they read the ground truth and are no method. Ties are
broken by seeded random numbers (per query), so their Recall@K is that of a random order
among the images they cannot tell apart, not the worst case the harness's tie rule gives.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ardetect.evaluation.harness import Scores, query_rng

NAMES = ("class oracle", "class + size oracle")  # by_size False, True


class ClassOracle:
    """Scores each candidate by whether it holds an object of the query's base class.

    ``by_size``: by the visible area of its largest such object instead, and that object's
    box is the candidate's region (region level); else image level (no box).
    """

    def __init__(self, objects: pd.DataFrame, by_size: bool = False, seed: int = 0, name: str | None = None):
        missing = {"image", "base_class", "box", "area"} - set(objects.columns)
        if missing:
            raise ValueError(f"class oracle: the objects table lacks the columns {sorted(missing)}")
        self.by_size = by_size
        self.region_level = by_size
        self.seed = seed
        self.name = name or NAMES[by_size]
        # image -> base class -> (largest visible area, its box); an object with no visible pixel is not seen
        self._largest: dict[str, dict[str, tuple[float, np.ndarray]]] = {}
        for image, cls, box, area in zip(objects["image"].astype(str), objects["base_class"].astype(str), objects["box"], objects["area"]):
            found = self._largest.setdefault(image, {})
            if area > 0 and (cls not in found or area > found[cls][0]):
                found[cls] = (float(area), np.asarray(box, dtype=np.float64))

    def covers(self, images) -> list[str]:
        """The images of ``images`` the objects table does not list."""
        return sorted({str(i) for i in images if str(i) not in self._largest})

    def score(self, query: pd.Series, candidates: list[str]) -> Scores:
        cls = str(query["base_class"])
        absent = self.covers(candidates)
        if absent:
            raise ValueError(f"{self.name}: the objects table lists no object of candidate image {absent[0]!r} "
                             f"(query {query['tuple_id']}); {len(absent)} such candidates")
        tie = query_rng(self.seed, query["tuple_id"]).random(len(candidates)) * 0.5  # below any difference of a whole pixel
        held: list[tuple[float, np.ndarray] | None] = [self._largest[str(c)].get(cls) for c in candidates]
        if not self.by_size:
            return Scores(np.array([1.0 if h is not None else 0.0 for h in held]) + tie)
        area = np.array([h[0] if h is not None else 0.0 for h in held])
        boxes = np.stack([h[1] if h is not None else np.zeros(4) for h in held])
        return Scores(area + tie, boxes)


def class_oracles(objects: pd.DataFrame, seed: int = 0, images=(), source: str = "the objects table") -> list[ClassOracle]:
    """The two ceilings: a perfect class detector, and one that also prefers the largest object of the class.

    ``images``: the candidates they will be asked about, checked now (each is a training image and
    holds its concept at least), so that an incomplete record stops the evaluation before any scoring."""
    oracles = [ClassOracle(objects, False, seed), ClassOracle(objects, True, seed)]
    absent = oracles[0].covers(images)
    if absent:
        raise ValueError(f"class oracles: {source} lists no object of {len(absent)} candidate image(s), e.g. {absent[0]!r}; "
                         "every training image holds its concept at least (the record is incomplete)")
    return oracles


def ceiling_sentence(summary: Mapping[str, Mapping[str, float]], method: str) -> str:
    """A line for the report: ``method``'s class R-precision and Recall@10 beside each oracle's
    (``summary``: method name -> {metric: value})."""
    parts = []
    for name in NAMES:
        if name in summary and "class_rprecision" in summary[name]:
            s = summary[name]
            parts.append(f"the {name} class R-precision {s['class_rprecision']:.3f}, Recall@10 {s['recall@10']:.3f}")
    if not parts or method not in summary:
        return ""
    m = summary[method]
    return (f"Ceilings of a score that reads classes only (test split): {'; '.join(parts)}; {method} "
            f"class R-precision {m.get('class_rprecision', float('nan')):.3f}, Recall@10 {m['recall@10']:.3f}.")
