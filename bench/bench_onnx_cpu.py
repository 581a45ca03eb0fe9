"""CPU benchmark of the exported scorer on onnxruntime against the PyTorch path, same inputs, same run.

The scorer's work is per candidate: given a candidate's cached image features (the index
keeps them) and one encoded query, run the encoder, decoder and the identity re-ranking.
Measured as candidates per second for a batch of candidates, each against PyTorch's
``predict_region`` on the same ``ImageCache`` and query, its threads = cores (ratio above 1 =
faster). The rows, all with every graph optimisation unless said:

- onnxruntime as shipped (``OnnxDetector``): single-threaded scorer calls on chunks of 4
  candidates, one per core side by side;
- one call on all candidates, onnxruntime's intra-op threads = cores (the usual setting);
- the same with only basic graph optimisations;
- the same with IO binding (inputs bound once as OrtValues, outputs to CPU buffers);
- the int8 dynamically quantized scorer, as shipped.

Every row is timed once per round, rounds interleaved, median reported: a slow spell of a
shared machine hits every row alike. A random ``nano`` detector at the pipeline's 128 px
(its sampling-offset and attention-weight layers drawn at random, so that points spread as
in a trained model rather than all queries sampling alike), the identity re-ranking at weight 10 on 3 x 3 cells
over the top 5 boxes.

Run: ``PYTHONPATH=src .venv/bin/python bench/bench_onnx_cpu.py [--threads N] [--candidates 64] [--repeats 10]``
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ardetect.model import ModelConfig, build  # noqa: E402
from ardetect.model.layers import DeformableAttention  # noqa: E402

from _timing import apply_threads, parser_with_threads, timed_interleaved  # noqa: E402  (bench/ is the script's folder)

WEIGHT, GRID, TOP_K, SIZE = 10.0, 3, 5, 128


def main() -> None:
    parser = parser_with_threads(__doc__)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    apply_threads(args)
    import onnxruntime as ort

    from ardetect.export.onnx_export import export_detector
    from ardetect.export.runtime import OnnxDetector

    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = build(ModelConfig.named("nano", image_size=(SIZE, SIZE))).eval()
    with torch.no_grad():  # points spread over each map as in a trained model (initialised, all queries sample alike)
        for module in model.modules():
            if isinstance(module, DeformableAttention):
                module.sampling_offsets.weight.normal_(0.0, 0.5)
                module.attention_weights.weight.normal_(0.0, 0.5)
    n = args.candidates
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g)
    query_image = torch.rand(1, 3, SIZE, SIZE, generator=g)
    box = torch.tensor([[20.0, 24.0, 90.0, 100.0]])
    prompt, phrase = "a watercolor painting of a V* mug on a table .", "V* mug"
    print(f"scorer, {n} candidates a call, nano {SIZE} px, torch {torch.__version__} ({threads} threads), onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        export_detector(model, Path(tmp), WEIGHT, GRID, TOP_K, fp16=False, int8=True)
        with torch.no_grad():
            cache = model.encode_images(images, region_map=True)
            query = model.encode_query(query_image, box, [prompt], [phrase], region_map=True)
        sizes = torch.full((n, 2), SIZE)

        def pytorch() -> None:
            model.predict_region(cache, query, image_sizes=sizes, identity_weight=WEIGHT, top_k=TOP_K, grid=GRID)

        cpu = ["CPUExecutionProvider"]  # a CPU bench: onnxruntime-gpu on a CUDA machine would take the GPU otherwise
        shipped = OnnxDetector(tmp, threads=threads, providers=cpu)
        feats = shipped.encode_images(images.numpy())
        q = shipped.encode_prepared_query(query_image[0].numpy(), box[0].numpy(), prompt, phrase)
        np_sizes = sizes.numpy()
        one_call = _intra_op_detector(ort, tmp, threads, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        basic = _intra_op_detector(ort, tmp, threads, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        int8 = OnnxDetector(tmp, precision="int8", threads=threads, providers=cpu)
        session = one_call.sessions["scorer"]
        feeds = {"features": feats["features"], "region_map": feats["region_map"], "image_sizes": np_sizes.astype(np.int64), **q}
        binding = session.io_binding()
        for name in one_call.inputs["scorer"]:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[name])))
        for out in session.get_outputs():
            binding.bind_output(out.name, "cpu")
        rows = {
            "PyTorch predict_region": pytorch,
            f"onnxruntime as shipped ({threads} x 1 thread, chunks of {shipped.chunk})": lambda: shipped.score(feats, q, np_sizes),
            f"onnxruntime one call, {threads} intra-op threads": lambda: one_call.score(feats, q, np_sizes, chunk=n),
            "  the same, basic optimisations": lambda: basic.score(feats, q, np_sizes, chunk=n),
            "  the same, IO binding": lambda: session.run_with_iobinding(binding),
            "onnxruntime int8 scorer, as shipped": lambda: int8.score(feats, q, np_sizes),
        }
        # the rows compute the same scores: the export's against PyTorch's, before any is timed
        with torch.no_grad():
            expected = model.predict_region(cache, query, image_sizes=sizes, identity_weight=WEIGHT, top_k=TOP_K, grid=GRID)[1].numpy()
        for label, got in (("as shipped", shipped.score(feats, q, np_sizes)), ("one call", one_call.score(feats, q, np_sizes, chunk=n))):
            worst = float(np.abs(got["scores"] - expected).max())
            if worst > 1e-4:
                raise SystemExit(f"onnxruntime {label} scores differ from PyTorch's by {worst:.2e} (> 1e-4): nothing to time")
        times = timed_interleaved(rows, args.repeats)
        ref = times["PyTorch predict_region"]
        for label, t in times.items():
            ratio = "" if label.startswith("PyTorch") else f"   ratio to PyTorch {ref / t:.2f}"
            print(f"{label:56s} {n / t:8.1f} candidates/s{ratio}")


def _intra_op_detector(ort, folder: str, threads: int, level):
    """An ``OnnxDetector`` whose scorer runs each call on ``threads`` intra-op threads, at ``level``."""
    from ardetect.export.runtime import OnnxDetector

    det = OnnxDetector(folder, threads=1, providers=["CPUExecutionProvider"])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = threads
    det.sessions["scorer"] = ort.InferenceSession(str(Path(folder) / "scorer.onnx"), opts, providers=["CPUExecutionProvider"])
    return det


if __name__ == "__main__":
    main()
