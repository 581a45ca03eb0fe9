"""Stage ``tuples``: join generated images to exemplars, split by concept, list negatives.

``stats.json`` (a DVC metric) holds the headline counts: tuples, concepts, per split,
negatives. ``details.json`` (an output, not a metric) holds the breakdowns: counts
per base class and per medium, box-size statistics. Both are logged to MLflow.
"""

from __future__ import annotations

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.figures import box_size_histograms, tuple_gallery
from ardetect.data.schema import EXEMPLAR_COLUMNS, GENERATED_COLUMNS, read_table, write_parquet_atomic
from ardetect.data.tuples import assign_splits, build_negatives, build_tuples, statistics
from ardetect.stages.common import DATA, atomic_dir, run_stage

OUT = DATA / "tuples"
HEADLINE = ("tuples", "concepts", "per_split", "concepts_per_split", "negatives")


def split_statistics(stats: dict) -> tuple[dict, dict]:
    """(headline for ``stats.json``, the rest for ``details.json``)."""
    return {k: v for k, v in stats.items() if k in HEADLINE}, {k: v for k, v in stats.items() if k not in HEADLINE}


def build(cfg: Config) -> dict:
    exemplars = read_table(DATA / "exemplars" / "exemplars.parquet", EXEMPLAR_COLUMNS, "exemplars")
    generated = read_table(DATA / "generated" / "generated.parquet", GENERATED_COLUMNS, "generated")
    splits = assign_splits(exemplars, cfg.tuples.split, cfg.tuples.split_seed)
    tuples = build_tuples(exemplars, generated, splits)
    negatives = build_negatives(tuples, exemplars, splits)
    stats = statistics(tuples, negatives)
    headline, details = split_statistics(stats)
    with atomic_dir(OUT) as tmp:
        write_parquet_atomic(tuples, tmp / "tuples.parquet")
        write_parquet_atomic(negatives, tmp / "negatives.parquet")
        tracking.write_json_atomic(headline, tmp / "stats.json")
        tracking.write_json_atomic(details, tmp / "details.json")
        tuple_gallery(tuples, DATA, tmp / "gallery.png", n=cfg.tuples.gallery_size, seed=cfg.tuples.split_seed)
        box_size_histograms(tuples, tmp / "box_sizes.png")
    for name in ("stats.json", "details.json", "gallery.png", "box_sizes.png"):
        tracking.log_artifact(OUT / name, artifact_path="tuples")
    return {
        "tuples": stats["tuples"],
        "concepts": stats["concepts"],
        **{f"tuples_{k}": v for k, v in stats["per_split"].items()},
        **{f"concepts_{k}": v for k, v in stats["concepts_per_split"].items()},
        **{f"class_{k}": v for k, v in stats["per_class"].items()},
        **{f"medium_{k.replace(' ', '_')}": v for k, v in stats["per_medium"].items()},
        "negatives_min_per_test_query": stats["negatives"].get("min_per_test_query", 0),
        "negatives_rows": stats["negatives"]["rows"],
    }


def main() -> None:
    run_stage("tuples", build, lambda c: {"tuples": c.tuples.model_dump()})


if __name__ == "__main__":
    main()
