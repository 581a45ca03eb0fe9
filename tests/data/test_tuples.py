import pandas as pd
import pytest

from ardetect.config import SplitConfig
from ardetect.data.schema import NEGATIVE_COLUMNS, TUPLE_COLUMNS
from ardetect.data.tuples import assign_splits, build_negatives, build_tuples, statistics


def fake_exemplars(n: int, classes=("cat", "mug", "car", "hat")) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "concept_id": [f"c{i:05d}" for i in range(n)],
            "base_class": [classes[i % len(classes)] for i in range(n)],
            "group": "misc_objects",
            "image": [f"exemplars/images/c{i:05d}.png" for i in range(n)],
            "mask": [f"exemplars/masks/c{i:05d}.png" for i in range(n)],
            "width": 96,
            "height": 96,
            "box": [[10.0, 12.0, 50.0, 60.0]] * n,
            "identity": "{}",
            "source": "synthetic",
            "seed": list(range(n)),
        }
    )


def fake_generated(ex: pd.DataFrame, per: int) -> pd.DataFrame:
    rows = []
    for i, c in enumerate(ex["concept_id"]):
        for j in range(per):
            cls = ex["base_class"].iloc[i]
            rows.append(
                {
                    "query_id": f"q{i:05d}_{j:02d}",
                    "concept_id": c,
                    "prompt": f"A charcoal sketch of a V* {cls} sitting on a rock.",
                    "concept_phrase": f"V* {cls}",
                    "template": "A charcoal sketch of a {} sitting on a rock.",
                    "medium": "charcoal sketch",
                    "scene": "rock",
                    "image": f"generated/images/q{i:05d}_{j:02d}.png",
                    "width": 96,
                    "height": 96,
                    "box": [5.0, 5.0, 40.0, 44.0],
                    "backend": "synthetic",
                    "seed": i * 10 + j,
                }
            )
    return pd.DataFrame(rows)


def test_split_is_by_concept_exact_sizes_and_stratified():
    ex = fake_exemplars(200)
    s = assign_splits(ex, SplitConfig(), seed=42)
    assert set(s.index) == set(ex["concept_id"]) and s.index.is_unique
    counts = s.value_counts()
    assert (counts["train"], counts["val"], counts["test"]) == (160, 20, 20)
    cls = ex.set_index("concept_id").loc[s.index, "base_class"]
    per = pd.crosstab(s.to_numpy(), cls.to_numpy())
    assert per.loc["test"].min() >= 4 and per.loc["test"].max() <= 6  # 20 test concepts over 4 classes


def test_split_is_seeded():
    ex = fake_exemplars(60)
    a = assign_splits(ex, SplitConfig(), seed=1)
    b = assign_splits(ex, SplitConfig(), seed=1)
    c = assign_splits(ex, SplitConfig(), seed=2)
    pd.testing.assert_series_equal(a.sort_index(), b.sort_index())
    assert not a.sort_index().equals(c.sort_index())


def test_tiny_split_gives_every_split_two_concepts():
    s = assign_splits(fake_exemplars(6), SplitConfig(), seed=0)
    assert s.value_counts().to_dict() == {"train": 2, "val": 2, "test": 2}  # each query has a negative in its split


@pytest.mark.parametrize("n, fractions, want", [
    (10, (0.05, 0.05, 0.9), (2, 2, 6)), (100, (0.001, 0.5, 0.499), (2, 49, 49)), (6, (0.05, 0.05, 0.9), (2, 2, 2)),
    (30, (0.01, 0.1, 0.89), (2, 3, 25)), (40, (0.8, 0.1, 0.1), (32, 4, 4)), (12, (0.8, 0.1, 0.1), (8, 2, 2)),
    (1040, (0.8, 0.1, 0.1), (832, 104, 104)),
])
def test_a_lopsided_split_still_leaves_each_split_two_concepts(n, fractions, want):
    train, val, test = fractions
    counts = assign_splits(fake_exemplars(n), SplitConfig(train=train, val=val, test=test), seed=0).value_counts()
    # train's concepts are taken back from the larger of the other two
    assert (counts.get("train", 0), counts.get("val", 0), counts.get("test", 0)) == want


