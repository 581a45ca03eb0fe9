"""One evaluation harness for every method, on the same tuples.

For each test tuple the method scores its own training image X and every negative
(the training images of all other concepts in its split). Region-level methods also
return a box per candidate; image-level methods return none and are ranked without
the IoU gate, with box accuracy reported as N/A (as the ARD paper's table 2 does).

A diagnostic beside the paper's metrics (ours), when the candidates' base classes are
given: class R-precision. With n the number of candidates of the query's base class
(its own training image included), it is the share of that class among the n best
scored candidates: 1 when a method ranks every image of the query's class first, about
n / (number of candidates) by chance. It tells apart a method that finds the class
but not the identity from one that finds neither.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torchvision.ops import box_iou
from tqdm import tqdm

from ardetect.evaluation.metrics import aggregate, query_metrics, rank_of_positive


@dataclass
class Scores:
    """A method's answer for one query over its candidates (the positive first)."""

    scores: np.ndarray  # [C]
    boxes: np.ndarray | None = None  # [C, 4] pixel xyxy in each candidate's own image, or None (image-level)


class Method(Protocol):
    name: str
    region_level: bool

    def score(self, query: pd.Series, candidates: list[str]) -> Scores:
        """Score ``candidates`` (image paths relative to the data root, the positive first) for ``query``."""
        ...


@dataclass
class Evaluation:
    method: str
    region_level: bool
    per_query: pd.DataFrame
    summary: dict[str, float]
    by_medium: pd.DataFrame
    by_class: pd.DataFrame
    retrievals: dict[str, list[tuple[str, float, list[float] | None]]] = field(default_factory=dict)


@dataclass
class Recording:
    """A harness method that keeps every ``Scores`` it returns, with its candidates, by tuple id."""

    method: Method
    seen: dict = field(default_factory=dict)
    candidates: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def region_level(self) -> bool:
        return self.method.region_level

    def score(self, query: pd.Series, candidates: list[str]) -> Scores:
        out = self.method.score(query, candidates)
        tid = str(query["tuple_id"])
        self.seen[tid], self.candidates[tid] = out, list(candidates)
        return out

    def frame(self) -> pd.DataFrame:
        """One row per (query, candidate): tuple_id, rank in the candidate list, candidate, score, box."""
        rows = []
        for tid, out in self.seen.items():
            boxes = out.boxes if out.boxes is not None else np.full((len(out.scores), 4), np.nan)
            for i, (cand, s, b) in enumerate(zip(self.candidates[tid], out.scores, boxes)):
                rows.append({"tuple_id": tid, "position": i, "candidate": cand, "score": float(s),
                             "x0": float(b[0]), "y0": float(b[1]), "x1": float(b[2]), "y1": float(b[3])})
        return pd.DataFrame(rows, columns=["tuple_id", "position", "candidate", "score", "x0", "y0", "x1", "y1"])


@dataclass
class Replay:
    """A method that answers with scores recorded earlier (``Recording.frame``), after checking that the
    query's candidates are the ones recorded, in the same order."""

    name: str
    frame: pd.DataFrame
    region_level: bool = True

    def __post_init__(self):
        self._by = {str(t): g.sort_values("position") for t, g in self.frame.groupby("tuple_id", sort=False)}

    def _recorded(self, tid: str, candidates: list[str]) -> bool:
        return tid in self._by and list(self._by[tid]["candidate"].astype(str)) == [str(c) for c in candidates]

    def covers(self, candidates: Mapping[str, list[str]]) -> bool:
        """Whether every query in ``candidates`` (tuple id -> its candidates, as ``candidates_of`` gives) was recorded with them."""
        return all(self._recorded(str(t), c) for t, c in candidates.items())

    def score(self, query: pd.Series, candidates: list[str]) -> Scores:
        tid = str(query["tuple_id"])
        if tid not in self._by:
            raise KeyError(f"{self.name}: no recorded scores for tuple {tid}")
        if not self._recorded(tid, candidates):
            raise ValueError(f"{self.name}: the recorded candidates of tuple {tid} are not the ones asked for")
        g = self._by[tid]
        boxes = g[["x0", "y0", "x1", "y1"]].to_numpy(dtype=np.float64) if self.region_level else None
        return Scores(g["score"].to_numpy(dtype=np.float64), boxes)


def candidates_of(tuples: pd.DataFrame, negatives: pd.DataFrame) -> dict[str, list[str]]:
    """tuple_id -> [its training image, then its negatives in a stable order]."""
    negs = negatives.astype({"tuple_id": str, "neg_image": str}).sort_values(["tuple_id", "neg_image"])
    grouped = negs.groupby("tuple_id")["neg_image"].apply(list).to_dict()
    return {t: [x, *grouped.get(t, [])] for t, x in zip(tuples["tuple_id"], tuples["train_image"])}


