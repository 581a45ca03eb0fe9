import numpy as np
import pandas as pd
import pytest

from ardetect.evaluation.harness import evaluate_method
from ardetect.evaluation.oracle import ClassOracle, ceiling_sentence, class_oracles


def objects():
    """x1: its cat concept and a small mug; x2: a mug concept and a cat distractor; x3: a mug concept alone;
    x4: a cat concept smaller than x2's distractor."""
    rows = [
        ("x1.png", "cat", [0, 0, 40, 40], 1200), ("x1.png", "mug", [50, 50, 60, 60], 90),
        ("x2.png", "mug", [0, 0, 50, 50], 2000), ("x2.png", "cat", [60, 60, 100, 100], 1500),
        ("x3.png", "mug", [10, 10, 70, 70], 3000),
        ("x4.png", "cat", [5, 5, 25, 25], 300),
    ]
    return pd.DataFrame(rows, columns=["image", "base_class", "box", "area"])


def tuples():
    t = pd.DataFrame({
        "tuple_id": ["t1", "t3", "t4"], "train_image": ["x1.png", "x3.png", "x4.png"],
        "train_box": [[0, 0, 40, 40], [10, 10, 70, 70], [5, 5, 25, 25]], "medium": ["photo"] * 3, "base_class": ["cat", "mug", "cat"],
    })
    images = ["x1.png", "x2.png", "x3.png", "x4.png"]
    n = pd.DataFrame([(tid, x) for tid, own in zip(t["tuple_id"], t["train_image"]) for x in images if x != own], columns=["tuple_id", "neg_image"])
    return t, n


CLASS_OF = {"x1.png": "cat", "x2.png": "mug", "x3.png": "mug", "x4.png": "cat"}


def test_class_oracle_ranks_every_holder_of_the_class_first():
    oracle = ClassOracle(objects())
    q = pd.Series({"tuple_id": "t1", "base_class": "cat"})
    s = oracle.score(q, ["x1.png", "x2.png", "x3.png", "x4.png"])
    assert s.boxes is None and not oracle.region_level
    assert min(s.scores[[0, 1, 3]]) > s.scores[2]  # x2 holds a cat (a distractor): a class detector cannot tell it from a concept
    mug = oracle.score(pd.Series({"tuple_id": "t3", "base_class": "mug"}), ["x3.png", "x1.png", "x2.png", "x4.png"]).scores
    assert min(mug[:3]) > mug[3]  # x1's small mug counts as much as a mug concept


def test_class_and_size_oracle_prefers_the_largest_object_and_answers_with_its_box():
    oracle = ClassOracle(objects(), by_size=True)
    s = oracle.score(pd.Series({"tuple_id": "t4", "base_class": "cat"}), ["x4.png", "x1.png", "x2.png", "x3.png"])
    assert oracle.region_level and oracle.name == "class + size oracle"
    assert list(np.argsort(-s.scores)) == [2, 1, 0, 3]  # x2's distractor (1500 px) > x1 (1200) > x4 (300) > no cat
    np.testing.assert_array_equal(s.boxes[2], [60, 60, 100, 100])
    np.testing.assert_array_equal(s.boxes[0], [5, 5, 25, 25])


def test_oracle_metrics_through_the_harness():
    t, n = tuples()
    by_name = {o.name: evaluate_method(o, t, n, class_of=CLASS_OF, progress=False) for o in class_oracles(objects())}
    size = by_name["class + size oracle"].per_query.set_index("tuple_id")
    # t4 (cat, 300 px): x2 and x1 hold larger cats, so it ranks third; its box is right (its own cat)
    assert size.loc["t4", "rank"] == 3 and size.loc["t4", "box_correct"] == 1
    # t1 (cat, 1200 px) ranks second behind x2's distractor; class R-precision: of the 2 best, x2 is a mug image
    assert size.loc["t1", "rank"] == 2 and size.loc["t1", "class_rprecision"] == 0.5
    # t3 (mug): x3's 3000 px first, then x2's mug concept: both mug images
    assert size.loc["t3", "rank"] == 1 and size.loc["t3", "class_rprecision"] == 1.0
    plain = by_name["class oracle"].per_query.set_index("tuple_id")
    assert np.isnan(by_name["class oracle"].summary["box_accuracy"])
    # cat queries: 3 holders (x1, x2, x4) in random order, the 2 cat images among them: R-precision 1/2 or 1
    assert set(plain.loc[["t1", "t4"], "class_rprecision"]) <= {0.5, 1.0}
    assert (plain["rank"] <= 3).all()  # the positive always holds its class: never below the holders


def test_an_object_without_visible_pixels_is_not_seen():
    hidden = pd.concat([objects(), pd.DataFrame([("x3.png", "cat", [0, 0, 5, 5], 0)], columns=["image", "base_class", "box", "area"])])
    for by_size in (False, True):
        s = ClassOracle(hidden, by_size=by_size).score(pd.Series({"tuple_id": "t1", "base_class": "cat"}), ["x1.png", "x3.png", "x4.png"]).scores
        assert s[1] < min(s[0], s[2])  # x3's fully hidden cat does not count


def test_oracle_ties_are_seeded_per_query():
    t, n = tuples()
    a = evaluate_method(ClassOracle(objects(), seed=3), t, n, progress=False).per_query
    b = evaluate_method(ClassOracle(objects(), seed=3), t.iloc[::-1].reset_index(drop=True), n, progress=False).per_query
    pd.testing.assert_series_equal(a.set_index("tuple_id")["rank"], b.set_index("tuple_id")["rank"].loc[a["tuple_id"]])
    ranks = {tuple(evaluate_method(ClassOracle(objects(), seed=s), t, n, progress=False).per_query["rank"]) for s in range(12)}
    assert len(ranks) > 1  # the seed decides the order among the holders of the class


def test_oracle_refuses_a_candidate_the_objects_table_lacks():
    oracle = ClassOracle(objects())
    with pytest.raises(ValueError, match=r"no object of candidate image 'x9.png' \(query t1\)"):
        oracle.score(pd.Series({"tuple_id": "t1", "base_class": "cat"}), ["x1.png", "x9.png"])
    with pytest.raises(ValueError, match=r"lacks the columns \['area'\]"):
        ClassOracle(objects().drop(columns="area"))
    # checked up front, before any scoring, for every candidate the evaluation will ask about
    with pytest.raises(ValueError, match=r"objects.parquet lists no object of 2 candidate image\(s\), e.g. 'x8.png'"):
        class_oracles(objects(), images={"x1.png", "x8.png", "x9.png"}, source="world2/objects.parquet")
    assert [o.name for o in class_oracles(objects(), images={"x1.png", "x4.png"})] == ["class oracle", "class + size oracle"]


def test_ceiling_sentence_reads_the_summaries():
    summary = {
        "class oracle": {"class_rprecision": 0.591, "recall@10": 0.981},
        "class + size oracle": {"class_rprecision": 0.846, "recall@10": 0.894},
        "ARD paper score": {"class_rprecision": 0.387, "recall@10": 0.58},
    }
    line = ceiling_sentence(summary, "ARD paper score")
    assert "class oracle class R-precision 0.591, Recall@10 0.981" in line
    assert "class + size oracle class R-precision 0.846" in line and "ARD paper score class R-precision 0.387" in line
    assert ceiling_sentence({"ARD paper score": summary["ARD paper score"]}, "ARD paper score") == ""
