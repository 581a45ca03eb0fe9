"""Stage ``pretrain``: GroundingDINO-style detection pre-training on every object of the training split.

Reads the ``objects`` tables of the exemplars and generated images and the tuples
(for the split); writes ``models/pretrain/model.pt``, the detector phase 1 starts
from. Resumes from ``models/pretrain/latest.pt``. With ``model.pretrained`` (a
transformers GroundingDINO checkpoint) the detector already grounds: the stage
writes those weights unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import OBJECT_COLUMNS, TUPLE_COLUMNS, drop_excluded, read_table
from ardetect.stages.common import DATA, EXCLUSIONS, run_stage

OUT = Path("models/pretrain")


def build(cfg: Config) -> dict:
    from ardetect.train.pretrain import run_pretrain

    if cfg.model.pretrained and cfg.pretrain.epochs:
        print(f"[pretrain] model.pretrained={cfg.model.pretrained!r}: the detector already grounds; its weights pass through unchanged")
        cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"epochs": 0})})
    tuples = drop_excluded(read_table(DATA / "tuples" / "tuples.parquet", TUPLE_COLUMNS, "tuples"), EXCLUSIONS)
    objects = pd.concat([read_table(DATA / sub / "objects.parquet", OBJECT_COLUMNS, f"{sub} objects") for sub in ("exemplars", "generated")],
                        ignore_index=True)
    _, history = run_pretrain(cfg, objects, tuples, DATA, OUT, log=lambda m, step: tracking.log_metrics(m, step=step))
    write_record(history, OUT, cfg.pretrain.lr)
    last = history[-1] if history else {}
    return {"epochs": cfg.pretrain.epochs, **{f"final_{k}": v for k, v in last.items() if isinstance(v, float)}}


def write_record(history: list[dict], out: Path, start_lr: float) -> None:
    """The pre-training's record beside its model: ``history.json`` (every epoch of the three steps),
    ``history.csv`` (the detection epochs' losses) and ``diagnostics.csv`` (the val diagnostics at the epochs
    they ran), both for ``dvc plots``, ``metrics.json`` (the last figures of each step, for ``dvc metrics``) and
    ``curves.png``; each written through a temp file, all logged to MLflow."""
    from ardetect.tmpdirs import replaced_atomically
    from ardetect.train.record import diagnostics_table, headline, loss_table, pretrain_curves

    pretrain_curves(history, out / "curves.png", start_lr)  # first: a figure that fails leaves the record as it was
    tracking.write_json_atomic({"history": history}, out / "history.json")
    for name, table in (("history.csv", loss_table(history)), ("diagnostics.csv", diagnostics_table(history))):
        with replaced_atomically(out / name) as tmp:
            table.to_csv(tmp, index=False)
    tracking.write_json_atomic(headline(history), out / "metrics.json")
    for name in ("history.json", "history.csv", "diagnostics.csv", "metrics.json", "curves.png"):
        tracking.log_artifact(out / name, artifact_path="pretrain")


def main() -> None:
    run_stage("pretrain", build, lambda c: {"model": c.model.model_dump(), "pretrain": c.pretrain.model_dump()}, system_metrics=True)


if __name__ == "__main__":
    main()
