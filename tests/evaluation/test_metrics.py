import math

import numpy as np
import pandas as pd
import pytest

from ardetect.evaluation.metrics import aggregate, query_metrics, rank_of_positive


def test_rank_counts_ties_against_the_positive():
    assert rank_of_positive(0.9, [0.1, 0.5]) == 1
    assert rank_of_positive(0.5, [0.1, 0.5, 0.7]) == 3  # one tie + one higher
    assert rank_of_positive(0.5, [0.5, 0.5]) == 3
    assert rank_of_positive(0.5, []) == 1
    assert rank_of_positive(0.5, [np.nan, 0.1]) == 2  # NaN negative counts against
    assert rank_of_positive(float("nan"), [0.1, 0.2]) == 3


def test_recall_and_inverse_rank_hand_computed():
    m = query_metrics(rank=3, iou=0.8)
    assert m["recall@1"] == 0 and m["recall@5"] == 1 and m["recall@10"] == 1
    assert m["inverse_rank@5"] == pytest.approx(1 / 3) and m["inverse_rank@10"] == pytest.approx(1 / 3)
    m = query_metrics(rank=7, iou=0.8)
    assert m["recall@5"] == 0 and m["recall@10"] == 1
    assert m["inverse_rank@5"] == 0 and m["inverse_rank@10"] == pytest.approx(1 / 7)


def test_iou_gate_zeroes_a_top_ranked_but_mislocalised_region():
    m = query_metrics(rank=1, iou=0.49)
    assert m["recall@1"] == 0 and m["inverse_rank@5"] == 0 and m["box_correct"] == 0
    m = query_metrics(rank=1, iou=0.5)
    assert m["recall@1"] == 1 and m["box_correct"] == 1


def test_image_level_methods_have_no_gate_and_no_box_accuracy():
    m = query_metrics(rank=2, iou=None)
    assert m["recall@5"] == 1 and math.isnan(m["box_correct"])
    agg = aggregate(pd.DataFrame([m, query_metrics(rank=20, iou=None)]))
    assert math.isnan(agg["box_accuracy"]) and agg["recall@5"] == 0.5


def test_k_beyond_the_list():
    # 3 candidates in all; K=10 exceeds the list, the positive is always within it
    r = rank_of_positive(0.1, [0.3, 0.2])
    assert r == 3
    m = query_metrics(rank=r, iou=0.9, recall_ks=(1, 5, 10))
    assert m["recall@10"] == 1 and m["recall@5"] == 1 and m["recall@1"] == 0


def test_aggregate_means():
    rows = [query_metrics(1, 0.9), query_metrics(4, 0.9), query_metrics(2, 0.1), query_metrics(12, 0.7)]
    agg = aggregate(pd.DataFrame(rows))
    assert agg["recall@1"] == 0.25 and agg["recall@5"] == 0.5 and agg["recall@10"] == 0.5
    assert agg["inverse_rank@5"] == pytest.approx((1 + 0.25) / 4)
    assert agg["box_accuracy"] == 0.75 and agg["queries"] == 4


def test_bad_rank_rejected():
    with pytest.raises(ValueError, match="rank=0"):
        query_metrics(0, 0.5)
