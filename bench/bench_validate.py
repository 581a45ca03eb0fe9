"""Scale benchmark of the quality gate (``validate_tuples``): seconds per 100,000 tuples and how they grow.

Two parts, measured in one run:

1. **Per file, real.** The gate opens each distinct image file once (decode, size, pixel
   spread, the spread inside each box, perceptual hash) and each label map once (mask boxes,
   the claimed box's IoU and hull share). Both are timed here on the images of a small
   rendered world (160 px, as the default world), in this one process: milliseconds per file.
2. **Per row, synthetic.** ``validate_tuples`` on N synthetic tuples (default 100,000 and
   1,000,000: 3 queries per concept, split 80/10/10 by concept, ``--negatives`` negatives per
   tuple instead of the whole split, whose count grows with the square of the world), with
   their exemplars, generated and objects tables (a concept object and a distractor per image):
   every derived table, the records' agreement, the near-duplicate search and every
   expectation. The file reads are replaced by answers made from the path (a fixed random
   perceptual hash per path, fixed pixel spreads, a label map that agrees with the objects
   table) and counted, which checks that each distinct path is read exactly once.

Printed: part 1 per file; for each N the seconds, seconds per 100,000 tuples, files read, and
the growth of the per-100,000 time against the smallest N; and the total projected with the
real file reads of part 2's distinct files (part 1 x files, one core; the stage spreads them
over the cores).

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_validate.py [--sizes 100000 1000000] [--negatives 10]``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ardetect.config import SplitConfig, ValidateConfig, WorldConfig  # noqa: E402
from ardetect.data import quality  # noqa: E402
from ardetect.data.content import Claim, ImageProbe, label_map_claims, probe_image  # noqa: E402
from ardetect.data.schema import NEGATIVE_COLUMNS  # noqa: E402
from ardetect.data.tuples import assign_splits, build_tuples  # noqa: E402
from ardetect.data.world import WORLD_CLASSES, make_exemplars, make_generated  # noqa: E402

SIZE = 160
QUERY_BOX, TRAIN_BOX, DISTRACTOR_BOX = [30.0, 20.0, 110.0, 120.0], [40.0, 30.0, 130.0, 140.0], [0.0, 0.0, 20.0, 20.0]
AREA, DISTRACTOR_AREA = 4000, 300


def per_file_costs(n_concepts: int = 100) -> tuple[float, float, int]:
    """(ms per image probe, ms per label-map read, files) on a freshly rendered world."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = WorldConfig(n_concepts=n_concepts, queries_per_concept=3, workers=1)
        ex, ex_obj = make_exemplars(cfg, root / "exemplars", root)
        gen, gen_obj = make_generated(cfg, ex, root / "generated", root)
        t = build_tuples(ex, gen, assign_splits(ex, SplitConfig(), 0))
        images = [(root / i, [b]) for i, b in zip(t["query_image"], t["query_box"])]
        images += [(root / i, [b]) for i, b in zip(ex["image"], ex["box"])]
        concept = pd.concat([ex_obj, gen_obj])
        concept = concept[concept["role"] == "concept"]
        box_of = dict(zip(t["query_image"], t["query_box"])) | dict(zip(ex["image"], ex["box"]))
        maps = [(root / m, [(int(k), box_of[i])]) for i, m, k in zip(concept["image"], concept["mask"], concept["object"])]
        probe_image(*images[0])  # imports
        label_map_claims(*maps[0])
        start = time.perf_counter()
        for path, boxes in images:
            probe_image(path, boxes, 16)
        t_img = (time.perf_counter() - start) / len(images)
        start = time.perf_counter()
        for path, claims in maps:
            label_map_claims(path, claims)
        t_map = (time.perf_counter() - start) / len(maps)
        return t_img * 1e3, t_map * 1e3, len(images)


