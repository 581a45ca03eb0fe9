"""Parity of an export with the PyTorch detector it came from, on real tuples.

Both sides score the same queries over every candidate through the evaluation harness
(``evaluate_method``): PyTorch with ``ARDMethod`` (the evaluation's scorer, with the
fitted identity weight and grid), the export with ``OnnxARDMethod``. The PyTorch side can
instead be the scores the ``evaluate`` stage recorded for its ``ARD`` row
(``reports/ard_scores.parquet``) when they come from the same checkpoint and re-ranking:
then the export is held against the very figures the evaluation reported. Reported: the
largest score and box differences, and Recall@1/5/10 of each side.

The detector's output is not everywhere a continuous function of its input. Its query
selection (GroundingDINO's two-stage design) takes the encoder tokens with the highest
scores *in order*, and slot i of the decoder pairs its own content embedding with the
i-th token: two tokens whose scores differ by a float32 rounding (about 1e-6) can come
out in either order, and a run that orders them the other way puts another box in a slot
and moves that candidate's answer by far more than the bounds. Both orders are correct
float32 arithmetic; on the default world 2 candidates of 3,328 sat on such a tie on one CPU.
So the fp32 gate re-checks each pair beyond the bounds (``tie_rechecks`` at most): PyTorch
scores that candidate alone, then again with each near tie of its selection order (or of
the selection's last place) resolved the other way, and the pair passes when one of these
runs gives PyTorch's own (recorded) answer and another the export's, each within the
bounds; the gate then measures the pair against the run that gave the export's. Any
other pair beyond the bounds fails the gate, and so does an export with more such pairs
than ``tie_rechecks`` (a broken export differs everywhere).
``parity.json`` lists every re-checked pair: the ties found and the run that matched.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from torch.overrides import TorchFunctionMode

from ardetect.evaluation.harness import Recording, Replay, candidates_of

RECALLS = ("recall@1", "recall@5", "recall@10")


def parity_queries(tuples: pd.DataFrame, negatives: pd.DataFrame, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first ``n`` test tuples (in the table's order) and their negatives."""
    test = tuples[tuples["split"] == "test"].head(n).reset_index(drop=True)
    if test.empty:
        raise ValueError("parity: the tuples have no test split to check the export on")
    return test, negatives[negatives["tuple_id"].astype(str).isin(set(test["tuple_id"].astype(str)))]


