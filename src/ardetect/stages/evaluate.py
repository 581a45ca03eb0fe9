"""Stage ``evaluate``: ARD, ARD− (phase 1 only), AbC and chance on the same test tuples.

Also on the second world (unseen identities). Writes DVC metrics, a markdown report,
Recall@K plot data and figures to ``reports/``, and logs them all to MLflow.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import NEGATIVE_COLUMNS, TUPLE_COLUMNS, read_table, write_parquet_atomic
from ardetect.stages.common import DATA, atomic_dir, run_stage

OUT = Path("reports")
NOTE = (
    "Recall@K and InverseRank@K follow the ARD paper (sec. 5.1): the positive's rank among its own training image "
    "and every negative (all other concepts' training images in the split), ties counted against the positive, and "
    "0 when the predicted region's IoU with R_X is below {iou}. AbC and chance are image-level: they predict no "
    "region, so they are ranked without the IoU gate and their box accuracy is N/A (as in the paper's table 2). "
    "class_rprecision is our diagnostic, not the paper's: with n the number of candidates of the query's base class "
    "(its own image included), the share of that class among the n best scored candidates; 1 = every image of the "
    "class ranked first, chance = n / candidates. No IoU gate.\n\n"
    "ARD and ARD- score with the identity re-ranking (ours, README \"Identity re-ranking\"): of each candidate's "
    "{top_k} most probable boxes, the one with the best probability x exp(w (cos - 1)) wins, cos being the cosine "
    "between the query region's descriptor and the same pooling of the candidate's region at the box (on g x g cells; "
    "g = 1 is the region token). The weight w and the pooling grid g of each are fitted on {fit} val queries (never "
    "the test tuples); w = 0 is the paper's score. The rows \"ARD paper score\" and \"ARD- paper score\" are the "
    "same detectors scored as the paper scores them (w = 0)."
)
PAPER = " paper score"


def _subset(tuples: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    if n is None or n >= len(tuples):
        return tuples
    rng = np.random.default_rng(seed)
    return tuples.iloc[np.sort(rng.choice(len(tuples), size=n, replace=False))]


def build(cfg: Config) -> dict:
    from ardetect.evaluation.abc import AbCMethod, load_abc
    from ardetect.evaluation.ard import SharedTrunkARD
    from ardetect.evaluation.figures import recall_curve, recall_plot, retrieval_figure
    from ardetect.evaluation.harness import ChanceMethod, evaluate_method, results_table
    from ardetect.train.phases import image_size_of, load_model

    ev = cfg.evaluate
    ard = load_model(Path("models/phase2/model.pt"))
    ard_minus = load_model(Path("models/phase1/model.pt"))
    abc, cal = load_abc(Path("models/abc/abc.pt"))
    size = image_size_of(ard)
    worlds = {
        "test": (DATA / "tuples" / "tuples.parquet", DATA / "tuples" / "negatives.parquet"),
        "world2": (DATA / "world2" / "tuples.parquet", DATA / "world2" / "negatives.parquet"),
    }
    metrics: dict = {}
    sections, per_query_all = [], []
    detectors = {"ARD": ard, "ARD-": ard_minus}
    identity = max(ev.identity_weights) > 0
    weights, fit_section = fit_weights(cfg, detectors, size, identity)
    metrics["identity_fit"] = weights
    with atomic_dir(OUT) as tmp:
        for world, (tpath, npath) in worlds.items():
            tuples = read_table(tpath, TUPLE_COLUMNS, world)
            class_of = dict(zip(tuples["train_image"].astype(str), tuples["base_class"].astype(str)))
            tuples = _subset(tuples[tuples["split"] == "test"].reset_index(drop=True), ev.max_queries, cfg.train_phase1.seed)
            negatives = read_table(npath, NEGATIVE_COLUMNS, f"{world} negatives")
            negatives = negatives[negatives["tuple_id"].astype(str).isin(set(tuples["tuple_id"]))]
            figure_ids = list(tuples["tuple_id"].iloc[:: max(1, len(tuples) // max(ev.figure_queries, 1))][: ev.figure_queries])
            # ARD and ARD- differ only in the adapters: one pass of the detector scores both
            grids = sorted({w["grid"] for w in weights.values()})
            shared = SharedTrunkARD(detectors, DATA, size, batch=ev.candidate_batch, top_k=ev.identity_top_k, identity=identity, grids=grids)
            methods = [
                *shared.methods({name: (w["weight"], w["grid"]) for name, w in weights.items()}),
                AbCMethod(abc, cal, DATA, cfg.abc.image_size),
                ChanceMethod(seed=cfg.train_phase1.seed),
                *[shared.method(name + PAPER, name) for name in detectors],
            ]
            evals = [evaluate_method(m, tuples, negatives, ev.iou_threshold, keep_retrievals=figure_ids, class_of=class_of) for m in methods]
            metrics[world] = {e.method: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in e.summary.items()} for e in evals}
            n_cand = 1 + negatives.groupby("tuple_id", observed=True).size()
            lo, hi = int(n_cand.min()), int(n_cand.max())
            sections.append(f"## {world}: {len(tuples)} queries, {lo if lo == hi else f'{lo}–{hi}'} candidates each\n\n{results_table(evals)}\n")
            for e in evals[:3]:
                sections.append(f"### {world} / {e.method} per medium\n\n{e.by_medium.round(4).to_markdown()}\n")
            sections.append(f"### {world} / ARD per base class\n\n{evals[0].by_class.round(4).to_markdown()}\n")
            curve = recall_curve({e.method: e.per_query for e in evals})
            # wide table (k, one column per method) for `dvc plots show`
            curve.pivot(index="k", columns="method", values="recall")[[e.method for e in evals]].reset_index().to_csv(
                tmp / f"recall_at_k_{world}.csv", index=False
            )
            recall_plot(curve, tmp / "figures" / f"recall_at_k_{world}.png", f"Recall@K, {world} ({len(tuples)} queries)")
            for e in evals:
                per_query_all.append(e.per_query.assign(method=e.method, world=world))
            for tid in figure_ids:
                q = tuples[tuples["tuple_id"] == tid].iloc[0]
                retrieval_figure(q, DATA, {e.method: e.retrievals[tid] for e in evals[:3:2]}, tmp / "figures" / f"retrieval_{world}_{tid}.png")
        ardm, abcm = metrics["test"]["ARD"], metrics["test"]["AbC"]
        checks = {
            "ARD Recall@10 >= 0.5": ardm["recall@10"] >= 0.5,
            "ARD Recall@10 >= 1.5 x AbC": ardm["recall@10"] >= 1.5 * abcm["recall@10"],
            "ARD Recall@5 >= ARD- Recall@5": ardm["recall@5"] >= metrics["test"]["ARD-"]["recall@5"],
        }
        metrics["bars"] = {k: bool(v) for k, v in checks.items()}
        report = "\n".join(
            ["# Attribution results\n", NOTE.format(iou=ev.iou_threshold, top_k=ev.identity_top_k, fit=fit_section[0]), "",
             "| bar | met |", "|---|---|", *[f"| {k} | {'yes' if v else 'NO'} |" for k, v in checks.items()], "",
             fit_section[1], *sections]
        )
        (tmp / "results.md").write_text(report)
        write_parquet_atomic(pd.concat(per_query_all, ignore_index=True), tmp / "per_query.parquet")
        tracking.write_json_atomic(metrics, tmp / "metrics.json")
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            tracking.log_artifact(f, artifact_path="evaluation" + ("/figures" if f.parent.name == "figures" else ""))
    flat = {f"identity_{key}.{name}": w[key] for name, w in weights.items() for key in ("weight", "grid")}
    for world in ("test", "world2"):
        for method, m in metrics[world].items():
            for k, v in m.items():
                if v is not None:
                    flat[f"{world}.{method}.{k}"] = v
    print(report)
    return flat


def fit_weights(cfg: Config, detectors: dict, size: int, identity: bool) -> tuple[dict, tuple[int, str]]:
    """The identity weight and pooling grid of each detector, fitted on a seeded subset of the val split.

    Returns ({name: {"weight", "grid", "val_recall@10": {"gxg": {weight: recall}}}}, (val queries, markdown section)).
    """
    from ardetect.evaluation.ard import SharedTrunkARD, fit_identity_weights

    ev = cfg.evaluate
    tuples = read_table(DATA / "tuples" / "tuples.parquet", TUPLE_COLUMNS, "tuples")
    val = _subset(tuples[tuples["split"] == "val"].reset_index(drop=True), ev.fit_queries, cfg.train_phase1.seed)
    if val.empty:
        raise ValueError("evaluate: the val split has no tuples to fit the identity weight on (tuples.split)")
    negatives = read_table(DATA / "tuples" / "negatives.parquet", NEGATIVE_COLUMNS, "negatives")
    negatives = negatives[negatives["tuple_id"].astype(str).isin(set(val["tuple_id"]))]
    trunk = SharedTrunkARD(detectors, DATA, size, batch=ev.candidate_batch, top_k=ev.identity_top_k, identity=identity, grids=ev.identity_grids)
    fitted = fit_identity_weights(trunk, list(detectors), val, negatives, ev.identity_weights, ev.iou_threshold, progress=True)
    out, rows = {}, []
    for name, (w, g, recalls) in fitted.items():
        by_grid: dict[str, dict[str, float]] = {}
        for (gg, ww), r in sorted(recalls.items()):
            by_grid.setdefault(f"{gg}x{gg}", {})[f"{ww:g}"] = r
        out[name] = {"weight": w, "grid": g, "val_recall@10": by_grid}
        for gg in ev.identity_grids:
            cells = [f"{recalls[(gg, k)]:.4f}" if (gg, k) in recalls else "=" for k in ev.identity_weights]
            rows.append(f"| {name} | {gg}x{gg} | {w:g}, {g}x{g} | " + " | ".join(cells) + " |")
    head = "| method | pooling grid | fitted w, grid | " + " | ".join(f"val R@10, w={k:g}" for k in ev.identity_weights) + " |"
    section = "\n".join([
        f"## Identity weight and pooling grid, fitted on {len(val)} val queries\n",
        "(w = 0 is the paper's score whatever the grid: it is scored once, on the first grid, and \"=\" marks the others.)\n",
        head, "|" + "---|" * (len(ev.identity_weights) + 3), *rows, "",
    ])
    return out, (len(val), section)


def main() -> None:
    run_stage("evaluate", build, lambda c: {"evaluate": c.evaluate.model_dump()})


if __name__ == "__main__":
    main()
