"""The ranking metrics of the ARD paper (section 5.1), as the paper defines them.

For each positive test tuple, the method scores its training image X and every
negative. R is the rank of S_X among all those scores, largest first, with ties
counted against the positive (R = 1 + number of negatives scoring >= S_X).
Recall@K = [R <= K]; InverseRank@K = 1/R if R <= K else 0; both are 0 when the
predicted region's IoU with R_X is below the threshold (region-level methods
only). Box accuracy is the share of positives whose predicted region has IoU >=
the threshold with R_X. Note: ARD's public code counts ties for the positive and
skips the IoU gate; this module follows the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

RECALL_KS: tuple[int, ...] = (1, 5, 10)
INVERSE_RANK_KS: tuple[int, ...] = (5, 10)


def rank_of_positive(positive: float, negatives: Sequence[float] | np.ndarray) -> int:
    """1-based rank of the positive's score; ties and NaN negatives count against it."""
    neg = np.asarray(negatives, dtype=float)
    if not np.isfinite(positive):
        return int(neg.size) + 1  # a non-finite positive score ranks last
    return 1 + int(np.sum(~(neg < positive)))  # neg >= positive, NaN included


def query_metrics(
    rank: int,
    iou: float | None,
    iou_threshold: float = 0.5,
    recall_ks: Sequence[int] = RECALL_KS,
    inverse_rank_ks: Sequence[int] = INVERSE_RANK_KS,
) -> dict[str, float]:
    """Metrics of one query. ``iou=None`` means an image-level method: no IoU gate."""
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    hit = iou is None or (iou >= iou_threshold)
    out: dict[str, float] = {}
    for k in recall_ks:
        out[f"recall@{k}"] = float(hit and rank <= k)
    for k in inverse_rank_ks:
        out[f"inverse_rank@{k}"] = (1.0 / rank) if (hit and rank <= k) else 0.0
    out["rank"] = float(rank)
    out["box_correct"] = float("nan") if iou is None else float(iou >= iou_threshold)
    out["iou"] = float("nan") if iou is None else float(iou)
    return out


def aggregate(per_query: pd.DataFrame) -> dict[str, float]:
    """Mean of every metric column over queries; box accuracy is NaN for image-level methods."""
    cols = [c for c in per_query.columns if c.startswith(("recall@", "inverse_rank@", "class_rprecision"))]
    out = {c: float(per_query[c].mean()) for c in cols}
    box = per_query["box_correct"]
    out["box_accuracy"] = float(box.mean()) if box.notna().any() else float("nan")
    out["mean_rank"] = float(per_query["rank"].mean())
    out["queries"] = float(len(per_query))
    return out