def synthetic_world(n: int, negatives: int, seed: int = 0) -> dict[str, pd.DataFrame]:
    """N tuples with every table the gate reads, built column by column (no files)."""
    rng = np.random.default_rng(seed)
    c = -(-n // 3)
    classes = list(WORLD_CLASSES)
    cids = np.array([f"c{j:07d}" for j in range(c)], dtype=object)
    cls = np.array([classes[j % len(classes)] for j in range(c)], dtype=object)
    ex = pd.DataFrame({"concept_id": cids, "base_class": cls, "group": [WORLD_CLASSES[k] for k in cls],
                       "image": [f"exemplars/images/{k}.png" for k in cids], "mask": [f"exemplars/masks/{k}.png" for k in cids],
                       "width": SIZE, "height": SIZE, "box": [TRAIN_BOX] * c, "identity": "{}", "source": "synthetic", "seed": 0})
    splits = assign_splits(ex, SplitConfig(), 0)
    j = np.arange(n) // 3
    q = np.arange(n) % 3
    qid = np.array([f"q{a:07d}_{b:02d}" for a, b in zip(j, q)], dtype=object)
    prompts = np.array([f"A photo of a V* {k} on a rock." for k in cls[j]], dtype=object)
    gen = pd.DataFrame({"query_id": qid, "concept_id": cids[j], "prompt": prompts,
                        "concept_phrase": [f"V* {k}" for k in cls[j]], "template": "A photo of a {} on a rock.",
                        "medium": "photo", "scene": "rock", "image": [f"generated/images/{k}.png" for k in qid],
                        "width": SIZE, "height": SIZE, "box": [QUERY_BOX] * n, "backend": "synthetic", "seed": np.arange(n)})
    tuples = build_tuples(ex, gen, splits)
    # k negatives per tuple: other concepts of its split
    by_split = {s: np.flatnonzero(splits.reindex(cids).to_numpy() == s) for s in ("train", "val", "test")}
    own = pd.Series(np.arange(c), index=cids).reindex(tuples["concept_id"]).to_numpy()
    tsplit = tuples["split"].to_numpy()
    neg_c = np.empty((n, negatives), dtype=np.int64)
    for s, pool in by_split.items():
        rows = np.flatnonzero(tsplit == s)
        draw = rng.integers(0, len(pool) - 1, size=(len(rows), negatives))
        pos = np.searchsorted(pool, own[rows])[:, None]
        neg_c[rows] = pool[draw + (draw >= pos)]  # skip the tuple's own concept
    negs = pd.DataFrame({"tuple_id": np.repeat(tuples["tuple_id"].to_numpy(), negatives),
                         "neg_concept_id": cids[neg_c.ravel()], "neg_image": ex["image"].to_numpy()[neg_c.ravel()]})
    negs = negs.drop_duplicates(["tuple_id", "neg_concept_id"])
    for col in NEGATIVE_COLUMNS:
        negs[col] = negs[col].astype("category")
    images = np.concatenate([ex["image"].to_numpy(), gen["image"].to_numpy()])
    labels = np.array([p.replace("/images/", "/labels/") for p in images], dtype=object)
    concept_of = np.concatenate([cids, cids[j]])
    boxes = [TRAIN_BOX] * c + [QUERY_BOX] * n
    m = len(images)
    objects = pd.DataFrame({"image": np.concatenate([images, images]), "object": np.r_[np.full(m, 2), np.ones(m, int)],
                            "role": ["concept"] * m + ["distractor"] * m, "base_class": np.r_[np.concatenate([cls, cls[j]]), np.full(m, "kite")],
                            "concept_id": np.r_[concept_of, np.full(m, None)], "box": boxes + [DISTRACTOR_BOX] * m,
                            "mask": np.concatenate([labels, labels]), "area": np.r_[np.full(m, AREA), np.full(m, DISTRACTOR_AREA)]})
    return {"tuples": tuples, "negatives": negs, "exemplars": ex, "generated": gen, "objects": objects}


class CountingReads:
    """File reads answered from the path, counted per path."""

    def __init__(self):
        self.images: Counter = Counter()
        self.maps: Counter = Counter()

    def probe(self, path: Path, boxes=(), hash_size: int = 16) -> ImageProbe:
        self.images[str(path)] += 1
        digest = hashlib.blake2b(str(path).encode(), digest_size=hash_size * hash_size // 8).digest()
        return ImageProbe(True, True, float(SIZE), float(SIZE), None, 40.0, [35.0] * len(boxes), digest)

    def label_map(self, path: Path, claims=()):
        self.maps[str(path)] += 1
        box = tuple(TRAIN_BOX if "/exemplars/" in str(path) else QUERY_BOX)
        objects = {1: (tuple(DISTRACTOR_BOX), DISTRACTOR_AREA), 2: (box, AREA)}
        return objects, [Claim(box, 1.0, 0.8, 2, 1.0) for _ in claims]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--negatives", type=int, default=10, help="negatives per tuple (the real world has its whole split)")
    args = p.parse_args()

    ms_img, ms_map, files = per_file_costs()
    print(f"per file (real, one process, {files} files of a rendered {SIZE}-px world): "
          f"image probe {ms_img:.2f} ms, label map {ms_map:.2f} ms")
    def validated(tables):
        reads = CountingReads()
        quality._probe_image, quality._read_label_map = reads.probe, reads.label_map
        start = time.perf_counter()
        r = quality.validate_tuples(tables["tuples"], tables["negatives"], "/nonexistent-data-root", ValidateConfig(),
                                    SplitConfig(), placeholder="V* {}", workers=1, objects=tables["objects"],
                                    exemplars=tables["exemplars"], generated=tables["generated"])
        return r, reads, time.perf_counter() - start

    validated(synthetic_world(300, args.negatives))  # untimed: the checks' one-off start (about 4 s) is no size's cost
    base = None
    for n in args.sizes:
        tables = synthetic_world(n, args.negatives)
        r, reads, sec = validated(tables)
        if not r.success:
            print(r.message()[:2000])
        once = max(reads.images.values()) == 1 and max(reads.maps.values()) == 1
        per = sec / n * 100_000
        base = base or per
        projected = sec + (len(reads.images) * ms_img + len(reads.maps) * ms_map) / 1e3
        print(f"N={n:,} tuples ({len(tables['negatives']):,} negatives, {len(reads.images):,} image files, "
              f"{len(reads.maps):,} label maps, each read {'once' if once else 'MORE THAN ONCE'}; "
              f"{'passed' if r.success else 'FAILED'} {len(r.checks)} expectations): {sec:.1f} s, "
              f"{per:.1f} s per 100,000 tuples ({per / base:.2f}x the first size's rate); "
              f"with the real file reads on one core: {projected:.0f} s")


if __name__ == "__main__":
    main()