def _abs_diff(a, b) -> np.ndarray:
    """|a - b|, with NaN on one side only an infinite difference (it fails every bound) and NaN on both none."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = np.abs(a - b)
    return np.where(np.isnan(a) & np.isnan(b), 0.0, np.where(np.isnan(d), np.inf, d))


def pair_diffs(reference: Recording, other: Recording) -> pd.DataFrame:
    """One row per (query, candidate) ``other`` scored: tuple_id, position, candidate, both scores, |score|
    and largest |box coordinate| (pixels) differences (``reference`` may have seen more queries)."""
    parts = []
    for tid, got in other.seen.items():
        want = reference.seen[tid]
        parts.append(pd.DataFrame({
            "tuple_id": tid, "position": np.arange(len(got.scores)), "candidate": other.candidates[tid],
            "score": np.asarray(got.scores, dtype=np.float64), "reference_score": np.asarray(want.scores, dtype=np.float64),
            "score_diff": _abs_diff(got.scores, want.scores),
            "box_diff": _abs_diff(got.boxes, want.boxes).max(-1),
        }))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["tuple_id", "position", "candidate", "score_diff", "box_diff"])


def summarise(diffs: pd.DataFrame, box_tol: float = 0.5) -> dict:
    """Largest score and box differences of ``pair_diffs`` rows, and the share of candidates whose chosen
    box differs by more than ``box_tol`` (another of the top-k boxes won)."""
    if diffs.empty:
        return {"score_max_abs_diff": 0.0, "box_max_abs_diff_px": 0.0, "box_changed_share": 0.0}
    return {"score_max_abs_diff": float(diffs["score_diff"].max(skipna=False)),
            "box_max_abs_diff_px": float(diffs["box_diff"].max(skipna=False)),
            "box_changed_share": float((diffs["box_diff"] > box_tol).mean())}


def compare(reference: Recording, other: Recording, box_tol: float = 0.5) -> dict:
    """``summarise`` of ``pair_diffs``: the largest differences between two recordings of the same queries."""
    return summarise(pair_diffs(reference, other), box_tol)


class QueryOrder(TorchFunctionMode):
    """Inside it, the detector's query selection (``torch.topk`` with k = ``num_queries``) is recorded:
    ``values`` holds the top k + 1 selection scores of the last call, in order. With ``swaps``
    (ranks r), the selected tokens at ranks r and r + 1 are exchanged, r = k - 1 bringing in the
    first token left out, each swap applied in turn."""

    def __init__(self, k: int, swaps: tuple[int, ...] = ()):
        super().__init__()
        self.k, self.swaps, self.values = int(k), tuple(swaps), None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        import torch

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        k = args[1] if len(args) > 1 else kwargs.get("k")
        if func is torch.topk and k == self.k and args[0].dim() == 2:
            scores = args[0]
            order = scores.argsort(dim=1, descending=True, stable=True)[:, : self.k + 1]
            self.values = scores.gather(1, order)
            if self.swaps:
                for r in self.swaps:
                    order[:, [r, r + 1]] = order[:, [r + 1, r]]
                idx = order[:, : self.k]
                out = torch.return_types.topk((scores.gather(1, idx), idx))
        return out


def near_ties(values, rel_gap: float, most: int) -> list[tuple[int, float]]:
    """(rank r, gap) of the adjacent selection scores (ranks r and r + 1, ``QueryOrder.values`` of one
    image) closer than ``rel_gap`` x max(1, |score|): the ``most`` closest, closest first."""
    v = values[0].double()
    gaps = (v[:-1] - v[1:]).abs()
    bound = rel_gap * v[:-1].abs().clamp(min=1.0)
    ties = sorted((float(g), r) for r, (g, t) in enumerate(zip(gaps.tolist(), bound.tolist())) if g <= t)
    return [(r, g) for g, r in ties[:most]]


def tie_recheck(model, data_root: Path, image_size: int, queries: pd.DataFrame, torch_side: Recording, onnx_side: Recording,
                diffs: pd.DataFrame, score_tol: float, box_tol: float, identity_weight: float, grid: int, top_k: int,
                limit: int, rel_gap: float = 1e-5, most_ties: int = 3, class_weight: float = 0.0) -> tuple[pd.DataFrame, list[dict], str | None]:
    """The fp32 gate's re-check (module docstring) of the ``pair_diffs`` rows beyond the bounds.

    Returns (the rows, each explained pair measured against the PyTorch run that matched the
    export, one record per re-checked pair, why nothing was re-checked or None)."""
    from itertools import combinations

    import torch

    from ardetect.evaluation.ard import ARDMethod

    beyond = diffs[(diffs["score_diff"] > score_tol) | (diffs["box_diff"] > box_tol)]
    if beyond.empty:
        return diffs, [], None
    if len(beyond) > limit:
        return diffs, [], f"{len(beyond)} pairs beyond the bounds, more than tie_rechecks={limit}: none re-checked"
    runner = ARDMethod(model, data_root, image_size, name="tie re-check", identity_weight=identity_weight, top_k=top_k, grid=grid,
                       class_weight=class_weight)
    by_id = {str(t): q for t, (_, q) in zip(queries["tuple_id"], queries.iterrows())}
    identity = identity_weight > 0 or class_weight > 0
    k = model.cfg.num_queries
    diffs, records = diffs.copy(), []
    for idx, row in beyond.iterrows():
        tid, pos, cand = str(row["tuple_id"]), int(row["position"]), str(row["candidate"])
        onnx_box = np.asarray(onnx_side.seen[tid].boxes[pos], np.float64)
        onnx_score = float(onnx_side.seen[tid].scores[pos])
        feats, cache, sizes, _ = runner._inputs(by_id[tid], [cand], identity, identity and grid > 1)

        def run(swaps: tuple[int, ...]):
            with torch.no_grad(), QueryOrder(k, swaps) as mode:
                box, score = model.predict_region(feats, cache, image_sizes=sizes, identity_weight=identity_weight, top_k=top_k, grid=grid,
                                                  class_weight=class_weight)
            return mode, float(score[0]), box[0].double().numpy()

        base, score0, box0 = run(())
        ties = near_ties(base.values, rel_gap, most_ties) if base.values is not None else []
        ref_box = np.asarray(torch_side.seen[tid].boxes[pos], np.float64)
        ref_score = float(torch_side.seen[tid].scores[pos])
        within = lambda score, box, s2, b2: abs(score - s2) <= score_tol and float(np.abs(box - b2).max()) <= box_tol  # noqa: E731
        runs = {(): (score0, box0)}
        for swaps in [c for n in range(1, len(ties) + 1) for c in combinations(sorted(r for r, _ in ties), n)]:
            runs[swaps] = run(swaps)[1:]
        # explained: one resolution of a near tie gives the reference's answer, another the export's
        as_ref = [sw for sw, (sc, bx) in runs.items() if within(sc, bx, ref_score, ref_box)]
        as_onnx = [sw for sw, (sc, bx) in runs.items() if within(sc, bx, onnx_score, onnx_box)]
        match = next(((a, b) for b in as_onnx for a in as_ref if a != b), None) if ties else None
        name = lambda sw: "alone" if not sw else "alone, ties at ranks " + ", ".join(f"{r}/{r + 1}" for r in sw) + " swapped"  # noqa: E731
        rec = {"tuple_id": tid, "candidate": cand, "explained": match is not None,
               "near_ties": [{"ranks": [r, r + 1], "gap": g} for r, g in ties],
               "score": {"onnx": onnx_score, "pytorch": ref_score, "pytorch_alone": score0},
               "box_px": {"onnx": onnx_box.round(3).tolist(), "pytorch": ref_box.round(3).tolist(), "pytorch_alone": box0.round(3).tolist()}}
        if match is not None:
            score, box = runs[match[1]]
            ds, db = abs(onnx_score - score), float(np.abs(onnx_box - box).max())
            rec["matched"] = {"pytorch": name(match[0]), "run": name(match[1]), "score": score, "box_px": box.round(3).tolist(),
                              "score_diff": ds, "box_diff_px": db}
            diffs.loc[idx, ["score_diff", "box_diff"]] = [ds, db]
        records.append(rec)
    return diffs, records, None


def run_parity(
    model, folder: Path, tuples: pd.DataFrame, negatives: pd.DataFrame, data_root: Path, identity_weight: float, grid: int, top_k: int,
    queries: int = 32, variant_queries: int | Mapping[str, int | None] | None = None, score_tol: float = 1e-4, box_tol: float = 0.5, iou_threshold: float = 0.5, precisions: tuple[str, ...] = (),
    batch: int = 64, progress: bool = False, seconds: dict | None = None, reference: pd.DataFrame | None = None,
    tie_rechecks: int = 32, class_weight: float = 0.0,
) -> dict:
    """Parity of the fp32 export in ``folder`` (the gate) and of each extra scorer variant in
    ``precisions`` (reported, not gating) against PyTorch on ``queries`` test tuples; the variants
    run on the first ``variant_queries`` of them (default: all; a mapping gives each precision its own
    number, None or a missing precision = all), and each row's recalls and the
    PyTorch recalls it is held against are over the tuples it ran on.

    Returns {"queries", "candidates", "fp32": {diffs, recalls, "passed"}, <precision>: {...}, "passed"}.
    A variant onnxruntime cannot run here (fp16 on a CPU without fp16 kernels) reports why instead of figures.
    ``seconds``, when given, receives each side's wall time ("pytorch", "fp32", ...): kept out of the
    report, which is a DVC metric that should not change when nothing else did.
    ``reference``: PyTorch's scores recorded earlier for this model and re-ranking (``Recording.frame``,
    as ``evaluate`` writes them); used when it covers every parity tuple with the same candidates,
    otherwise PyTorch scores them here. The report's ``pytorch_source`` says which.
    ``tie_rechecks``: at most this many fp32 pairs beyond the bounds are re-checked for a
    selection-order tie (module docstring); 0 = none. When any pair was beyond the bounds, the fp32
    row's ``before_recheck`` holds the differences before the re-check, ``tie_rechecks`` each re-checked
    pair (or why none was), and its ``score_max_abs_diff`` and ``box_max_abs_diff_px`` are those the gate reads.
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
        torch_side = Recording(ARDMethod(model, data_root, size, name="PyTorch", batch=batch, identity_weight=identity_weight, top_k=top_k, grid=grid,
                                         class_weight=class_weight))
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
        limit = variant_queries.get(precision) if isinstance(variant_queries, Mapping) else variant_queries
        if precision != "fp32" and limit is not None and limit < len(t):
            on = t.head(limit)
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
        diffs = pair_diffs(torch_side, side)
        row = {"run": True, "queries": len(on), "providers": sorted(set(detector.providers_used.values())),
               **summarise(diffs, box_tol), **{k: float(got[k]) for k in RECALLS}}
        if precision == "fp32":
            start = time.perf_counter()
            gated, checks, why = tie_recheck(model, data_root, size, t, torch_side, side, diffs, score_tol, box_tol, identity_weight,
                                             grid, top_k, tie_rechecks, class_weight=class_weight)
            if checks or why:
                seconds["tie_recheck"] = time.perf_counter() - start
                row["before_recheck"] = summarise(diffs, box_tol)
                row.update(summarise(gated, box_tol))
                row["tie_rechecks"] = checks if checks else why
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
