"""Stage ``exemplars``: the training images X with their concept boxes R_X and masks, and every object in them."""

from __future__ import annotations

from collections import Counter

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import EXEMPLAR_COLUMNS
from ardetect.stages.common import DATA, atomic_dir, run_stage, write_image_record

OUT = DATA / "exemplars"


def build_real(cfg: Config) -> dict:
    """COCO/LVIS exemplars with GroundingDINO boxes and SAM masks, in the same record."""
    from ardetect.generation.exemplars import make_real_exemplars

    if cfg.exemplars.real.fixtures:
        from ardetect.generation.fixtures import ensure_fixtures

        ensure_fixtures(cfg.exemplars.real.fixtures)
    with atomic_dir(OUT) as tmp:
        res = make_real_exemplars(cfg, tmp, DATA)
        table, objects = res.table, res.objects
        write_image_record(tmp, OUT, table, objects, EXEMPLAR_COLUMNS, "exemplars", "exemplars.parquet", ("image", "mask"))
        tracking.write_json_atomic({"skipped": res.skipped, "counts": res.skip_counts}, tmp / "skipped.json")
    tracking.log_dict({"per_class": dict(Counter(table["base_class"])), "skipped": res.skip_counts}, "exemplars_per_class.json")
    tracking.log_dict({"skipped": res.skipped}, "exemplars_skipped.json")
    return {"exemplars": len(table), "base_classes": table["base_class"].nunique(), "objects": len(objects),
            "skipped": len(res.skipped), **{f"skipped_{k}": v for k, v in res.skip_counts.items()}}


def build(cfg: Config) -> dict:
    if cfg.exemplars.source != "synthetic":
        return build_real(cfg)
    from ardetect.data.world import make_exemplars

    with atomic_dir(OUT) as tmp:
        table, objects = make_exemplars(cfg.world, tmp, DATA)
        write_image_record(tmp, OUT, table, objects, EXEMPLAR_COLUMNS, "exemplars", "exemplars.parquet", ("image", "mask"))
    tracking.log_dict({"per_class": dict(Counter(table["base_class"]))}, "exemplars_per_class.json")
    return {"exemplars": len(table), "base_classes": table["base_class"].nunique(), "objects": len(objects)}


def main() -> None:
    run_stage("exemplars", build, lambda c: {"world": c.world.model_dump(), "exemplars": c.exemplars.model_dump()})


if __name__ == "__main__":
    main()
