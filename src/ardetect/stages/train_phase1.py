"""Stage ``train_phase1``: the detector on positives (ARD−), from the pre-trained detector
(models/pretrain/model.pt). Resumes from models/phase1/latest.pt."""

from __future__ import annotations

import shutil
from pathlib import Path

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import TUPLE_COLUMNS, drop_excluded, read_table
from ardetect.stages.common import DATA, EXCLUSIONS, run_stage, write_history
from ardetect.train.engine import init_distributed

OUT = Path("models/phase1")
PRETRAINED = Path("models/pretrain/model.pt")  # the pretrain stage's detector: phase 1 starts from it


def build(cfg: Config) -> dict:
    from ardetect.train.phases import run_phase1

    rank, world = init_distributed()
    tuples = drop_excluded(read_table(DATA / "tuples" / "tuples.parquet", TUPLE_COLUMNS, "tuples"), EXCLUSIONS)
    OUT.mkdir(parents=True, exist_ok=True)
    _, result = run_phase1(cfg, tuples, DATA, OUT, log=lambda m, step: tracking.log_metrics(m, step=step), init=PRETRAINED)
    if rank == 0:
        shutil.copy2(OUT / "best.pt", OUT / ".model.pt.tmp")
        (OUT / ".model.pt.tmp").replace(OUT / "model.pt")
        write_history(result, OUT, artifact_path="phase1")
    last = result.history[-1] if result.history else {}
    return {"best_epoch": result.best_epoch, "world_size": world, **{f"final_{k}": v for k, v in last.items() if isinstance(v, float)}}


def main() -> None:
    run_stage("train_phase1", build, lambda c: {"model": c.model.model_dump(), "train_phase1": c.train_phase1.model_dump()}, system_metrics=True)


if __name__ == "__main__":
    main()
