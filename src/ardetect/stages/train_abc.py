"""Stage ``train_abc``: the AbC baseline (world encoder, affine heads, calibration) on the training split."""

from __future__ import annotations

from pathlib import Path

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import TUPLE_COLUMNS, drop_excluded, read_table
from ardetect.stages.common import DATA, EXCLUSIONS, run_stage

OUT = Path("models/abc")


def abc_image_size(cfg: Config) -> int:
    """The resolution AbC reads images at: ``abc.image_size``, else the detector's."""
    return cfg.abc.image_size or cfg.detector_image_size


def build(cfg: Config) -> dict:
    from ardetect.evaluation.abc import fit_abc, save_abc

    tuples = drop_excluded(read_table(DATA / "tuples" / "tuples.parquet", TUPLE_COLUMNS, "tuples"), EXCLUSIONS)
    size = abc_image_size(cfg)
    model, cal, stats = fit_abc(cfg.abc, tuples, DATA, size, log=lambda m, step: tracking.log_metrics(m, step=step))
    save_abc(OUT / "abc.pt", model, cal, cfg.abc, size, stats)
    return stats


def main() -> None:
    run_stage("train_abc", build, lambda c: {"abc": c.abc.model_dump()}, system_metrics=True)


if __name__ == "__main__":
    main()
