"""Stage ``exemplars``: the training images X with their concept boxes R_X and masks, and every object in them."""

from __future__ import annotations

from collections import Counter

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import EXEMPLAR_COLUMNS, OBJECT_COLUMNS, check_columns, write_parquet_atomic
from ardetect.stages.common import DATA, atomic_dir, rebase_paths, run_stage

OUT = DATA / "exemplars"


def build(cfg: Config) -> dict:
    if cfg.exemplars.source != "synthetic":
        from ardetect.generation.real import make_real_exemplars  # the real path

        make_real_exemplars(cfg)
    from ardetect.data.world import make_exemplars

    with atomic_dir(OUT) as tmp:
        table, objects = make_exemplars(cfg.world, tmp, DATA)
        check_columns(table, EXEMPLAR_COLUMNS, "exemplars")
        check_columns(objects, OBJECT_COLUMNS, "exemplar objects")
        for t in (table, objects):
            t["image"] = rebase_paths(t["image"], tmp, OUT, DATA)
            t["mask"] = rebase_paths(t["mask"], tmp, OUT, DATA)
        write_parquet_atomic(table, tmp / "exemplars.parquet")
        write_parquet_atomic(objects, tmp / "objects.parquet")
    tracking.log_dict({"per_class": dict(Counter(table["base_class"]))}, "exemplars_per_class.json")
    return {"exemplars": len(table), "base_classes": table["base_class"].nunique(), "objects": len(objects)}


def main() -> None:
    run_stage("exemplars", build, lambda c: {"world": c.world.model_dump(), "exemplars": c.exemplars.model_dump()})


if __name__ == "__main__":
    main()