@pytest.mark.parametrize("n", [2, 5])
def test_fewer_concepts_than_two_a_split_refused_by_name(n):
    with pytest.raises(ValueError, match=rf"{n} concepts cannot fill the three splits of tuples\.split.*at least 6 concepts"):
        assign_splits(fake_exemplars(n), SplitConfig(), seed=0)


def test_world2_blocks_never_hold_a_lone_concept():
    from ardetect.data.tuples import concept_blocks

    ids = pd.Series([f"c{i}" for i in range(5)])
    sizes = sorted(len(b) for b in concept_blocks(ids, 2, seed=0))
    assert sizes == [2, 3]  # not 2, 2 and 1
    assert sorted(len(b) for b in concept_blocks(pd.Series([f"c{i}" for i in range(208)]), 104, seed=0)) == [104, 104]
    assert sorted(c for b in concept_blocks(ids, 2, seed=0) for c in b) == sorted(ids)
    with pytest.raises(ValueError, match="1 concepts"):
        concept_blocks(ids[:1], None, seed=0)


def test_duplicate_concepts_rejected():
    ex = pd.concat([fake_exemplars(4), fake_exemplars(1)], ignore_index=True)
    with pytest.raises(ValueError, match="concept_id 'c00000' appears twice"):
        assign_splits(ex, SplitConfig(), seed=0)


def test_tuples_and_negatives():
    ex = fake_exemplars(40)
    gen = fake_generated(ex, 2)
    s = assign_splits(ex, SplitConfig(), seed=42)
    t = build_tuples(ex, gen, s)
    assert list(t.columns) == list(TUPLE_COLUMNS)
    assert len(t) == 80 and t["tuple_id"].is_unique
    # every tuple points at its own concept's exemplar
    row = t.iloc[7]
    assert row["train_image"] == f"exemplars/images/{row['concept_id']}.png"
    assert (t.groupby("concept_id")["split"].nunique() == 1).all()
    neg = build_negatives(t, ex, s)
    assert list(neg.columns) == list(NEGATIVE_COLUMNS)
    n_split = s.value_counts()
    per = neg.groupby("tuple_id", observed=True).size()
    for _, tr in t.iterrows():  # all other concepts of the split, never its own
        assert per[tr["tuple_id"]] == n_split[tr["split"]] - 1
    merged = neg.merge(t[["tuple_id", "train_image", "split", "concept_id"]], on="tuple_id")
    assert (merged["neg_image"].astype(str) != merged["train_image"]).all()
    assert (merged["neg_concept_id"].astype(str) != merged["concept_id"]).all()
    neg_split = s.loc[merged["neg_concept_id"].astype(str)].to_numpy()
    assert (neg_split == merged["split"].to_numpy()).all()
    stats = statistics(t, neg)
    assert stats["tuples"] == 80 and stats["per_split"]["test"] == 2 * n_split["test"]
    assert stats["negatives"]["min_per_test_query"] == n_split["test"] - 1
    assert stats["negatives"]["min_per_tuple"] == n_split.min() - 1
    # a tuple without negatives (a split of one concept) counts as 0, not left out of the minimum
    lone = t["tuple_id"].iloc[0]
    assert statistics(t, neg[neg["tuple_id"].astype(str) != lone])["negatives"]["min_per_tuple"] == 0


def test_generated_without_exemplar_is_named():
    ex = fake_exemplars(6)
    gen = fake_generated(ex, 1)
    gen.loc[3, "concept_id"] = "c99999"
    with pytest.raises(ValueError, match="concept_id 'c99999' has no exemplar"):
        build_tuples(ex, gen, assign_splits(ex, SplitConfig(), seed=0))
