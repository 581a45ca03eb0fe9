"""The candidate index: Recall@10 of shortlist + re-rank against scoring every candidate, and the cost per
query as the index grows, shortlist on and off.

1. Recall (the default world's test split): an index of the test split's training images (104: each test
   query's own training image and its 103 negatives, the evaluation's candidates). Each test query is
   scored against every image once; its Recall@K with a shortlist of N counts a hit only when its training
   image is among the N images nearest the query's embedding and ranks <= K among them by score, with the
   evaluation's rules (ties against it, IoU >= 0.5 with its box). The scorer scores each image on its own
   (tests/serve: a shortlist of every image is exactly the brute-force ranking), so re-ranking a shortlist
   gives these scores. With ``--per-query`` (the evaluate stage's ``reports/per_query.parquet``) it also
   compares each query's score of its training image and its rank with the evaluation's ``ARD`` row.
2. Cost: the same index tiled to 100, 1,000 and 10,000 images (repeated images, on disk, memory-mapped as
   the service reads them); the wall time of ``Attributor.attribute`` per query, shortlist of N on, and off
   (every image scored).

Run (after `make run`; an export folder from the export stage or `ard export`):
  PYTHONPATH=src .venv/bin/python bench/bench_index_cost.py --export models/export --data data \
      --per-query reports/per_query.parquet --plot docs/serve_cost.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def tiled_index(src: Path, out: Path, size: int) -> Path:
    """An index folder of ``size`` images: ``src``'s images repeated (ids suffixed -r<k>)."""
    meta = json.loads((src / "index.json").read_text())
    n = meta["count"]
    rows = np.arange(size) % n
    out.mkdir(parents=True, exist_ok=True)
    for name in dict.fromkeys(["features", "region_map", *(meta.get("arrays") or []), "embeddings"]):  # every array the index keeps
        a = np.load(src / f"{name}.npy", mmap_mode="r")
        dst = np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=a.dtype, shape=(size, *a.shape[1:]))
        for s in range(0, size, 1024):
            dst[s : s + 1024] = a[rows[s : s + 1024]]
        dst.flush()
        del dst
    table = pd.read_parquet(src / "images.parquet").iloc[rows].reset_index(drop=True)
    table["id"] = [f"{i}-r{k // n}" for k, i in enumerate(table["id"])]
    table.to_parquet(out / "images.parquet", index=False)
    (out / "index.json").write_text(json.dumps({**meta, "count": size}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, required=True, help="export folder")
    ap.add_argument("--data", type=Path, default=Path("data"), help="the pipeline's data root")
    ap.add_argument("--index", type=Path, default=None, help="an index of the test split (built here when absent)")
    ap.add_argument("--per-query", type=Path, default=None, help="reports/per_query.parquet, to compare with the evaluation")
    ap.add_argument("--shortlists", type=int, nargs="+", default=[10, 25, 50, 100])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--cost-shortlist", type=int, default=50, help="N of the cost curve's shortlist")
    ap.add_argument("--cost-queries", type=int, default=5, help="queries timed per point (1 for the biggest brute-force point)")
    ap.add_argument("--max-queries", type=int, default=None, help="recall on the first test queries only")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: onnxruntime's)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for the tiled indexes (default: a temp folder)")
    ap.add_argument("--plot", type=Path, default=None, help="write the cost curve here (PNG)")
    ap.add_argument("--json", type=Path, default=Path("bench/out/index_cost.json"))
    args = ap.parse_args()

    import torch
    from torchvision.ops import box_iou

    from ardetect.evaluation.metrics import query_metrics, rank_of_positive
    from ardetect.images import open_image
    from ardetect.serve import Attributor, CandidateIndex, build_index, load_model
    from ardetect.serve.index import pipeline_entries

    model = load_model(args.export, threads=args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="ard-index-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    index_dir = args.index or work / "test_index"
    if not (index_dir / "index.json").is_file():
        entries, examples = pipeline_entries(args.data, "test")
        build_index(model, args.data, entries, index_dir, examples=examples, source="pipeline:test")
    index = CandidateIndex(index_dir, model.fingerprint)
    att = Attributor(model, index, shortlist=len(index))
    print(f"model {args.export} on {sorted(set(model.providers.values()))}; index of {len(index)} test-split training images")

    # 1. recall: every test query scored against every image once
    tuples = pd.read_parquet(args.data / "tuples" / "tuples.parquet")
    test = tuples[tuples["split"] == "test"].sort_values("tuple_id")
    if args.max_queries:
        test = test.head(args.max_queries)
    ns = sorted(set(args.shortlists))
    hits = {n: [] for n in ["all", *ns]}
    rows = []
    t0 = time.perf_counter()
    for _, q in test.iterrows():
        img = open_image(args.data / q["query_image"])
        query, emb = att.encode(img, [float(v) for v in q["query_box"]], q["prompt"], q["concept_phrase"])
        out = model.detector.score(index.candidates(np.arange(len(index))), query, index.sizes)
        scores = out["scores"].astype(np.float64)
        pos = index.position[Path(q["train_image"]).stem]
        iou = float(box_iou(torch.as_tensor(out["boxes"][pos : pos + 1], dtype=torch.float32),
                            torch.as_tensor([list(q["train_box"])], dtype=torch.float32))[0, 0])
        others = np.delete(scores, pos)
        full = query_metrics(rank_of_positive(scores[pos], others), iou)
        hits["all"].append(full["recall@10"])
        order_sim = np.argsort(-(index.embeddings @ emb[0]), kind="stable")
        for n in ns:
            short = set(order_sim[:n].tolist())
            if pos in short:
                rest = np.array([scores[i] for i in short if i != pos])
                hits[n].append(query_metrics(rank_of_positive(scores[pos], rest), iou)["recall@10"])
            else:
                hits[n].append(0.0)
        rows.append({"tuple_id": q["tuple_id"], "score": float(scores[pos]), "rank": full["rank"],
                     "in_shortlist": {n: bool(pos in set(order_sim[:n].tolist())) for n in ns}})
    recall_s = time.perf_counter() - t0
    recall = {str(n): float(np.mean(v)) for n, v in hits.items()}
    coverage = {str(n): float(np.mean([r["in_shortlist"][n] for r in rows])) for n in ns}
    print(f"\nRecall@10 on {len(test)} test queries ({recall_s:.0f} s):")
    print("| shortlist N | training image in the shortlist | Recall@10 |\n|---|---|---|")
    for n in ns:
        print(f"| {n} | {coverage[str(n)]:.3f} | {recall[str(n)]:.3f} |")
    print(f"| every candidate ({len(index)}) | 1.000 | {recall['all']:.3f} |")
    agreement = None
    if args.per_query is not None:
        ev = pd.read_parquet(args.per_query)
        ev = ev[(ev["method"] == "ARD") & (ev["world"] == "test")].set_index("tuple_id")
        mine = pd.DataFrame(rows).set_index("tuple_id")
        both = mine.join(ev[["score", "rank"]].add_suffix("_eval"), how="inner")
        diff = float((both["score"] - both["score_eval"]).abs().max())
        same_rank = int((both["rank"] == both["rank_eval"]).sum())
        agreement = {"queries": len(both), "score_max_abs_diff": diff, "same_rank": same_rank}
        print(f"\nagainst the evaluation's ARD row: {len(both)} queries, largest score difference {diff:.2e}, "
              f"same rank {same_rank}/{len(both)}")

    # 2. cost per query against the index size
    def per_query(a: Attributor, queries: pd.DataFrame, shortlist: int | None) -> float:
        times = []
        for _, q in queries.iterrows():
            img = open_image(args.data / q["query_image"])
            t = time.perf_counter()
            a.attribute(img, [float(v) for v in q["query_box"]], q["prompt"], q["concept_phrase"], top_k=10, shortlist=shortlist)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    cost = []
    warm = test.head(1)
    per_query(att, warm, len(index))
    for size in args.sizes:
        folder = tiled_index(index_dir, work / f"tiled_{size}", size)
        big = CandidateIndex(folder, model.fingerprint)
        a = Attributor(model, big, shortlist=args.cost_shortlist)
        qs = test.head(args.cost_queries)
        on = per_query(a, qs, args.cost_shortlist)
        brute_qs = qs if size <= 1000 else test.head(1)
        off = per_query(a, brute_qs, size)
        _, emb = a.encode(open_image(args.data / qs.iloc[0]["query_image"]), list(qs.iloc[0]["query_box"]), qs.iloc[0]["prompt"],
                          qs.iloc[0]["concept_phrase"])
        t = time.perf_counter()
        for _ in range(20):
            big.shortlist(emb, args.cost_shortlist)
        search_ms = (time.perf_counter() - t) / 20 * 1e3
        cost.append({"images": size, "shortlist_ms": on * 1e3, "every_image_ms": off * 1e3, "search_ms": search_ms,
                     "queries_timed": [len(qs), len(brute_qs)]})
        print(f"{size:>6} images: shortlist {args.cost_shortlist} {on * 1e3:8.0f} ms/query (faiss search {search_ms:.2f} ms), "
              f"every image {off * 1e3:9.0f} ms/query")
        del big, a
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\n| index images | shortlist {args.cost_shortlist}: ms/query | every image scored: ms/query | ratio |\n|---|---|---|---|")
    for c in cost:
        print(f"| {c['images']:,} | {c['shortlist_ms']:,.0f} | {c['every_image_ms']:,.0f} | {c['every_image_ms'] / c['shortlist_ms']:.1f}x |")
    result = {"recall_at_10": recall, "training_image_in_shortlist": coverage, "queries": len(test), "agreement": agreement,
              "cost": cost, "cost_shortlist": args.cost_shortlist, "providers": sorted(set(model.providers.values()))}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        x = [c["images"] for c in cost]
        ax.loglog(x, [c["every_image_ms"] / 1e3 for c in cost], "o-", label="every image scored")
        ax.loglog(x, [c["shortlist_ms"] / 1e3 for c in cost], "s-", label=f"shortlist of {args.cost_shortlist} + re-rank")
        ax.set_xlabel("images in the index")
        ax.set_ylabel("seconds per query (median)")
        ax.set_title("Cost of one attribution query (CPU, onnxruntime)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
