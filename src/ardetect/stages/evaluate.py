"""Stage ``evaluate``: ARD, ARD− (phase 1 only), both AbC rows, chance and the class oracles on the same test tuples.

Also on the second world (unseen identities). Every metric comes with a 95% bootstrap
interval over queries, and each bar is judged by a paired bootstrap over the same
queries. Writes ``reports/``: ``results.md`` (the report a person reads),
``metrics.json`` (the headline figures, a DVC metric), ``details.json`` (every metric
with its interval, the identity fit, the breakdowns), ``per_query.parquet``,
``ard_scores.parquet`` (the ARD row's score and box for every test query and candidate,
which the export's parity is held against),
Recall@K plot data and figures; and logs them all to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ardetect import tracking
from ardetect.config import Config
from ardetect.data.schema import NEGATIVE_COLUMNS, OBJECT_COLUMNS, TUPLE_COLUMNS, drop_excluded, read_table, write_parquet_atomic
from ardetect.digest import file_sha256
from ardetect.stages.common import DATA, EXCLUSIONS, atomic_dir, run_stage

OUT = Path("reports")
PHASE2 = Path("models/phase2/model.pt")
KEPT = OUT / ".evaluate-work"  # the detector's results on the queries scored so far: a killed run goes on from them;
# a finished run's atomic_dir replaces the whole of OUT, so the folder goes with the old one
SCORES = OUT / "ard_scores.parquet"  # the ARD row's score and box for every (test query, candidate)
PAPER = " paper score"
ABC_ROWS = {"AbC": Path("models/abc/abc.pt"), "AbC (ARD backbone)": Path("models/abc_ard/abc.pt")}
HEADLINE = ("recall@1", "recall@5", "recall@10", "box_accuracy")
HEADLINE_METHODS = ("ARD", "ARD-", "AbC", "AbC (ARD backbone)", "chance", "ARD paper score")
METRIC_COLUMNS = {  # summary key -> per-query column
    "box_accuracy": "box_correct", "inverse_rank@5": "inverse_rank@5", "inverse_rank@10": "inverse_rank@10",
    "recall@1": "recall@1", "recall@5": "recall@5", "recall@10": "recall@10", "class_rprecision": "class_rprecision",
}
PAPER_RECIPE_COMMAND = (
    "dvc exp run -n paper-recipe -S train_phase1.loss.weight_align=0 -S train_phase1.k_negatives=0 -S train_phase2.lambda_rank=0 "
    "-S 'evaluate.identity_weights=[0]' "
    "-S train_phase1.validation.score=paper -S train_phase2.validation.score=paper"
)

ROWS = """\
- **ARD**: the detector after both phases (phase 1, then the adapters F and F~ on positives with k negatives), scored
  with the identity re-ranking (ours): of each candidate's {top_k} most probable boxes, the one with the best
  probability x exp(w (cos - 1)) wins, cos being the cosine between the query region's descriptor and the same pooling
  of the candidate's region at the box, on g x g cells. w and g are fitted on {fit} val queries (never the test tuples).
