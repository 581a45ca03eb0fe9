"""Stage ``train_phase2``: only the adapters, each positive with k fresh negatives (ARD)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import TUPLE_COLUMNS, drop_excluded, read_table
from ardetect.stages.common import DATA, EXCLUSIONS, run_stage, write_history
from ardetect.train.engine import init_distributed

OUT = Path("models/phase2")


def build(cfg: Config) -> dict:
    from ardetect.train.phases import run_phase2

    rank, world = init_distributed()
    tuples = drop_excluded(read_table(DATA / "tuples" / "tuples.parquet", TUPLE_COLUMNS, "tuples"), EXCLUSIONS)
    OUT.mkdir(parents=True, exist_ok=True)
    _, result = run_phase2(cfg, Path("models/phase1/model.pt"), tuples, DATA, OUT, log=lambda m, step: tracking.log_metrics(m, step=step))
    if rank == 0:
        shutil.copy2(OUT / "best.pt", OUT / ".model.pt.tmp")
        (OUT / ".model.pt.tmp").replace(OUT / "model.pt")
        write_history(result, OUT, artifact_path="phase2")
    last = result.history[-1] if result.history else {}
    return {"best_epoch": result.best_epoch, "world_size": world, **{f"final_{k}": v for k, v in last.items() if isinstance(v, float)}}


def main() -> None:
    run_stage("train_phase2", build, lambda c: {"train_phase2": c.train_phase2.model_dump()}, system_metrics=True)


if __name__ == "__main__":
    main()