def evaluate_method(
    method: Method, tuples: pd.DataFrame, negatives: pd.DataFrame, iou_threshold: float = 0.5,
    keep_retrievals: Iterable[str] = (), progress: bool = True, class_of: Mapping[str, str] | None = None,
) -> Evaluation:
    """Score every query's candidates with ``method``; ``class_of`` (candidate image -> base
    class) adds the class R-precision diagnostic (module docstring)."""
    if len(tuples) == 0:
        raise ValueError(f"{method.name}: no queries to evaluate (the tuples table is empty)")
    cands = candidates_of(tuples, negatives)
    lone = [t for t, c in cands.items() if len(c) < 2]
    if lone:
        raise ValueError(f"{method.name}: {len(lone)} queries have no negatives to rank against (first: tuple_id "
                         f"{lone[0]!r}); every query needs its training image and at least one negative")
    keep = set(keep_retrievals)
    rows, retrievals = [], {}
    for _, q in tqdm(tuples.iterrows(), total=len(tuples), desc=f"evaluate {method.name}", disable=not progress):
        c = cands[q["tuple_id"]]
        out = method.score(q, c)
        if len(out.scores) != len(c):
            raise ValueError(f"{method.name}: {len(out.scores)} scores for {len(c)} candidates of {q['tuple_id']}")
        rank = rank_of_positive(float(out.scores[0]), out.scores[1:])
        iou = None
        if method.region_level:
            if out.boxes is None:
                raise ValueError(f"{method.name} is region-level but returned no boxes for {q['tuple_id']}")
            pred = torch.as_tensor(np.asarray(out.boxes[0], dtype=np.float32))[None]
            gt = torch.as_tensor(np.asarray(q["train_box"], dtype=np.float32))[None]
            iou = float(box_iou(pred, gt)[0, 0])
        m = query_metrics(rank, iou, iou_threshold)
        if class_of is not None:
            m["class_rprecision"] = class_rprecision(out.scores, [class_of[x] for x in c], q["base_class"])
        rows.append({"tuple_id": q["tuple_id"], "medium": q["medium"], "base_class": q["base_class"], "score": float(out.scores[0]), **m})
        if q["tuple_id"] in keep:
            order = display_order(out.scores)
            retrievals[q["tuple_id"]] = [
                (c[i], float(out.scores[i]), None if out.boxes is None else [float(v) for v in out.boxes[i]]) for i in order[:10]
            ]
    per_query = pd.DataFrame(rows)
    metric_cols = [col for col in per_query.columns if col.startswith(("recall@", "inverse_rank@", "class_rprecision")) or col == "box_correct"]

    def breakdown(key: str) -> pd.DataFrame:
        g = per_query.groupby(key)[metric_cols].mean()
        g["queries"] = per_query.groupby(key).size()
        return g

    return Evaluation(
        method.name, method.region_level, per_query, aggregate(per_query), breakdown("medium"), breakdown("base_class"), retrievals
    )


def display_order(scores: np.ndarray) -> np.ndarray:
    """Candidates best first as the ranks count them: the positive (index 0) after the candidates tied with it, and
    NaN scores first but for the positive's, last."""
    s = np.asarray(scores, dtype=float)
    key = np.where(np.isnan(s), -np.inf, -s)  # a NaN negative before every score...
    if np.isnan(s[0]):
        key[0] = np.inf  # ...a NaN positive after every one
    return np.lexsort((np.arange(s.size) == 0, key))


def class_rprecision(scores: np.ndarray, classes: list[str], query_class: str) -> float:
    """Share of ``query_class`` among the n best scores, n = how many candidates have that class.

    Candidates tied at the cut are counted in proportion (the expected share under a random
    order of the ties), so the value never depends on the candidates' order. A NaN score
    counts against the query (ranked first if its candidate is of another class, last if not).
    """
    same = np.asarray([c == query_class for c in classes])
    n = int(same.sum())
    if n == 0:
        raise ValueError(f"no candidate has the query's base class {query_class!r}")
    s = np.asarray(scores, dtype=float)
    s = np.where(np.isnan(s), np.where(same, -np.inf, np.inf), s)  # NaN against the query (docstring)
    cut = np.sort(s)[::-1][n - 1]
    above, tied = s > cut, s == cut
    take = n - int(above.sum())  # how many of the tied candidates make the top n
    return float((same[above].sum() + take * same[tied].mean()) / n)


def query_rng(seed: int, tuple_id) -> np.random.Generator:
    """A random generator of its own for each (seed, query): the same numbers whatever order the queries come in."""
    return np.random.default_rng([seed, int.from_bytes(str(tuple_id).encode()[-8:], "little")])


class ChanceMethod:
    """Uniformly random scores (seeded): the floor every method must beat. Image-level."""

    region_level = False

    def __init__(self, seed: int = 0):
        self.name = "chance"
        self.seed = seed

    def score(self, query: pd.Series, candidates: list[str]) -> Scores:
        return Scores(query_rng(self.seed, query["tuple_id"]).random(len(candidates)))


def results_table(
    evaluations: list[Evaluation],
    keys: tuple[str, ...] = ("box_accuracy", "inverse_rank@5", "inverse_rank@10", "recall@1", "recall@5", "recall@10", "class_rprecision"),
) -> str:
    """A markdown table, one row per method; image-level methods show box accuracy as N/A,
    and a metric an evaluation lacks (class R-precision without classes) shows as N/A too."""
    head = "| method | " + " | ".join(keys) + " | queries |"
    rows = [head, "|" + "---|" * (len(keys) + 2)]
    for ev in evaluations:
        cells = []
        for k in keys:
            v = ev.summary.get(k, float("nan"))
            cells.append("N/A" if (k == "box_accuracy" and not ev.region_level) or k not in ev.summary else f"{v:.4f}")
        rows.append(f"| {ev.method} | " + " | ".join(cells) + f" | {int(ev.summary['queries'])} |")
    return "\n".join(rows)
