import numpy as np
import pandas as pd
import pytest

from ardetect.evaluation.intervals import mean_interval, paired_difference
from ardetect.stages.evaluate import Bar, expected_chance, judge


def test_mean_interval_brackets_the_mean_and_narrows_with_more_queries():
    rng = np.random.default_rng(0)
    small = (rng.random(50) < 0.4).astype(float)
    big = (rng.random(2000) < 0.4).astype(float)
    a, b = mean_interval(small), mean_interval(big)
    assert a.low < a.value < a.high and b.low < b.value < b.high
    assert (b.high - b.low) < (a.high - a.low) / 3
    # the percentile interval of a proportion near the normal approximation's
    se = np.sqrt(0.4 * 0.6 / 2000)
    assert abs((b.high - b.low) - 2 * 1.96 * se) < 0.01
    assert mean_interval(small, seed=3) == mean_interval(small, seed=3)  # seeded


def test_constant_values_give_a_point_interval():
    assert mean_interval(np.ones(7)).fmt() == "1.000 [1.000, 1.000]"


def test_paired_difference_is_tighter_than_separate_intervals():
    rng = np.random.default_rng(1)
    hard = rng.random(300) < 0.5  # both methods fail the same hard queries
    a = (~hard | (rng.random(300) < 0.1)).astype(float)
    b = (~hard).astype(float)
    d = paired_difference(a, b)
    assert d.value == pytest.approx(a.mean() - b.mean())
    assert d.excludes_zero_above()
    sa, sb = mean_interval(a), mean_interval(b)
    assert sa.low < sb.high  # separately the intervals overlap
    assert paired_difference(a, b, scale=2.0).value == pytest.approx(a.mean() - 2 * b.mean())


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same queries"):
        paired_difference(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="finite"):
        mean_interval(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval(np.array([]))


def test_expected_chance():
    assert expected_chance(pd.Series([104, 5, 20]), 10).tolist() == [10 / 104, 1.0, 0.5]


def test_judge_absolute_and_paired_bars():
    n = 200
    a = pd.DataFrame({"recall@10": np.r_[np.ones(120), np.zeros(80)], "recall@5": np.r_[np.ones(101), np.zeros(99)]})
    b = pd.DataFrame({"recall@10": np.r_[np.ones(20), np.zeros(180)], "recall@5": np.r_[np.ones(100), np.zeros(100)]})
    bars = [
        Bar("abs", "a", "A", "recall@10", threshold=0.5),
        Bar("abs fails", "b", "A", "recall@10", threshold=0.7),
        Bar("rel", "c", "A", "recall@10", against="B", scale=1.5),
        Bar("tie", "d", "A", "recall@5", against="B"),  # one query ahead: the interval holds zero
        Bar("chance", "e", "B", "recall@10", against="expected chance", scale=1.8),
        Bar("chance fails", "f", "B", "recall@10", against="expected chance", scale=2.5),
    ]
    out = {r["bar"]: r for r in judge(bars, {"A": a, "B": b}, {"expected chance": np.full(n, 0.05)}, seed=0)}
    assert out["abs"]["met"] and not out["abs fails"]["met"]
    assert out["abs"]["estimate"]["value"] == pytest.approx(0.6)
    assert out["rel"]["met"] and out["rel"]["difference"]["value"] == pytest.approx(0.6 - 1.5 * 0.1)
    assert not out["tie"]["met"] and out["tie"]["difference"]["low"] <= 0 < out["tie"]["difference"]["high"]
    # against an analytic reference the bar is absolute: the point estimate (0.1 >= 1.8 x 0.05) decides,
    # although the interval of the difference holds zero; 0.1 < 2.5 x 0.05 fails
    assert out["chance"]["met"] and out["chance"]["difference"]["value"] == pytest.approx(0.1 - 0.09)
    assert out["chance"]["difference"]["low"] < 0 < out["chance"]["difference"]["high"]
    assert "interval above 0: no" in out["chance"]["rule"]
    assert not out["chance fails"]["met"] and out["chance fails"]["difference"]["value"] == pytest.approx(0.1 - 0.125)


def test_non_finite_values_are_named_by_what_they_are():
    with pytest.raises(ValueError, match="ARD/recall@5: per-query values must be finite"):
        mean_interval(np.array([1.0, np.nan]), name="ARD/recall@5")
    with pytest.raises(ValueError, match="ARD/recall@5 has 3 queries and ARD-/recall@5 has 4"):
        paired_difference(np.ones(3), np.ones(4), names=("ARD/recall@5", "ARD-/recall@5"))