- **ARD-**: the same detector after phase 1 only (the paper's ablation), re-ranked the same way with its own w and g.
- **ARD paper score**, **ARD- paper score**: the same two detectors scored as the paper scores them: each candidate's
  most probable box and its probability (w = 0).
- **AbC**: Attribution by Customization (image level): a CNN trained self-supervised on the training split at the
  detector's resolution, with views that keep colour and texture, its feature map max-pooled, two affine heads trained
  on the training tuples, calibrated soft influence. Image-level methods predict no region: no IoU gate, box accuracy N/A.
- **AbC (ARD backbone)**: the control row: AbC's heads and calibration on ARD's trained phase-1 image features
  (`abc.ard_features`: the region map ARD compares regions with, or the backbone maps), max-pooled over the whole
  image and standardised, image level. It shows how much of ARD's lead is its features, not its regions.
- **chance**: uniformly random scores (seeded), image level: the floor.
- **class oracle**, **class + size oracle**: ceilings, not methods: they read every object's base class from the
  world's `objects` table. The class oracle ranks the candidates holding an object of the query's base class first
  (image level), as a detector that grounds the class perfectly and knows nothing more would; the class + size oracle
  ranks them by their largest such object's area and answers with its box. Ties go in a seeded random order. Where
  training images hold objects of the class as distractors, these bound what a score that reads classes can reach.
- **ARD (paper recipe)** is not in this run (a second training of both phases does not fit the default time budget):
  `{paper}` trains it (phase 1 on positives only and without the region contrast, phase 2 without the ranking loss), chooses each phase's
  checkpoint by the paper's score and scores it the paper's way; its ARD rows are that recipe's. The README gives
  its measured numbers.
"""

NOTE = (
    "Recall@K and InverseRank@K follow the ARD paper (sec. 5.1): the positive's rank among its own training image "
    "and every negative (all other concepts' training images in the split), ties counted against the positive, and "
    "0 when the predicted region's IoU with R_X is below {iou}. class_rprecision is our diagnostic, not the paper's: "
    "with n the number of candidates of the query's base class (its own image included), the share of that class "
    "among the n best scored candidates; 1 = every image of the class ranked first, chance = n / candidates. "
    "Each figure is the mean over queries with its 95% percentile bootstrap interval over queries "
    "({resamples} resamples) in brackets."
)


def _subset(tuples: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    if n is None or n >= len(tuples):
        return tuples
    rng = np.random.default_rng(seed)
    return tuples.iloc[np.sort(rng.choice(len(tuples), size=n, replace=False))]


@dataclass
class Bar:
    """An acceptance bar and how it is judged."""

    name: str
    key: str  # short name in metrics.json
    method: str  # the per-query column's method
    metric: str  # per-query column
    threshold: float | None = None  # absolute bar: point estimate >= threshold
    against: str | None = None  # relative bar: method - scale * against, judged by a paired interval
    scale: float = 1.0


def expected_chance(candidates: pd.Series, k: int) -> np.ndarray:
    """Per query, the expected Recall@k of a uniformly random ranking of its candidates: min(k, C) / C."""
    c = candidates.to_numpy(dtype=float)
    return np.minimum(k, c) / c


def judge(bars: list[Bar], per_query: dict[str, pd.DataFrame], chance_ref: dict[str, np.ndarray], seed: int) -> list[dict]:
    """Each bar's estimate, interval and verdict (see ``Bar``); ``chance_ref`` gives analytic per-query
    references (``against`` names starting with "expected chance")."""
    from ardetect.evaluation.intervals import mean_interval, paired_difference

    out = []
    for bar in bars:
        a = per_query[bar.method][bar.metric].to_numpy(dtype=float)
        row = {"bar": bar.name, "key": bar.key, "method": bar.method, "metric": bar.metric}
        a_name, b_name = f"{bar.method}/{bar.metric}", f"{bar.against}/{bar.metric}"
        if bar.against is None:
            est = mean_interval(a, seed=seed, name=a_name)
            row.update(estimate=est.as_dict(), met=bool(est.value >= bar.threshold),
                       rule=f"point estimate >= {bar.threshold:g}")
        elif bar.against in chance_ref:
            # an analytic reference is a fixed number, not a second method's noisy outcome:
            # the bar is absolute (the point estimate decides); the interval is reported beside it
            b = chance_ref[bar.against]
            diff = paired_difference(a, b, scale=bar.scale, seed=seed, names=(a_name, b_name))
            scale = "" if bar.scale == 1 else f"{bar.scale:g} x "
            row.update(against=bar.against, difference=diff.as_dict(), met=bool(diff.value >= 0),
                       rule=f"absolute: point estimate of {bar.method} - {scale}{bar.against} >= 0 "
                            f"(interval above 0: {'yes' if diff.excludes_zero_above() else 'no'})",
                       estimate=mean_interval(a, seed=seed, name=a_name).as_dict())
        else:
            b = per_query[bar.against][bar.metric].to_numpy(dtype=float)
            diff = paired_difference(a, b, scale=bar.scale, seed=seed, names=(a_name, b_name))
            scale = "" if bar.scale == 1 else f"{bar.scale:g} x "
            row.update(against=bar.against, difference=diff.as_dict(), met=diff.excludes_zero_above(),
                       rule=f"paired bootstrap of {bar.method} - {scale}{bar.against}: the 95% interval lies above 0",
                       estimate=mean_interval(a, seed=seed, name=a_name).as_dict())
        out.append(row)
    return out


def intervals_of(evaluation, seed: int) -> dict[str, dict[str, float]]:
    """{metric: {value, low, high}} of an ``Evaluation``'s per-query values (metrics it lacks are left out)."""
    from ardetect.evaluation.intervals import mean_interval

    out = {}
    for key, col in METRIC_COLUMNS.items():
        if col not in evaluation.per_query:
            continue
        v = evaluation.per_query[col].to_numpy(dtype=float)
        if np.isnan(v).all():
            continue
        out[key] = mean_interval(v, seed=seed, name=f"{evaluation.method}/{key}").as_dict()
    return out


def table(rows: dict[str, dict], region: dict[str, bool], queries: int) -> str:
    keys = ("box_accuracy", "recall@1", "recall@5", "recall@10", "inverse_rank@5", "inverse_rank@10", "class_rprecision")
    head = "| method | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for method, ci in rows.items():
        cells = []
        for k in keys:
            if k not in ci or (k == "box_accuracy" and not region[method]):
                cells.append("N/A")
            else:
                c = ci[k]
                cells.append(f"{c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{queries} queries each."


def bar_table(judged: list[dict]) -> str:
    lines = ["| bar | estimate [95% interval] | difference [95% interval] | met | rule |", "|---|---|---|---|---|"]
    for r in judged:
        e = r["estimate"]
        est = f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"
        d = r.get("difference")
        diff = "—" if d is None else f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
        lines.append(f"| {r['bar']} | {est} | {diff} | {'yes' if r['met'] else 'NO'} | {r['rule']} |")
    return "\n".join(lines)


def build(cfg: Config) -> dict:
    from ardetect.evaluation.abc import AbCMethod, load_abc
    from ardetect.evaluation.ard import SharedTrunkARD
    from ardetect.evaluation.figures import recall_curve, recall_plot, retrieval_figure
    from ardetect.evaluation.harness import ChanceMethod, Recording, evaluate_method
    from ardetect.evaluation.intervals import N_RESAMPLES
    from ardetect.evaluation.oracle import NAMES as ORACLES
    from ardetect.evaluation.oracle import ceiling_sentence, class_oracles
    from ardetect.devices import resolve_device
    from ardetect.train.phases import image_size_of, load_model

    ev = cfg.evaluate
    seed = cfg.train_phase1.seed
    device = resolve_device(cfg.model.device)
    ard = load_model(PHASE2).to(device)
    ard_minus = load_model(Path("models/phase1/model.pt")).to(device)
    abcs = {name: load_abc(path) for name, path in ABC_ROWS.items()}
    size = image_size_of(ard)
    worlds = {
        "test": (DATA / "tuples" / "tuples.parquet", DATA / "tuples" / "negatives.parquet"),
        "world2": (DATA / "world2" / "tuples.parquet", DATA / "world2" / "negatives.parquet"),
    }
    objects_of = {"test": DATA / "exemplars" / "objects.parquet", "world2": DATA / "world2" / "objects.parquet"}  # the candidates' objects
    oracles = {  # read and checked before anything is scored
        world: class_oracles(read_table(objects_of[world], OBJECT_COLUMNS, f"{world} objects"), seed=seed, source=str(objects_of[world]),
                             images={*read_table(t, TUPLE_COLUMNS, world)["train_image"].unique(),
                                     *read_table(n, NEGATIVE_COLUMNS, f"{world} negatives")["neg_image"].unique()})
        for world, (t, n) in worlds.items()
    }
    details: dict = {"resamples": N_RESAMPLES}
    headline: dict = {}
    sections, per_query_all = [], []
    detectors = {"ARD": ard, "ARD-": ard_minus}
    identity = max(ev.identity_weights) > 0
    weights, fit_section = fit_weights(
        cfg, detectors, size, identity, drop_excluded(read_table(worlds["test"][0], TUPLE_COLUMNS, "tuples"), EXCLUSIONS),
        read_table(worlds["test"][1], NEGATIVE_COLUMNS, "negatives"), DATA,
    )
    details["identity_fit"] = weights
    with atomic_dir(OUT) as tmp:
        for world, (tpath, npath) in worlds.items():
            tuples = read_table(tpath, TUPLE_COLUMNS, world)
            class_of = dict(zip(tuples["train_image"].astype(str), tuples["base_class"].astype(str)))
            if world == "test":  # the validated world: its memorisation events are not queries (world2 is drawn apart)
                tuples = drop_excluded(tuples, EXCLUSIONS)
            tuples = _subset(tuples[tuples["split"] == "test"].reset_index(drop=True), ev.max_queries, seed)
            negatives = read_table(npath, NEGATIVE_COLUMNS, f"{world} negatives")
            negatives = negatives[negatives["tuple_id"].astype(str).isin(set(tuples["tuple_id"]))]
            figure_ids = list(tuples["tuple_id"].iloc[:: max(1, len(tuples) // max(ev.figure_queries, 1))][: ev.figure_queries])
            # ARD and ARD- differ only in the adapters: one pass of the detector scores both
            grids = sorted({w["grid"] for w in weights.values()})
            classes = any(w["class_weight"] > 0 for w in weights.values())
            shared = SharedTrunkARD(detectors, DATA, size, batch=ev.candidate_batch, top_k=ev.identity_top_k, identity=identity, grids=grids,
                                    classes=classes)
            methods = [
                *shared.methods({name: (w["weight"], w["grid"], w["class_weight"]) for name, w in weights.items()}),
                *[AbCMethod(model, cal, DATA, abc_size, name=name) for name, (model, cal, abc_size) in abcs.items()],
                ChanceMethod(seed=seed),
                *[shared.method(name + PAPER, name) for name in detectors],
                *oracles[world],
            ]
            shared.prefetch(tuples, negatives, ev.workers or None, keep=KEPT)
            if world == "test":  # the ARD row's every score and box: what the export's parity is held against
                i = [m.name for m in methods].index("ARD")
                recorded = methods[i] = Recording(methods[i])
            evals = [evaluate_method(m, tuples, negatives, ev.iou_threshold, keep_retrievals=figure_ids, class_of=class_of) for m in methods]
            by_name = {e.method: e for e in evals}
            cis = {e.method: intervals_of(e, seed) for e in evals}
            n_cand = 1 + negatives.groupby("tuple_id", observed=True).size()
            lo, hi = int(n_cand.min()), int(n_cand.max())
            details[world] = {"queries": len(tuples), "candidates": [lo, hi], "methods": cis,
                              "mean_rank": {e.method: e.summary["mean_rank"] for e in evals}}
            headline[world] = {
                m: {k: (None if k not in cis[m] else round(cis[m][k]["value"], 4)) for k in HEADLINE
                    if k != "box_accuracy" or by_name[m].region_level}
                for m in HEADLINE_METHODS if m in cis
            }
            cand = f"{lo}" if lo == hi else f"{lo}–{hi}"
            sections.append(f"## {world}: {len(tuples)} queries, {cand} candidates each\n\n"
                            f"{table(cis, {e.method: e.region_level for e in evals}, len(tuples))}\n")
            for e in evals[:4]:
                sections.append(f"### {world} / {e.method} per medium\n\n{e.by_medium.round(4).to_markdown()}\n")
            sections.append(f"### {world} / ARD per base class\n\n{evals[0].by_class.round(4).to_markdown()}\n")
            curve = recall_curve({e.method: e.per_query for e in evals})
            # wide table (k, one column per method) for `dvc plots show`
            curve.pivot(index="k", columns="method", values="recall")[[e.method for e in evals]].reset_index().to_csv(
                tmp / f"recall_at_k_{world}.csv", index=False
            )
            recall_plot(curve, tmp / "figures" / f"recall_at_k_{world}.png", f"Recall@K, {world} ({len(tuples)} queries)",
                        references=("chance", *ORACLES))
            for e in evals:
                per_query_all.append(e.per_query.assign(method=e.method, world=world))
            for tid in figure_ids:
                q = tuples[tuples["tuple_id"] == tid].iloc[0]
                shown = {name: by_name[name].retrievals[tid] for name in ("ARD", "AbC")}
                retrieval_figure(q, DATA, shown, tmp / "figures" / f"retrieval_{world}_{tid}.png")
            if world == "test":
                test_pq = {e.method: e.per_query for e in evals}
                write_parquet_atomic(recorded.frame(), tmp / SCORES.name)
                details["ard_scores"] = {"file": SCORES.name, "row": recorded.name, "phase2_sha256": file_sha256(PHASE2),
                                         "identity_weight": weights[recorded.name]["weight"], "grid": weights[recorded.name]["grid"],
                                         "class_weight": weights[recorded.name]["class_weight"], "top_k": ev.identity_top_k}
                test_cands = tuples["tuple_id"].map(n_cand)
        better_abc = max(ABC_ROWS, key=lambda m: (headline["test"][m]["recall@10"], m == "AbC"))
        chance_ref = {"expected chance": expected_chance(test_cands, 10)}
        bars = [
            Bar("ARD Recall@10 >= 0.5", "ARD R@10 >= 0.5", "ARD", "recall@10", threshold=0.5),
            Bar(f"ARD Recall@10 >= 1.5 x AbC (the better AbC row: {better_abc})", "ARD R@10 >= 1.5 x AbC", "ARD", "recall@10",
                against=better_abc, scale=1.5),
            Bar("ARD Recall@5 >= ARD- Recall@5", "ARD R@5 >= ARD- R@5", "ARD", "recall@5", against="ARD-"),
            Bar(f"better AbC row ({better_abc}) Recall@10 >= 2 x chance", "AbC R@10 >= 2 x chance", better_abc, "recall@10",
                against="expected chance", scale=2.0),
            # a detector that grounds: the paper's own score at the paper's COCO-type figure, and ARD as shipped
            Bar("ARD paper score Recall@10 >= 0.73", "ARD paper R@10 >= 0.73", "ARD paper score", "recall@10", threshold=0.73),
            Bar("ARD paper score class R-precision >= 0.8", "ARD paper class R-prec >= 0.8", "ARD paper score", "class_rprecision",
                threshold=0.8),
            Bar("ARD paper score box accuracy >= 0.9", "ARD paper box acc >= 0.9", "ARD paper score", "box_correct", threshold=0.9),
            Bar("ARD Recall@1 >= 0.3", "ARD R@1 >= 0.3", "ARD", "recall@1", threshold=0.3),
            Bar("ARD Recall@10 >= 0.85", "ARD R@10 >= 0.85", "ARD", "recall@10", threshold=0.85),
        ]
        judged = judge(bars, test_pq, chance_ref, seed)
        details["bars"] = judged
        headline["bars"] = {r["key"]: r["met"] for r in judged}
        report = "\n".join([
            "# Attribution results\n",
            NOTE.format(iou=ev.iou_threshold, resamples=N_RESAMPLES), "",
            "## Rows\n", ROWS.format(top_k=ev.identity_top_k, fit=fit_section[0], paper=PAPER_RECIPE_COMMAND),
            "## Bars (test split)\n",
            "An absolute bar is met when its point estimate meets it. A bar between two methods is met only when the 95% "
            "paired bootstrap interval of the difference (the same resampled queries for both) lies above zero. "
            "\"expected chance\" is each query's min(10, C) / C for its C candidates: the Recall@10 of a random ranking, "
            "without the noise of one draw; a fixed number, so a bar against it is absolute (its point estimate decides) "
            "and the interval of the difference is shown beside it.\n",
            bar_table(judged), "",
            ceiling_sentence({m: {k: v["value"] for k, v in ci.items()} for m, ci in details["test"]["methods"].items()},
                             "ARD paper score") + "\n",
            "Checkpoints: each phase keeps the epoch with the best val Recall@5 of the score the model is read with "
            "(the re-ranked score at the best identity weight and pooling grid of the evaluation's grids, on a fixed val "
            "subset), not the paper's score alone.\n",
            fit_section[1], *sections,
        ])
        (tmp / "results.md").write_text(report)
        write_parquet_atomic(pd.concat(per_query_all, ignore_index=True), tmp / "per_query.parquet")
        tracking.write_json_atomic(headline, tmp / "metrics.json")
        tracking.write_json_atomic(details, tmp / "details.json")
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            tracking.log_artifact(f, artifact_path="evaluation" + ("/figures" if f.parent.name == "figures" else ""))
    flat = {f"identity_{key}.{name}": w[key] for name, w in weights.items() for key in ("weight", "grid")}
    for world in ("test", "world2"):
        for method, ci in details[world]["methods"].items():
            for k, v in ci.items():
                flat[f"{world}.{method}.{k}"] = v["value"]
                flat[f"{world}.{method}.{k}.low"] = v["low"]
                flat[f"{world}.{method}.{k}.high"] = v["high"]
    flat.update({f"bar.{i}": float(r["met"]) for i, r in enumerate(judged)})
    print(report)
    return flat


def fit_weights(
    cfg: Config, detectors: dict, size: int, identity: bool, tuples: pd.DataFrame, negatives: pd.DataFrame, data_root: Path,
    keep: Path | None = KEPT,
) -> tuple[dict, tuple[int, str]]:
    """The identity weight, pooling grid and class weight of each detector, fitted on a seeded subset of
    the val split of ``tuples`` (the test split is dropped before anything is read). The class weight
    is fitted only when the detectors have a region classifier (else it is 0).

    The mean of ``evaluate.fit_metrics`` on those queries decides (ties: the coarser grid, the smaller
    weight, the smaller class weight).

    ``keep``: the folder of the scores kept for a killed run to go on from (None: nothing kept).

    Returns ({name: {"weight", "grid", "class_weight", "fit_metrics", "val_fit": {"gxg" or "gxg, a=A": {weight: that mean}},
    "val_recall@10": {same keys: Recall@10}}}, (val queries, markdown section)).
    """
    from ardetect.evaluation.ard import SharedTrunkARD, fit_identity_weights

    ev = cfg.evaluate
    val = _subset(tuples[tuples["split"] == "val"].reset_index(drop=True), ev.fit_queries, cfg.train_phase1.seed)
    if val.empty:
        raise ValueError("evaluate: the val split has no tuples to fit the identity weight on (tuples.split)")
    negatives = negatives[negatives["tuple_id"].astype(str).isin(set(val["tuple_id"]))]
    classes = identity and all(d.region_classifier is not None for d in detectors.values())
    class_weights = ev.class_weights if classes else [0.0]
    trunk = SharedTrunkARD(detectors, data_root, size, batch=ev.candidate_batch, top_k=ev.identity_top_k, identity=identity, grids=ev.identity_grids,
                           classes=classes and max(class_weights) > 0)
    summaries: dict = {}
    fitted = fit_identity_weights(trunk, list(detectors), val, negatives, ev.identity_weights, ev.iou_threshold, progress=True,
                                  metric=ev.fit_metrics, summaries=summaries, workers=ev.workers or None, class_weights=class_weights,
                                  keep=keep)
    label = lambda gg, aa: f"{gg}x{gg}" if aa == 0 else f"{gg}x{gg}, a={aa:g}"  # noqa: E731
    out, rows = {}, []
    for name, (w, g, a, recalls) in fitted.items():
        by_grid: dict[str, dict[str, float]] = {}
        r10: dict[str, dict[str, float]] = {}
        for (gg, ww, aa), r in sorted(recalls.items()):
            by_grid.setdefault(label(gg, aa), {})[f"{ww:g}"] = r
            r10.setdefault(label(gg, aa), {})[f"{ww:g}"] = float(summaries[(name, gg, ww, aa)]["recall@10"])
        out[name] = {"weight": w, "grid": g, "class_weight": a, "fit_metrics": list(ev.fit_metrics), "val_fit": by_grid, "val_recall@10": r10}
        for gg in ev.identity_grids:
            for aa in class_weights:
                cells = [f"{recalls[(gg, k, aa)]:.4f}" if (gg, k, aa) in recalls else "=" for k in ev.identity_weights]
                rows.append(f"| {name} | {label(gg, aa)} | {w:g}, {g}x{g}, a={a:g} | " + " | ".join(cells) + " |")
    head = "| method | pooling grid, class weight a | fitted w, grid, a | " + " | ".join(f"val fit, w={k:g}" for k in ev.identity_weights) + " |"
    section = "\n".join([
        f"## Identity weight, pooling grid and class weight, fitted on {len(val)} val queries\n",
        f"Each cell is the mean of {', '.join(ev.fit_metrics)} on those queries; the best decides (ties: the coarser grid, the smaller "
        "weight, the smaller a). details.json also gives each cell's Recall@10.\n",
        "(w = 0 is the paper's score whatever the grid when a = 0: it is scored once, on the first grid, and \"=\" marks the others; "
        "a is the exponent of the region classifier's class match.)\n",
        head, "|" + "---|" * (len(ev.identity_weights) + 3), *rows, "",
    ])
    return out, (len(val), section)


def main() -> None:
    run_stage("evaluate", build, lambda c: {"evaluate": c.evaluate.model_dump()})


if __name__ == "__main__":
    main()
