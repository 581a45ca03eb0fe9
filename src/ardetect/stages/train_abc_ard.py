"""Stage ``train_abc_ard``: the control row, AbC on ARD's backbone.

AbC's heads and calibrated influence on the pooled features of the trained phase-1
detector's frozen image side (its region map by default, ``abc.ard_features``; image
level): it tells how much of ARD's lead comes from its features rather than from
scoring regions.
"""

from __future__ import annotations

from pathlib import Path

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import TUPLE_COLUMNS, drop_excluded, read_table
from ardetect.stages.common import DATA, EXCLUSIONS, run_stage

OUT = Path("models/abc_ard")


def build(cfg: Config) -> dict:
    from ardetect.evaluation.abc import ARDBackboneEncoder, fit_abc, save_abc
    from ardetect.train.phases import image_size_of, load_model

    detector = load_model(Path("models/phase1/model.pt"))
    tuples = drop_excluded(read_table(DATA / "tuples" / "tuples.parquet", TUPLE_COLUMNS, "tuples"), EXCLUSIONS)
    size = image_size_of(detector)
    model, cal, stats = fit_abc(cfg.abc, tuples, DATA, size, base=ARDBackboneEncoder(detector, cfg.abc.pooling, cfg.abc.ard_features), log=lambda m, step: tracking.log_metrics(m, step=step))
    save_abc(OUT / "abc.pt", model, cal, cfg.abc, size, stats)
    return stats


def main() -> None:
    run_stage("train_abc_ard", build, lambda c: {"abc": c.abc.model_dump()}, system_metrics=True)


if __name__ == "__main__":
    main()
