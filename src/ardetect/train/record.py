"""The pre-training's record as a person reads it: per-epoch table, dashboard figures and curves.

``run_pretrain`` keeps one history list: the crop classification's epochs (``classify_*``), the region
classifier's (``region_classify_*``), then the detection epochs (``epoch``, the losses, ``lr`` and, after
the epochs the diagnostics ran, ``val_*``). These functions split it into what ``dvc plots``, ``dvc
metrics`` and a reader want: the detection epochs' losses and the diagnostics as two tables, the last
figures of each step, and one figure of all three steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

DIAGNOSTICS = ("val_grounding", "val_concept_grounding", "val_class_rprecision")
DIAGNOSTIC_LABELS = {"val_grounding": "grounding", "val_concept_grounding": "concept grounding", "val_class_rprecision": "class R-precision"}
LOSS_PARTS = (("train_loss_class", "class (focal)"), ("train_loss_bbox", "box L1"), ("train_loss_giou", "GIoU"))
# the crop classifications: (metrics key, label, epoch field, val accuracy field, loss field)
CROP_STEPS = (
    ("classify_val_accuracy", "backbone crops", "classify_epoch", "val_classify_accuracy", "classify_loss"),
    ("region_classifier_val_accuracy", "region classifier", "region_classify_epoch", "region_val_classify_accuracy", "region_classify_loss"),
)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def detection_epochs(history: list[dict]) -> pd.DataFrame:
    """The detection epochs, one row each (their scalar fields), in epoch order; the diagnostics are empty
    (NaN) after the epochs they did not run. Columns: ``epoch`` first, then by name, so that the history as the
    run holds it and as ``history.json`` gives it back (its keys sorted) make the same table."""
    rows = [{k: v for k, v in r.items() if _number(v)} for r in history if "epoch" in r]
    if not rows:
        return pd.DataFrame({"epoch": pd.Series([], dtype="int64")})
    frame = pd.DataFrame(rows).sort_values("epoch", kind="stable").reset_index(drop=True)
    frame["epoch"] = frame["epoch"].astype("int64")
    return frame[["epoch", *sorted(c for c in frame.columns if c != "epoch")]]


def loss_table(history: list[dict]) -> pd.DataFrame:
    """``history.csv``: each detection epoch's losses and learning rate, without the diagnostics (a plot would
    read their empty cells as zeros)."""
    epochs = detection_epochs(history)
    return epochs[[c for c in epochs.columns if c not in DIAGNOSTICS]]


def diagnostics_table(history: list[dict]) -> pd.DataFrame:
    """``diagnostics.csv``: the epochs the val diagnostics ran after, one row each, every cell filled."""
    epochs = detection_epochs(history)
    present = [c for c in DIAGNOSTICS if c in epochs]
    if not present:
        return pd.DataFrame({"epoch": pd.Series([], dtype="int64"), **{c: pd.Series([], dtype="float64") for c in DIAGNOSTICS}})
    return epochs.dropna(subset=present, how="all")[["epoch", *present]].reset_index(drop=True)


def headline(history: list[dict]) -> dict:
    """The dashboard's figures (``dvc metrics show``): the detection epochs run, the last epoch's training
    loss, the last diagnostics and the epoch they were read after, and each crop classification's last val
    accuracy. A step that did not run (or had no val images) leaves its keys out."""
    epochs = detection_epochs(history)
    out: dict = {"epochs": int(epochs["epoch"].max()) if len(epochs) else 0}
    if "train_loss" in epochs and epochs["train_loss"].notna().any():
        out["train_loss"] = round(float(epochs["train_loss"].dropna().iloc[-1]), 4)
    read = diagnostics_table(history)
    if len(read):
        last = read.iloc[-1]
        out["diagnostics_epoch"] = int(last["epoch"])
        out.update({c: round(float(last[c]), 4) for c in DIAGNOSTICS if pd.notna(last[c])})
    for name, _, _, field, _ in CROP_STEPS:
        seen = [r[field] for r in history if _number(r.get(field))]
        if seen:
            out[name] = round(float(seen[-1]), 4)
    return out


def lr_drops(epochs: pd.DataFrame, start_lr: float) -> list[int]:
    """The epochs after which the learning rate fell (each record's ``lr`` is the next epoch's)."""
    if "lr" not in epochs or not len(epochs):
        return []
    before, drops = start_lr, []
    for epoch, lr in zip(epochs["epoch"], epochs["lr"]):
        if pd.notna(lr) and lr < before * (1 - 1e-9):
            drops.append(int(epoch))
        before = lr if pd.notna(lr) else before
    return drops


def pretrain_curves(history: list[dict], out: Path, start_lr: float) -> Path:
    """One PNG of the three steps: each crop classification's val accuracy (its loss where it had no val
    images), the detection epochs' training losses (the last decoder layer's parts), and the val
    diagnostics at the epochs they ran, each labelled with its last value; dotted lines where the learning rate
    fell. A history without detection epochs (``pretrain.epochs: 0``, a ``model.pretrained`` passed through) still
    gets its figure, saying so."""
    from ardetect.data.figures import _plt, _save_atomic

    plt = _plt()
    epochs = detection_epochs(history)
    crops = [step for step in CROP_STEPS if any(step[2] in r for r in history)]
    accuracy = any(step[3] in r for step in crops for r in history)  # else the losses (no val images)
    panels = 3 if crops else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    try:
        _draw_curves(list(axes[0]), history, epochs, crops, accuracy, lr_drops(epochs, start_lr))
        fig.tight_layout()
        return _save_atomic(fig, out)
    finally:
        plt.close(fig)


def _draw_curves(axes: list, history: list[dict], epochs: pd.DataFrame, crops: list, accuracy: bool, drops: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    if crops:
        ax = axes.pop(0)
        for _, label, epoch_field, val_field, loss_field in crops:
            rows = [r for r in history if epoch_field in r]
            values = [r.get(val_field if accuracy else loss_field, math.nan) for r in rows]
            ax.plot([r[epoch_field] for r in rows], values, marker="o", ms=4, label=f"{label} ({values[-1]:.2f})")
        ax.set_title("Crop classification", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("val accuracy" if accuracy else "training loss")
        if accuracy:
            ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    losses, diagnostics = axes
    for ax in (losses, diagnostics):
        for i, epoch in enumerate(drops):
            ax.axvline(epoch + 0.5, color="grey", ls=":", lw=1, label="lr falls" if i == 0 else None)
    drawn = [field for field, _ in LOSS_PARTS if field in epochs and epochs[field].notna().any()]
    for field, label in LOSS_PARTS:
        if field in drawn:
            losses.plot(epochs["epoch"], epochs[field], marker="o", ms=3, label=label)
    losses.set_title("Detection pre-training: training loss (last layer)", fontsize=9)
    if drawn:
        losses.set_yscale("log")
    for field in DIAGNOSTICS:
        if field in epochs and epochs[field].notna().any():
            read = epochs[epochs[field].notna()]
            diagnostics.plot(read["epoch"], read[field], marker="o", ms=4, label=f"{DIAGNOSTIC_LABELS[field]} ({read[field].iloc[-1]:.2f})")
    diagnostics.set_title("Val diagnostics (last value)", fontsize=9)
    diagnostics.set_ylim(0, 1)
    for ax in (losses, diagnostics):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs):
            ax.set_xlim(0.5, int(epochs["epoch"].max()) + 0.5)
        else:
            ax.text(0.5, 0.5, "no detection epochs ran", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        if ax.lines:
            ax.legend(fontsize=8, loc="lower right" if ax is diagnostics else "upper right")
