"""Fitting stays off the test split: scrambling every test image changes no chosen checkpoint,
no trained weight and no fitted identity weight or pooling grid."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ardetect.evaluation.ard import ARDMethod
from ardetect.stages.evaluate import fit_weights
from ardetect.train.phases import load_model, run_phase1, run_phase2

from tiny_world import fast_config

pytestmark = pytest.mark.slow


def negatives_of(tuples: pd.DataFrame) -> pd.DataFrame:
    """Each tuple's negatives: the training image of every other concept of its split."""
    rows = []
    for split, part in tuples.groupby("split"):
        pool = part.drop_duplicates("concept_id")[["concept_id", "train_image"]]
        for _, t in part.iterrows():
            rows += [{"tuple_id": t["tuple_id"], "neg_image": x} for c, x in zip(pool["concept_id"], pool["train_image"]) if c != t["concept_id"]]
    return pd.DataFrame(rows)


def poison(tuples: pd.DataFrame, root, dest):
    """A copy of the data root whose test-split images (queries and training images) are noise."""
    shutil.copytree(root, dest)
    test = tuples[tuples["split"] == "test"]
    rng = np.random.default_rng(7)
    for rel in sorted(set(test["query_image"]) | set(test["train_image"])):
        with Image.open(dest / rel) as im:
            w, h = im.size
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(dest / rel)
    return dest


def pipeline_fits(cfg, tuples, root, out):
    """What the pipeline chooses from a data root: each phase's best epoch and weights, and the identity fit."""
    _, r1 = run_phase1(cfg, tuples, root, out / "p1")
    _, r2 = run_phase2(cfg, out / "p1" / "best.pt", tuples, root, out / "p2")
    ard, ard_minus = load_model(out / "p2" / "best.pt"), load_model(out / "p1" / "best.pt")
    fitted, _ = fit_weights(cfg, {"ARD": ard, "ARD-": ard_minus}, 64, True, tuples, negatives_of(tuples), root,
                            keep=None)  # no scores kept: each fit scores its queries itself
    return r1, r2, fitted


def test_scrambled_test_images_change_nothing_that_is_fitted(tiny_world, tmp_path):
    tuples, root = tiny_world
    cfg = fast_config(
        train_phase1={"epochs": 2, "max_steps_per_epoch": 3, "validation": {"queries": 4, "negatives": 3}},
        train_phase2={"epochs": 2, "max_steps_per_epoch": 2, "validation": {"queries": 4, "negatives": 3}},
        evaluate={"identity_weights": [0, 1, 5], "identity_grids": [1, 2], "fit_queries": None},
    )
    bad_root = poison(tuples, root, tmp_path / "poisoned")
    clean = pipeline_fits(cfg, tuples, root, tmp_path / "clean")
    dirty = pipeline_fits(cfg, tuples, bad_root, tmp_path / "dirty")
    # the poison is real: a test query scores differently on the scrambled images
    model = load_model(tmp_path / "clean" / "p1" / "best.pt")
    q = tuples[tuples["split"] == "test"].iloc[0]
    cands = [q["train_image"], *negatives_of(tuples).query("tuple_id == @q.tuple_id")["neg_image"]]
    a = ARDMethod(model, root, 64).score(q, cands).scores
    b = ARDMethod(model, bad_root, 64).score(q, cands).scores
    assert not np.allclose(a, b)
    for phase in (0, 1):
        assert clean[phase].best_epoch == dirty[phase].best_epoch
        assert [h.get("val_select") for h in clean[phase].history] == [h.get("val_select") for h in dirty[phase].history]
    for phase in ("p1", "p2"):
        wa = torch.load(tmp_path / "clean" / phase / "best.pt", weights_only=False)["model"]
        wb = torch.load(tmp_path / "dirty" / phase / "best.pt", weights_only=False)["model"]
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (phase, k)
    assert clean[2] == dirty[2]  # identity weight, pooling grid and every val recall
    assert {n: (f["weight"], f["grid"]) for n, f in clean[2].items()}.keys() == {"ARD", "ARD-"}
