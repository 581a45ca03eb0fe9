"""Parity of an export with the PyTorch detector it came from, on real tuples.

Both sides score the same queries over every candidate through the evaluation harness
(``evaluate_method``): PyTorch with ``ARDMethod`` (the evaluation's scorer, with the
fitted identity weight and grid), the export with ``OnnxARDMethod``. The PyTorch side can
instead be the scores the ``evaluate`` stage recorded for its ``ARD`` row
(``reports/ard_scores.parquet``) when they come from the same checkpoint and re-ranking:
then the export is held against the very figures the evaluation reported. Reported: the
largest score and box differences, and Recall@1/5/10 of each side.
"""

from __future__ import annotations

import time

from pathlib import Path

import numpy as np
import pandas as pd

from ardetect.evaluation.harness import Recording, Replay, candidates_of

RECALLS = ("recall@1", "recall@5", "recall@10")


def parity_queries(tuples: pd.DataFrame, negatives: pd.DataFrame, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first ``n`` test tuples (in the table's order) and their negatives."""
    test = tuples[tuples["split"] == "test"].head(n).reset_index(drop=True)
    if test.empty:
        raise ValueError("parity: the tuples have no test split to check the export on")
    return test, negatives[negatives["tuple_id"].astype(str).isin(set(test["tuple_id"].astype(str)))]


def compare(reference: Recording, other: Recording, box_tol: float = 0.5) -> dict:
    """Largest |score| and |box| (pixels) differences between two recordings of the same queries, and the
    share of candidates whose chosen box differs by more than ``box_tol`` (another of the top-k boxes won)."""
    ds, db, moved, total = 0.0, 0.0, 0, 0
    for tid, got in other.seen.items():  # (``reference`` may have seen more queries)
        want = reference.seen[tid]
        ds = max(ds, float(np.max(np.abs(np.asarray(got.scores) - np.asarray(want.scores)))))
        diff = np.abs(np.asarray(got.boxes) - np.asarray(want.boxes)).max(-1)
        db = max(db, float(diff.max()))
        moved, total = moved + int((diff > box_tol).sum()), total + len(diff)
    return {"score_max_abs_diff": ds, "box_max_abs_diff_px": db, "box_changed_share": moved / max(total, 1)}


def run_parity(
    model, folder: Path, tuples: pd.DataFrame, negatives: pd.DataFrame, data_root: Path, identity_weight: float, grid: int, top_k: int,
    queries: int = 32, variant_queries: int | None = None, score_tol: float = 1e-4, box_tol: float = 0.5, iou_threshold: float = 0.5, precisions: tuple[str, ...] = (),
    batch: int = 64, progress: bool = False, seconds: dict | None = None, reference: pd.DataFrame | None = None,
) -> dict:
    """Parity of the fp32 export in ``folder`` (the gate) and of each extra scorer variant in
    ``precisions`` (reported, not gating) against PyTorch on ``queries`` test tuples; the variants
    run on the first ``variant_queries`` of them (default: all), and each row's recalls and the
    PyTorch recalls it is held against are over the tuples it ran on.

    Returns {"queries", "candidates", "fp32": {diffs, recalls, "passed"}, <precision>: {...}, "passed"}.
    A variant onnxruntime cannot run here (fp16 on a CPU without fp16 kernels) reports why instead of figures.
    ``seconds``, when given, receives each side's wall time ("pytorch", "fp32", ...): kept out of the
    report, which is a DVC metric that should not change when nothing else did.
    ``reference``: PyTorch's scores recorded earlier for this model and re-ranking (``Recording.frame``,
    as ``evaluate`` writes them); used when it covers every parity tuple with the same candidates,
    otherwise PyTorch scores them here. The report's ``pytorch_source`` says which.
    """
    from ardetect.evaluation.ard import ARDMethod
    from ardetect.evaluation.harness import evaluate_method
    from ardetect.export.runtime import OnnxARDMethod, OnnxDetector
    from ardetect.train.phases import image_size_of

    t, negs = parity_queries(tuples, negatives, queries)
    size = image_size_of(model)
    replay = None if reference is None else Replay("PyTorch", reference)
    if replay is not None and replay.covers(candidates_of(t, negs)):
        torch_side, source = Recording(replay), "evaluate"
    else:
        torch_side = Recording(ARDMethod(model, data_root, size, name="PyTorch", batch=batch, identity_weight=identity_weight, top_k=top_k, grid=grid))
        source = "computed" if replay is None else "computed (the recorded scores lack some parity tuples or candidates)"
    seconds = {} if seconds is None else seconds
    start = time.perf_counter()
    torch_eval = evaluate_method(torch_side, t, negs, iou_threshold, progress=progress)
    want = torch_eval.summary
    seconds["pytorch"] = time.perf_counter() - start
    n_cand = 1 + negs.groupby("tuple_id", observed=True).size()
    report: dict = {"queries": len(t), "candidates": int(n_cand.max()) if len(n_cand) else 1,
                    "pytorch": {k: float(want[k]) for k in RECALLS}, "pytorch_source": source}
    # the encoders are the same graphs for every scorer variant: one session each, each image and query encoded once
    shared, encoded, fp32 = {}, {}, OnnxDetector(folder)
    for precision in ("fp32", *[p for p in precisions if p != "fp32"]):
        start = time.perf_counter()
        on, on_negs = t, negs
        if precision != "fp32" and variant_queries is not None and variant_queries < len(t):
            on = t.head(variant_queries)
            on_negs = negs[negs["tuple_id"].astype(str).isin(set(on["tuple_id"].astype(str)))]
        try:
            detector = fp32 if precision == "fp32" else fp32.with_precision(precision)
            side = Recording(OnnxARDMethod(detector, data_root, name=f"ONNX {precision}", batch=batch, features=shared, queries=encoded))
            got = evaluate_method(side, on, on_negs, iou_threshold, progress=progress).summary
            seconds[precision] = time.perf_counter() - start
        except Exception as err:
            if precision == "fp32":
                raise
            report[precision] = {"run": False, "reason": f"{type(err).__name__}: {str(err).strip()[:300]}"}
            continue
        row = {"run": True, "queries": len(on), "providers": sorted(set(detector.providers_used.values())),
               **compare(torch_side, side, box_tol), **{k: float(got[k]) for k in RECALLS}}
        reference = report["pytorch"]
        if len(on) < len(t):  # PyTorch's recalls over the same tuples
            ids = set(on["tuple_id"].astype(str))
            sub = torch_eval.per_query[torch_eval.per_query["tuple_id"].astype(str).isin(ids)]
            reference = row["pytorch_same_queries"] = {k: float(sub[k].mean()) for k in RECALLS}
        if precision == "fp32":
            fp32_side = side
        else:  # a variant's own parity against the fp32 export
            row["vs_fp32"] = compare(fp32_side, side, box_tol)
        row["recalls_equal"] = all(row[k] == reference[k] for k in RECALLS)
        row["within_bounds"] = bool(row["score_max_abs_diff"] <= score_tol and row["box_max_abs_diff_px"] <= box_tol and row["recalls_equal"])
        report[precision] = row
    report["bounds"] = {"score_max_abs_diff": score_tol, "box_max_abs_diff_px": box_tol, "recalls": "equal"}
    report["passed"] = report["fp32"]["within_bounds"]
    return report
