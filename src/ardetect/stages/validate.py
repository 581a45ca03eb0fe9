"""Stage ``validate``: Great Expectations checks of the tuple annotations and of the objects table.

Writes to ``data/validation/`` whether the checks pass or not: ``report.md`` (the
readable report), ``summary.json`` (the headline, a DVC metric: success, counts,
failed expectations, failed families) and ``checks.json`` (every check, the failures
with example rows, counts, params: an output, not a metric). A failed expectation
fails the stage (non-zero exit), so ``dvc repro`` runs nothing downstream, and
leaves every earlier output untouched.
"""

from __future__ import annotations

import sys

import pandas as pd

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import NEGATIVE_COLUMNS, OBJECT_COLUMNS, TUPLE_COLUMNS, read_table
from ardetect.stages.common import DATA, StageError, atomic_dir, run_stage

OUT = DATA / "validation"
HEADLINE = ("success", "tuples", "negatives", "images", "objects", "expectations", "failed_expectations", "failed_families")


def headline(summary: dict) -> dict:
    """The dashboard part of the validation summary (``summary.json``)."""
    out = {k: summary[k] for k in HEADLINE if k in summary}
    out["failed_family_count"] = len(summary.get("failed_families", []))
    return out


def build(cfg: Config) -> dict:
    from ardetect.data.quality import validate_tuples

    tuples = read_table(DATA / "tuples" / "tuples.parquet", TUPLE_COLUMNS, "tuples")
    negatives = read_table(DATA / "tuples" / "negatives.parquet", NEGATIVE_COLUMNS, "negatives")
    objects = pd.concat([read_table(DATA / sub / "objects.parquet", OBJECT_COLUMNS, f"{sub} objects")
                         for sub in ("exemplars", "generated")], ignore_index=True)
    placeholder = cfg.world.placeholder if cfg.exemplars.source == "synthetic" else None
    result = validate_tuples(tuples, negatives, DATA, cfg.validate_, cfg.tuples.split, placeholder=placeholder, objects=objects)
    summary = result.summary()
    with atomic_dir(OUT) as tmp:
        result.write_report(tmp)  # report.md, and summary.json in full: that becomes checks.json
        (tmp / "summary.json").replace(tmp / "checks.json")
        tracking.write_json_atomic(headline(summary), tmp / "summary.json")
    for path in sorted(OUT.iterdir()):
        if path.is_file():
            tracking.log_artifact(path, artifact_path="validation")
    metrics = {f"family_{k}": float(v) for k, v in result.families.items()}
    metrics["success"] = float(result.success)
    metrics["failed_expectations"] = float(len(result.failures))
    tracking.log_metrics(metrics)
    if not result.success:
        print(result.message(), file=sys.stderr)
        raise StageError(
            f"{len(result.failures)} expectation(s) failed; report in {OUT / 'report.md'} "
            f"(families failed: {sorted(k for k, v in result.families.items() if not v)})"
        )
    return {"checked_tuples": summary.get("tuples", len(tuples)), **metrics}


def main() -> None:
    run_stage("validate", build, lambda c: {"validate": c.validate_.model_dump()})


if __name__ == "__main__":
    main()
