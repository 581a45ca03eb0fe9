"""The pre-training's record: the per-epoch table for `dvc plots`, the dashboard's figures and the curves."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ardetect.stages.pretrain import write_record
from ardetect.train import record


def _history(epochs: int = 5, diagnosed=(2, 4, 5), drop_after: int = 4) -> list[dict]:
    rows = [{"classify_epoch": e, "classify_loss": 3.0 / e, "val_classify_accuracy": 0.2 * e} for e in (1, 2)]
    rows += [{"region_classify_epoch": e, "region_classify_loss": 2.0 / e, "region_val_classify_accuracy": 0.3 * e} for e in (1, 2, 3)]
    for e in range(1, epochs + 1):
        r = {"epoch": e, "lr": 1e-3 if e < drop_after else 1e-4, "train_loss": 8.0 / e, "train_loss_class": 0.5 / e,
             "train_loss_bbox": 0.2 / e, "train_loss_giou": 0.4 / e}
        if e in diagnosed:
            r.update(val_grounding=0.1 * e, val_concept_grounding=0.15 * e, val_class_rprecision=0.05 * e)
        rows.append(r)
    return rows


def test_the_table_holds_one_row_a_detection_epoch_with_the_diagnostics_where_they_ran():
    table = record.detection_epochs(list(reversed(_history())))  # in epoch order whatever the history's
    assert table["epoch"].tolist() == [1, 2, 3, 4, 5] and table.columns[0] == "epoch"
    assert not any(c.startswith(("classify", "region_")) for c in table.columns)  # the crop steps have their own x
    assert table["val_grounding"].isna().tolist() == [True, False, True, False, False]
    assert table.loc[table["epoch"] == 4, "val_class_rprecision"].item() == pytest.approx(0.2)
    losses, diagnostics = record.loss_table(_history()), record.diagnostics_table(_history())
    assert losses["epoch"].tolist() == [1, 2, 3, 4, 5] and not any(c.startswith("val_") for c in losses.columns)
    assert diagnostics.columns.tolist() == ["epoch", *record.DIAGNOSTICS] and diagnostics["epoch"].tolist() == [2, 4, 5]
    assert not diagnostics.isna().any().any()  # every cell filled: a plot reads no empty cell as a zero
    as_read_back = json.loads(json.dumps(_history(), sort_keys=True))  # history.json's key order, not the run's
    assert losses.equals(record.loss_table(as_read_back)) and diagnostics.equals(record.diagnostics_table(as_read_back))
    assert losses.columns.tolist() == ["epoch", "lr", "train_loss", "train_loss_bbox", "train_loss_class", "train_loss_giou"]
    assert record.lr_drops(table, start_lr=1e-3) == [4]  # a record's lr is the next epoch's: epoch 5 trains at lr / 10
    assert record.lr_drops(table, start_lr=1e-2) == [1, 4]  # the first record below the start: a fall after epoch 1


def test_the_dashboard_reads_each_steps_last_figures():
    got = record.headline(_history(diagnosed=(2, 4)))
    assert got == {"epochs": 5, "train_loss": 1.6, "diagnostics_epoch": 4, "val_grounding": 0.4, "val_concept_grounding": 0.6,
                   "val_class_rprecision": 0.2, "classify_val_accuracy": 0.4, "region_classifier_val_accuracy": 0.9}
    bare = [r for r in _history() if "epoch" in r]  # no crop classification (one base class, or classify_epochs: 0)
    assert "classify_val_accuracy" not in record.headline(bare) and record.headline(bare)["diagnostics_epoch"] == 5
    broken = [{**r, "train_loss": math.nan} if r.get("epoch") == 5 else r for r in _history()]
    assert record.headline(broken)["train_loss"] == 2.0  # a non-finite value is no figure: the last finite one
    assert record.headline([]) == {"epochs": 0}


def test_write_record_writes_the_five_files_and_the_curves_show_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("ARD_TRACKING", "off")
    history = _history()
    write_record(history, tmp_path, start_lr=1e-3)
    assert json.loads((tmp_path / "history.json").read_text())["history"] == history
    table = pd.read_csv(tmp_path / "history.csv")
    assert table["epoch"].tolist() == [1, 2, 3, 4, 5] and table["train_loss_class"].notna().all() and "val_grounding" not in table
    diagnosed = pd.read_csv(tmp_path / "diagnostics.csv")
    assert diagnosed["epoch"].tolist() == [2, 4, 5] and diagnosed["val_class_rprecision"].tolist() == pytest.approx([0.1, 0.2, 0.25])
    assert json.loads((tmp_path / "metrics.json").read_text()) == record.headline(history)
    with Image.open(tmp_path / "curves.png") as im:
        three = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert (pixels != 255).any(axis=2).mean() > 0.02  # something is drawn
    write_record([r for r in history if "epoch" in r], tmp_path / "bare", start_lr=1e-3)
    with Image.open(tmp_path / "bare" / "curves.png") as im:
        assert im.size[0] < 0.8 * three[0]  # no crop classification: its panel is left out
    write_record([], tmp_path / "none", start_lr=1e-3)  # pretrain.epochs: 0 still gives every file DVC expects
    assert json.loads((tmp_path / "none" / "metrics.json").read_text()) == {"epochs": 0}
    assert pd.read_csv(tmp_path / "none" / "history.csv").columns.tolist() == ["epoch"]
    none = pd.read_csv(tmp_path / "none" / "diagnostics.csv")
    assert none.empty and none.columns.tolist() == ["epoch", *record.DIAGNOSTICS]
    assert (tmp_path / "none" / "curves.png").stat().st_size > 0


def test_a_figure_that_fails_leaves_the_record_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setenv("ARD_TRACKING", "off")
    write_record(_history(), tmp_path, start_lr=1e-3)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("no figure")

    monkeypatch.setattr(record, "_draw_curves", broken)
    with pytest.raises(RuntimeError, match="no figure"):
        write_record(_history(epochs=7), tmp_path, start_lr=1e-3)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no file replaced, no temp file left


def test_the_committed_record_is_drawn_from_the_committed_history(tmp_path, monkeypatch):
    """`models/pretrain/history.csv`, `diagnostics.csv` and `metrics.json` in the repository are what the stage writes from the
    `history.json` beside them (a run rewrites all of them together)."""
    from pathlib import Path

    monkeypatch.setenv("ARD_TRACKING", "off")
    kept = Path(__file__).resolve().parents[2] / "models" / "pretrain"
    write_record(json.loads((kept / "history.json").read_text())["history"], tmp_path, start_lr=1e-3)
    for name in ("history.csv", "diagnostics.csv", "metrics.json"):
        assert (tmp_path / name).read_text() == (kept / name).read_text(), name
    assert (kept / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
