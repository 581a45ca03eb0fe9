"""Build the 5-tuple record: splits by concept, positives, negatives, statistics."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from ardetect.config import SplitConfig
from ardetect.data.schema import NEGATIVE_COLUMNS, SPLITS, TUPLE_COLUMNS


def assign_splits(exemplars: pd.DataFrame, split: SplitConfig, seed: int) -> pd.Series:
    """Split concepts (never tuples) into train/val/test, stratified by base class.

    Concepts are shuffled within each base class, the classes interleaved round-robin,
    and the interleaved order cut at the global split sizes (``SplitConfig.concept_counts``: each share
    rounded, at least 2 concepts a split), so every split holds a near-even mix of classes.
    Returns a Series concept_id -> split.
    """
    if exemplars["concept_id"].duplicated().any():
        dup = exemplars.loc[exemplars["concept_id"].duplicated(), "concept_id"].iloc[0]
        raise ValueError(f"exemplars: concept_id {dup!r} appears twice")
    rng = np.random.default_rng(seed)
    per_class: list[list[str]] = []
    for _, group in sorted(exemplars.groupby("base_class"), key=lambda kv: kv[0]):
        ids = group["concept_id"].tolist()
        per_class.append([ids[i] for i in rng.permutation(len(ids))])
    order: list[str] = []
    depth = max((len(ids) for ids in per_class), default=0)
    for i in range(depth):
        row = [ids[i] for ids in per_class if i < len(ids)]
        order.extend(row[j] for j in rng.permutation(len(row)))
    counts = split.concept_counts(len(order))
    labels = ["test"] * counts["test"] + ["val"] * counts["val"] + ["train"] * counts["train"]
    return pd.Series(labels, index=pd.Index(order, name="concept_id"), name="split")


def concept_blocks(concepts: pd.Series, block: int | None, seed: int) -> list[list[str]]:
    """Deal ``concepts`` into seeded blocks of near-equal size, at most ``block`` each (None = one block) and never
    fewer than 2.

    The blocks are the candidate sets of a world evaluated whole: a query ranks its own
    training image against the other concepts of its block.
    """
    ids = sorted(pd.unique(concepts.astype(str)))
    if block is not None and block < 2:
        raise ValueError(f"block={block}: a block needs at least 2 concepts (a positive and a negative)")
    if len(ids) < 2:
        raise ValueError(f"{len(ids)} concepts: a block needs at least 2 (a positive and a negative)")
    # never a block of one concept, whose query would rank its own image alone: 5 concepts in blocks of at most 2
    # make blocks of 3 and 2, not 2, 2 and 1
    n_blocks = 1 if block is None else min(-(-len(ids) // block), len(ids) // 2)
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    return [sorted(part.tolist()) for part in np.array_split(np.asarray(order, dtype=object), n_blocks)]


def build_tuples(exemplars: pd.DataFrame, generated: pd.DataFrame, splits: pd.Series) -> pd.DataFrame:
    """One positive tuple per generated image: (Q, R_Q, p) joined to its exemplar (X, R_X)."""
    ex = exemplars.set_index("concept_id")
    unknown = sorted(set(generated["concept_id"]) - set(ex.index))
    if unknown:
        raise ValueError(f"generated: concept_id {unknown[0]!r} has no exemplar ({len(unknown)} such)")
    g = generated.sort_values("query_id").reset_index(drop=True)
    e = ex.loc[g["concept_id"]].reset_index()
    out = pd.DataFrame(
        {
            "tuple_id": "t" + g["query_id"].str.lstrip("q"),
            "split": splits.loc[g["concept_id"]].to_numpy(),
            "concept_id": g["concept_id"],
            "base_class": e["base_class"],
            "group": e["group"],
            "prompt": g["prompt"],
            "concept_phrase": g["concept_phrase"],
            "template": g["template"],
            "medium": g["medium"],
            "query_image": g["image"],
            "query_box": g["box"],
            "query_width": g["width"].astype("int64"),
            "query_height": g["height"].astype("int64"),
            "train_image": e["image"],
            "train_box": e["box"],
            "train_width": e["width"].astype("int64"),
            "train_height": e["height"].astype("int64"),
            "generator": g["backend"],
            "gen_seed": g["seed"].astype("int64"),
        }
    )
    return out[list(TUPLE_COLUMNS)]


def build_negatives(tuples: pd.DataFrame, exemplars: pd.DataFrame, splits: pd.Series) -> pd.DataFrame:
    """Negatives of a tuple: the training image of every other concept in its split (ARD supp. D)."""
    ex = exemplars.set_index("concept_id")
    frames = []
    for split in SPLITS:
        concepts = splits.index[splits.to_numpy() == split]
        if len(concepts) == 0:
            continue
        pool = pd.DataFrame({"neg_concept_id": concepts, "neg_image": ex.loc[concepts, "image"].to_numpy()})
        tps = tuples.loc[tuples["split"] == split, ["tuple_id", "concept_id"]]
        pairs = tps.merge(pool, how="cross")
        pairs = pairs[pairs["concept_id"] != pairs["neg_concept_id"]]
        frames.append(pairs[list(NEGATIVE_COLUMNS)])
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="str") for c in NEGATIVE_COLUMNS})
    out = pd.concat(frames, ignore_index=True)
    for col in NEGATIVE_COLUMNS:  # few distinct values, many rows
        out[col] = out[col].astype("category")
    return out


def statistics(tuples: pd.DataFrame, negatives: pd.DataFrame) -> dict:
    """Counts per split, class and medium; negatives per query; box-size summaries."""

    def sides(col: str) -> np.ndarray:
        b = np.asarray(tuples[col].tolist(), dtype=float).reshape(-1, 4)
        return np.sqrt(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None))

    # every tuple counts, one without negatives as 0
    neg_per = negatives.groupby("tuple_id", observed=True).size() if len(negatives) else pd.Series(dtype=int)
    neg_per = neg_per.reindex(tuples["tuple_id"].astype(str), fill_value=0) if len(tuples) else neg_per
    stats: dict = {
        "tuples": int(len(tuples)),
        "concepts": int(tuples["concept_id"].nunique()),
        "per_split": {s: int(n) for s, n in Counter(tuples["split"]).items()},
        "concepts_per_split": {s: int(n) for s, n in tuples.groupby("split")["concept_id"].nunique().items()},
        "per_class": {c: int(n) for c, n in sorted(Counter(tuples["base_class"]).items())},
        "per_medium": {m: int(n) for m, n in sorted(Counter(tuples["medium"]).items())},
        "negatives": {
            "rows": int(len(negatives)),
            "min_per_tuple": int(neg_per.min()) if len(neg_per) else 0,
            "max_per_tuple": int(neg_per.max()) if len(neg_per) else 0,
        },
    }
    test_ids = tuples.loc[tuples["split"] == "test", "tuple_id"]
    if len(test_ids) and len(negatives):
        stats["negatives"]["min_per_test_query"] = int(neg_per.reindex(test_ids.astype(str)).fillna(0).min())
    for col in ("query_box", "train_box"):
        s = sides(col)
        stats[f"{col}_side"] = {"mean": float(s.mean()), "min": float(s.min()), "max": float(s.max())} if len(s) else {}
    return stats
