"""Stage ``validate``: Great Expectations checks of the tuple annotations, of the objects tables,
of the records' agreement with their source tables, and of the pixels (boxes against masks,
blank images, copies).

Writes to ``data/validation/`` whether the checks pass or not: ``report.md`` (the
readable report), ``summary.json`` (the headline, a DVC metric: success, counts,
failed expectations, failed families, memorisation events), ``checks.json`` (every check,
the failures with example rows, counts, params: an output, not a metric),
``exclusions.parquet`` (the tuples the training and evaluation stages leave out: queries that
copy their own training image) and ``data_docs/`` (Great Expectations' Data Docs site,
``index.html``: every expectation and its failing rows), all logged to MLflow. A failed
expectation fails the stage (non-zero exit), so ``dvc repro`` runs nothing downstream, and
leaves every earlier output untouched.

On the real path R_Q is also checked against a second detection of the concept in Q,
``data/generated/detections.parquet`` (:data:`ardetect.data.schema.DETECTION_COLUMNS`), which
the real ``generate`` stage writes with :func:`ardetect.data.content.detect_phrases`.
"""

from __future__ import annotations

import sys

import pandas as pd

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import (
    DETECTION_COLUMNS,
    EXEMPLAR_COLUMNS,
    GENERATED_COLUMNS,
    NEGATIVE_COLUMNS,
    OBJECT_COLUMNS,
    TUPLE_COLUMNS,
    read_table,
    write_parquet_atomic,
)
from ardetect.stages.common import DATA, StageError, atomic_dir, run_stage

OUT = DATA / "validation"
DETECTIONS = DATA / "generated" / "detections.parquet"
HEADLINE = ("success", "tuples", "negatives", "images", "objects", "memorisation_events", "expectations",
            "failed_expectations", "failed_families")


def headline(summary: dict) -> dict:
    """The dashboard part of the validation summary (``summary.json``)."""
    out = {k: summary[k] for k in HEADLINE if k in summary}
    out["failed_family_count"] = len(summary.get("failed_families", []))
    return out


def read_detections(cfg: Config) -> pd.DataFrame | None:
    """The second detections of the real path (None in the synthetic world, whose masks are known)."""
    if cfg.exemplars.source == "synthetic":
        return None
    if not DETECTIONS.is_file():
        raise StageError(
            f"exemplars.source={cfg.exemplars.source!r}: the real path checks R_Q against a second detection of the "
            f"concept in Q, but {DETECTIONS} does not exist; the real generate stage writes it with "
            "ardetect.data.content.detect_phrases(tuples, data_root, detector) and GroundingDINO"
        )
    return read_table(DETECTIONS, DETECTION_COLUMNS, "detections")


def build(cfg: Config) -> dict:
    from ardetect.data.quality import validate_tuples

    tuples = read_table(DATA / "tuples" / "tuples.parquet", TUPLE_COLUMNS, "tuples")
    negatives = read_table(DATA / "tuples" / "negatives.parquet", NEGATIVE_COLUMNS, "negatives")
    objects = pd.concat([read_table(DATA / sub / "objects.parquet", OBJECT_COLUMNS, f"{sub} objects")
                         for sub in ("exemplars", "generated")], ignore_index=True)
    exemplars = read_table(DATA / "exemplars" / "exemplars.parquet", EXEMPLAR_COLUMNS, "exemplars")
    generated = read_table(DATA / "generated" / "generated.parquet", GENERATED_COLUMNS, "generated")
    detections = read_detections(cfg)
    synthetic = cfg.exemplars.source == "synthetic"
    placeholder = cfg.world.placeholder if synthetic else None
    distractors = (cfg.world.distractors.min_count, cfg.world.distractors.max_count) if synthetic else None
    result = validate_tuples(tuples, negatives, DATA, cfg.validate_, cfg.tuples.split, placeholder=placeholder, objects=objects,
                             exemplars=exemplars, generated=generated, detections=detections, distractors=distractors)
    summary = result.summary()
    with atomic_dir(OUT) as tmp:
        result.write_report(tmp, data_docs=True)  # report.md, data_docs/, and summary.json in full: that becomes checks.json
        (tmp / "summary.json").replace(tmp / "checks.json")
        tracking.write_json_atomic(headline(summary), tmp / "summary.json")
        write_parquet_atomic(result.exclusions(), tmp / "exclusions.parquet")
    for path in sorted(OUT.iterdir()):
        if path.is_file():
            tracking.log_artifact(path, artifact_path="validation")
    docs = OUT / "data_docs"
    for path in sorted(docs.rglob("*")):  # the Data Docs site, browsable from the run's artifacts
        if path.is_file():
            tracking.log_artifact(path, artifact_path=f"validation/{path.parent.relative_to(OUT).as_posix()}")
    metrics = {f"family_{k}": float(v) for k, v in result.families.items()}
    metrics["success"] = float(result.success)
    metrics["failed_expectations"] = float(len(result.failures))
    metrics["memorisation_events"] = float(len(result.memorisation))
    metrics["runtime_s"] = round(result.runtime_s, 3)  # in the run and report.md, not in checks.json (a tracked file)
    tracking.log_metrics(metrics)
    if not result.success:
        print(result.message(), file=sys.stderr)
        raise StageError(
            f"{len(result.failures)} expectation(s) failed; report in {OUT / 'report.md'}, Data Docs in "
            f"{docs / 'index.html'} (families failed: {sorted(k for k, v in result.families.items() if not v)})"
        )
    return {"checked_tuples": summary.get("tuples", len(tuples)), **metrics}


def main() -> None:
    run_stage("validate", build, lambda c: {"validate": c.validate_.model_dump()})


if __name__ == "__main__":
    main()
