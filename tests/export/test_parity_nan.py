"""The parity gate's differences: a NaN on one side is a difference no bound passes (pandas' max skipped it)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ardetect.export.parity import pair_diffs, summarise


def recording(scores, boxes):
    return SimpleNamespace(seen={"t1": SimpleNamespace(scores=np.array(scores), boxes=np.array(boxes))},
                           candidates={"t1": [f"x{i}" for i in range(len(scores))]})


def test_a_nan_on_one_side_fails_every_bound_and_on_both_sides_is_no_difference():
    box = [[0.0, 0.0, 10.0, 10.0]] * 3
    ref = recording([0.9, 0.5, 0.26], box)
    same = summarise(pair_diffs(ref, recording([0.9, 0.5, 0.26], box)))
    assert same == {"score_max_abs_diff": 0.0, "box_max_abs_diff_px": 0.0, "box_changed_share": 0.0}
    nan_box = [box[0], box[1], [np.nan] * 4]
    broken = pair_diffs(ref, recording([0.9, 0.5, np.nan], nan_box))
    assert broken["score_diff"].tolist()[:2] == [0.0, 0.0] and np.isinf(broken["score_diff"].iloc[2])
    got = summarise(broken)
    assert np.isinf(got["score_max_abs_diff"]) and np.isinf(got["box_max_abs_diff_px"]) and got["box_changed_share"] == 1 / 3
    both = pair_diffs(recording([0.9, 0.5, np.nan], nan_box), recording([0.9, 0.5, np.nan], nan_box))
    assert summarise(both)["score_max_abs_diff"] == 0.0
