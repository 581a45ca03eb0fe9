"""Stage ``export``: the ARD detector as ONNX graphs, parity-checked, registered in MLflow.

Writes ``models/export/``: ``image_encoder.onnx``, ``query_encoder.onnx``, ``scorer.onnx``
(with the identity weight and grid ``evaluate`` fitted for the ARD row), ``variants/``
(fp16 and int8 scorers), ``tokenizer/``, ``manifest.json`` and ``parity.json`` (a DVC
metric). Parity holds the export against the scores ``evaluate`` recorded for its ``ARD``
row (``reports/ard_scores.parquet``) when they come from the same checkpoint and
re-ranking, so the served scores are checked against the very figures the evaluation
reported; otherwise PyTorch scores the parity tuples again. An export whose fp32 parity
fails fails the stage and leaves the previous
``models/export/`` untouched (its DVC outputs persist). Then the export is logged as an
MLflow model in this stage's run and registered; ``champion`` moves only on a better
test Recall@10 (``ardetect.export.registry``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import NEGATIVE_COLUMNS, TUPLE_COLUMNS, drop_excluded, read_table
from ardetect.stages.common import DATA, EXCLUSIONS, StageError, run_stage

OUT = Path("models/export")
REPORTS = Path("reports")
PHASE2 = Path("models/phase2/model.pt")


def earned_metrics(metrics_path: Path) -> dict[str, float]:
    """The test and world2 figures ``evaluate`` gave the ARD row (and the paper's score), flat, for the manifest and the version tags."""
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: run the evaluate stage first")
    m = json.loads(metrics_path.read_text())
    out = {}
    for world in ("test", "world2"):
        for row, prefix in (("ARD", ""), ("ARD paper score", "paper_")):
            for k, v in (m.get(world, {}).get(row) or {}).items():
                if v is not None:
                    out[f"{world}_{prefix}{tracking.metric_key(k)}"] = float(v)
    if "test_recall_at_10" not in out:
        raise StageError(f"{metrics_path} has no test Recall@10 for the ARD row")
    return out


def build(cfg: Config) -> dict:
    from ardetect.export.build import ExportOptions, build_export, identity_of, recheck_line, recorded_scores, variant_line

    ex = cfg.export
    weight, grid, class_weight = identity_of(REPORTS / "details.json")
    opts = ExportOptions(weight, grid, cfg.evaluate.identity_top_k, ex.opset, ex.fp16, ex.int8, ex.parity_queries,
                         ex.variant_queries, ex.score_tolerance, ex.box_tolerance_px, cfg.evaluate.iou_threshold, int8_queries=ex.int8_queries,
                         class_weight=class_weight)
    metrics = earned_metrics(REPORTS / "metrics.json")
    # memorisation events are not queries (the quality gate keeps them out of evaluation, and so of parity)
    tuples = drop_excluded(read_table(DATA / "tuples" / "tuples.parquet", TUPLE_COLUMNS, "tuples"), EXCLUSIONS)
    reference, why = recorded_scores(REPORTS / "details.json", PHASE2, opts)
    print(f"[export] parity's PyTorch side: {'the scores evaluate recorded, ' + why if reference is not None else 'scored here (' + why + ')'}")
    negatives = read_table(DATA / "tuples" / "negatives.parquet", NEGATIVE_COLUMNS, "negatives")
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri, tracking.repo_root())
    done = build_export(PHASE2, OUT, opts, phase1=Path("models/phase1/model.pt"), tuples=tuples,
                        negatives=negatives, data_root=DATA, metrics=metrics, register=ex.registry and tracking.tracks(), uri=uri,
                        model_name=ex.model_name, progress=True, reference=reference)
    parity = done["parity"]
    for name in ("manifest.json", "parity.json"):
        tracking.log_artifact(OUT / name, artifact_path="export")
    flat = {f"parity.{p}.{k}": v for p in ("fp32", "fp16", "int8") if parity.get(p, {}).get("run")
            for k, v in parity[p].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    reg = done["registration"]
    lines = [f"[export] {OUT}: identity weight {weight:g}, grid {grid}, class weight {class_weight:g}, top-k {opts.top_k}; parity on {parity['queries']} test tuples "
             f"x {parity['candidates']} candidates: score diff {parity['fp32']['score_max_abs_diff']:.2e}, "
             f"box diff {parity['fp32']['box_max_abs_diff_px']:.2e} px, Recall@1/5/10 "
             f"{[parity['fp32'][k] for k in ('recall@1', 'recall@5', 'recall@10')]} (PyTorch "
             f"{[parity['pytorch'][k] for k in ('recall@1', 'recall@5', 'recall@10')]})" + recheck_line(parity["fp32"], "; ")]
    for p in ("fp16", "int8"):
        if p in parity:
            r = parity[p]
            lines.append(f"[export] {p} scorer: " + (variant_line(r) if r["run"] else f"not run here ({r['reason']})"))
    if reg is not None:
        lines.append(f"[export] registered {reg.name} version {reg.version}: alias {reg.alias} ({reg.reason})")
    secs = done["seconds"]
    lines.append("[export] seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    print("\n".join(lines))
    return {**flat, **{f"export.seconds.{k}": round(v, 2) for k, v in secs.items()}, "export.identity_weight": weight, "export.grid": grid,
            "export.class_weight": class_weight}


def main() -> None:
    run_stage("export", build, lambda c: {"export": c.export.model_dump()})


if __name__ == "__main__":
    main()
