"""How the shortlist's embedding was chosen: on the val split, the share of queries whose training image is
among the N images nearest the query, for each pooling of the region map tried.

Candidates: max- or mean-pooled over g x g cells (g = 1: the whole image), raw or standardised with the
index's mean and spread, L2-normalised, an image's similarity being its best cell's; the query's
vector is the same pooling over the cells its box covers. The index keeps the winner (max, g = 1, raw).

  PYTHONPATH=src .venv/bin/python docs/shortlist_pooling.py --export models/export --data data --split val
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cells(region_map: np.ndarray, g: int, op: str) -> np.ndarray:
    """[N, D, h, w] -> [N, g*g, D]: each cell pooled."""
    n, d, h, w = region_map.shape
    x = region_map.reshape(n, d, g, h // g, g, w // g)
    x = x.max((3, 5)) if op == "max" else x.mean((3, 5))
    return x.reshape(n, d, g * g).transpose(0, 2, 1)


def box_vector(query_map: np.ndarray, box, size: int, op: str) -> np.ndarray:
    """[1, D, h, w] and a pixel xyxy box in the resized query -> [D] over the cells the box covers."""
    h = query_map.shape[-1]
    s = h / size
    x0, y0, x1, y1 = (float(v) for v in box)
    c0, r0 = int(np.floor(x0 * s)), int(np.floor(y0 * s))
    c1, r1 = max(int(np.ceil(x1 * s)), c0 + 1), max(int(np.ceil(y1 * s)), r0 + 1)
    reg = query_map[0, :, r0:r1, c0:c1].reshape(query_map.shape[1], -1)
    return reg.max(-1) if op == "max" else reg.mean(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("data"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--shortlists", type=int, nargs="+", default=[10, 25, 50])
    args = ap.parse_args()
    from ardetect.export.runtime import prepare_image_and_box
    from ardetect.images import open_image
    from ardetect.serve import CandidateIndex, build_index, load_model
    from ardetect.serve.index import pipeline_entries

    model = load_model(args.export)
    det = model.detector
    with tempfile.TemporaryDirectory() as tmp:
        entries, _ = pipeline_entries(args.data, args.split)
        build_index(model, args.data, entries, Path(tmp) / "index", progress=False)
        index = CandidateIndex(Path(tmp) / "index", model.fingerprint)
        region_map = np.asarray(index.region_map)
        tuples = pd.read_parquet(args.data / "tuples" / "tuples.parquet")
        queries = tuples[tuples["split"] == args.split].sort_values("tuple_id")
        encoded = []
        for _, q in queries.iterrows():
            img, qbox, _ = prepare_image_and_box(open_image(args.data / q["query_image"]), det.size, list(q["query_box"]))
            enc = det.encode_prepared_query(img, qbox, q["prompt"], q["concept_phrase"])
            encoded.append((enc["query_region_map"], qbox, index.position[Path(q["train_image"]).stem]))
    print(f"{len(encoded)} {args.split} queries, {len(index)} images; share of training images in the shortlist of N:")
    print("| pooling | cells | standardised | " + " | ".join(f"N={n}" for n in args.shortlists) + " |")
    print("|---|---|---|" + "---|" * len(args.shortlists))
    for op in ("max", "mean"):
        for g in (1, 2, 4, 8):
            for std in (False, True):
                c = cells(region_map, g, op)  # [N, G, D]
                flat = c.reshape(-1, c.shape[-1])
                mu, sd = (flat.mean(0), flat.std(0) + 1e-6) if std else (0.0, 1.0)
                cn = unit((c - mu) / sd)
                found = {n: [] for n in args.shortlists}
                for qmap, qbox, pos in encoded:
                    v = unit((box_vector(qmap, qbox, det.size, op) - mu) / sd)
                    order = np.argsort(-(cn @ v).max(1), kind="stable")
                    for n in found:
                        found[n].append(pos in order[:n])
                print(f"| {op} | {g}x{g} | {'yes' if std else 'no'} | " + " | ".join(f"{np.mean(found[n]):.3f}" for n in args.shortlists) + " |")


if __name__ == "__main__":
    main()
