"""CPU benchmark of the evaluation's detector pass: queries scored side by side against one at a time.

The ``evaluate`` stage runs the ``nano`` detector (ARD and ARD− in one pass) on every
query's candidates. One query at a time, torch splits each operation across its
intra-op threads; the detector's many small operations keep two such threads only
partly busy. ``SharedTrunkARD.prefetch`` instead scores ``workers`` queries side by
side, each on one intra-op thread. Both paths run here on the same random detector,
images and queries (104 candidates a query, as a test query of the default world has),
rounds interleaved; the scores are checked equal and the ratio of queries per second
printed (above 1 = side by side is faster).

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_eval_cpu.py [--queries 8] [--repeats 3]``
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ardetect.evaluation.ard import SharedTrunkARD  # noqa: E402
from ardetect.evaluation.harness import evaluate_method  # noqa: E402
from ardetect.model import ModelConfig, build  # noqa: E402

from _timing import apply_threads, parser_with_threads, timed_interleaved  # noqa: E402  (bench/ is the script's folder)


def world(root: Path, queries: int, candidates: int, size: int = 160):
    rng = np.random.default_rng(0)
    for i in range(candidates + queries):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"x{i}.png")
    tuples = pd.DataFrame({
        "tuple_id": [f"t{i}" for i in range(queries)], "query_image": [f"x{candidates + i}.png" for i in range(queries)],
        "query_box": [[20.0, 24.0, 100.0, 110.0]] * queries, "prompt": ["A photo of a V* cat."] * queries,
        "concept_phrase": ["V* cat"] * queries, "train_image": [f"x{i}.png" for i in range(queries)],
        "train_box": [[0.0, 0.0, 64.0, 64.0]] * queries, "medium": ["photo"] * queries, "base_class": ["cat"] * queries,
    })
    negatives = pd.DataFrame([(f"t{q}", f"x{i}.png") for q in range(queries) for i in range(candidates) if i != q],
                             columns=["tuple_id", "neg_image"])
    return tuples, negatives


def main() -> None:
    parser = parser_with_threads(__doc__)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=104)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    apply_threads(args)
    torch.manual_seed(0)
    minus = build(ModelConfig.named("nano", image_size=(128, 128))).eval()
    ard = copy.deepcopy(minus)
    with torch.no_grad():
        ard.adapter_text.bias.add_(0.1)
    cores = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tuples, negatives = world(root, args.queries, args.candidates)
        scores = {}
        make = lambda: SharedTrunkARD({"ARD": ard, "ARD-": minus}, root, 128, top_k=5, identity=True, grids=[2])  # noqa: E731
        warm = make()
        warm.runner.block(sorted(set(negatives["neg_image"]) | set(tuples["train_image"])), True)  # candidate features, not timed

        def run(workers: int | None):
            def go() -> None:
                trunk = make()  # a fresh trunk each round (its stash of scored queries), the candidates' features shared
                trunk.runner._blocks, trunk.runner._features = warm.runner._blocks, warm.runner._features
                methods = trunk.methods({"ARD": (5.0, 2)})
                if workers:
                    trunk.prefetch(tuples, negatives, workers, progress=False)
                scores[workers] = [evaluate_method(m, tuples, negatives, progress=False).per_query["score"].to_numpy() for m in methods]
            return go

        times = timed_interleaved({"one at a time": run(None), "side by side": run(cores)}, args.repeats)
        for a, b in zip(scores[None], scores[cores]):
            np.testing.assert_allclose(a, b, atol=1e-5)
    ref = times["one at a time"]
    print(f"nano evaluation pass (ARD and ARD-), {args.queries} queries x {args.candidates} candidates, {cores} cores, torch {torch.__version__}")
    print(f"{'one query at a time, ' + str(cores) + ' intra-op threads':44s} {args.queries / ref:6.2f} queries/s   ratio 1.00")
    t = times["side by side"]
    print(f"{str(cores) + ' queries side by side, 1 thread each':44s} {args.queries / t:6.2f} queries/s   ratio {ref / t:.2f}")


if __name__ == "__main__":
    main()
