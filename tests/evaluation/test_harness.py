import numpy as np
import pandas as pd
import pytest

from ardetect.evaluation.harness import ChanceMethod, Scores, candidates_of, evaluate_method, results_table


def data():
    t = pd.DataFrame(
        {
            "tuple_id": ["t1", "t2", "t3"],
            "train_image": ["x1.png", "x2.png", "x3.png"],
            "train_box": [[0, 0, 10, 10]] * 3,
            "medium": ["photo", "ink drawing", "photo"],
            "base_class": ["cat", "cat", "mug"],
        }
    )
    n = pd.DataFrame(
        {"tuple_id": ["t1", "t1", "t2", "t2", "t3", "t3"], "neg_image": ["x2.png", "x3.png", "x1.png", "x3.png", "x1.png", "x2.png"]}
    )
    return t, n


class Fixed:
    """Scores from a table; boxes: right box for t1/t3, a wrong one for t2."""

    name, region_level = "fixed", True

    def score(self, q, cands):
        s = {"t1": [0.9, 0.1, 0.2], "t2": [0.5, 0.5, 0.1], "t3": [0.2, 0.6, 0.1]}[q["tuple_id"]]
        good, bad = [0, 0, 10, 10], [20, 20, 30, 30]
        boxes = np.array([bad if q["tuple_id"] == "t2" else good] + [good] * (len(cands) - 1), float)
        return Scores(np.array(s), boxes)


def test_candidates_positive_first():
    t, n = data()
    c = candidates_of(t, n)
    assert c["t1"] == ["x1.png", "x2.png", "x3.png"] and c["t2"][0] == "x2.png"


def test_harness_hand_computed():
    t, n = data()
    ev = evaluate_method(Fixed(), t, n, keep_retrievals=["t1"], progress=False)
    pq = ev.per_query.set_index("tuple_id")
    assert pq.loc["t1", "rank"] == 1 and pq.loc["t1", "recall@1"] == 1
    assert pq.loc["t2", "rank"] == 2  # tie counts against the positive
    assert pq.loc["t2", "recall@5"] == 0  # IoU gate: wrong box
    assert pq.loc["t3", "rank"] == 2 and pq.loc["t3", "recall@5"] == 1
    assert ev.summary["box_accuracy"] == 2 / 3
    assert ev.summary["recall@5"] == 2 / 3
    assert ev.by_medium.loc["photo", "recall@1"] == 0.5
    assert [r[0] for r in ev.retrievals["t1"]] == ["x1.png", "x3.png", "x2.png"]
    table = results_table([ev, evaluate_method(ChanceMethod(), t, n, progress=False)])
    assert "| fixed | 0.6667 |" in table and "| chance | N/A |" in table


def test_chance_is_seeded_and_image_level():
    t, n = data()
    a = evaluate_method(ChanceMethod(1), t, n, progress=False).per_query
    b = evaluate_method(ChanceMethod(1), t, n, progress=False).per_query
    assert a["rank"].tolist() == b["rank"].tolist()
    assert a["box_correct"].isna().all()
    # and the seed is what draws them: other seeds rank otherwise
    ranks = {tuple(evaluate_method(ChanceMethod(s), t, n, progress=False).per_query["rank"]) for s in range(12)}
    assert len(ranks) > 1


def test_class_rprecision_hand_computed():
    from ardetect.evaluation.harness import class_rprecision

    classes = ["cat", "cat", "mug", "dog", "cat"]  # 3 cats: the top 3 are scored
    assert class_rprecision(np.array([0.9, 0.8, 0.1, 0.2, 0.7]), classes, "cat") == 1.0
    assert class_rprecision(np.array([0.9, 0.1, 0.8, 0.7, 0.2]), classes, "cat") == 1 / 3
    # a tie across the cut: 0.5 (cat) and 0.5 (mug) compete for one place -> half a cat
    assert class_rprecision(np.array([0.9, 0.5, 0.5, 0.1, 0.95]), classes, "cat") == (2 + 0.5) / 3
    # every score tied: the class's share of the candidates (what chance gives on average)
    assert class_rprecision(np.zeros(5), classes, "cat") == 3 / 5
    with pytest.raises(ValueError, match="'cow'"):
        class_rprecision(np.zeros(5), classes, "cow")


def test_harness_reports_class_rprecision_when_classes_given():
    t, n = data()
    classes = {"x1.png": "cat", "x2.png": "cat", "x3.png": "mug"}
    ev = evaluate_method(Fixed(), t, n, progress=False, class_of=classes)
    pq = ev.per_query.set_index("tuple_id")
    # t1 (cat): cats x1, x2 -> top 2 of [0.9, 0.1, 0.2] = x1, x3 -> 1/2; t2 (cat): [x2 .5, x1 .5, x3 .1] -> 1
    # t3 (mug): only x3 -> top 1 of [x3 .2, x1 .6, x2 .1] is x1 -> 0
    assert pq["class_rprecision"].tolist() == [0.5, 1.0, 0.0]
    assert ev.summary["class_rprecision"] == 0.5
    assert "class_rprecision" not in evaluate_method(Fixed(), t, n, progress=False).summary
    assert "| N/A |" in results_table([evaluate_method(Fixed(), t, n, progress=False)])


def test_class_rprecision_counts_a_nan_score_against_the_query():
    from ardetect.evaluation.harness import class_rprecision

    # 2 cats of 4: a NaN mug ranks above every score, a NaN cat below every score, whatever the order
    assert class_rprecision(np.array([0.2, np.nan, 0.9, 0.1]), ["cat", "mug", "cat", "mug"], "cat") == 0.5
    assert class_rprecision(np.array([0.2, np.nan, 0.9, 0.1]), ["mug", "cat", "cat", "mug"], "cat") == 0.5
    assert class_rprecision(np.array([1.0, np.nan, np.nan]), ["cat", "mug", "cat"], "cat") == 0.5  # mug, then the 1.0 cat
    assert class_rprecision(np.array([np.nan, 0.3, 0.1]), ["cat", "mug", "mug"], "cat") == 0.0


def test_retrievals_list_the_positive_after_the_candidates_tied_with_it():
    from ardetect.evaluation.harness import display_order

    t, n = data()
    ev = evaluate_method(Fixed(), t, n, keep_retrievals=["t2"], progress=False)
    # t2's positive x2 ties with x1 at 0.5: its rank is 2, and the list shows x1 first
    assert ev.per_query.set_index("tuple_id").loc["t2", "rank"] == 2
    assert [r[0] for r in ev.retrievals["t2"]] == ["x1.png", "x2.png", "x3.png"]
    # NaN negatives first (they count against the positive), a NaN positive last
    assert display_order(np.array([0.5, np.nan, 0.9, 0.5])).tolist() == [1, 2, 3, 0]
    assert display_order(np.array([np.nan, 0.1, np.nan])).tolist() == [2, 1, 0]


def test_evaluation_refuses_a_query_without_negatives_and_an_empty_split():
    t, n = data()
    with pytest.raises(ValueError, match=r"2 queries have no negatives.*'t2'"):
        evaluate_method(ChanceMethod(), t, n[n["tuple_id"] == "t1"], progress=False)
    with pytest.raises(ValueError, match="no queries to evaluate"):
        evaluate_method(ChanceMethod(), t.iloc[:0], n, progress=False)
