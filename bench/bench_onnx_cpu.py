"""CPU benchmark of the exported scorer on onnxruntime against the PyTorch path, same inputs, same run.

The scorer's work is per candidate: given a candidate's cached image features (the index
keeps them) and one encoded query, run the encoder, decoder and the identity re-ranking.
Measured as candidates per second for a batch of candidates, each against PyTorch's
``predict_region`` on the same ``ImageCache`` and query (ratio above 1 = faster):

- onnxruntime, CPU provider, all graph optimisations, threads = cores (the shipped setting);
- the same with only basic graph optimisations;
- the same with IO binding (inputs bound once as OrtValues, outputs to CPU buffers);
- the int8 dynamically quantized scorer.

A random ``nano`` detector at the pipeline's 128 px (speed does not depend on the weights),
the identity re-ranking at weight 10 on 3 x 3 cells over the top 5 boxes.

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

from _timing import apply_threads, parser_with_threads, timed  # noqa: E402  (bench/ is the script's folder)

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

        ref = timed(pytorch, args.repeats)
        print(f"{'PyTorch predict_region':44s} {n / ref:8.1f} candidates/s")
        rows = []
        for label, kwargs in (("onnxruntime, all optimisations", {}), ("onnxruntime int8 scorer", {"precision": "int8"})):
            det = OnnxDetector(tmp, threads=threads, **kwargs)
            feats = det.encode_images(images.numpy())
            q = det.encode_prepared_query(query_image[0].numpy(), box[0].numpy(), prompt, phrase)
            rows.append((label, timed(lambda: det.score(feats, q, sizes.numpy(), chunk=n), args.repeats)))
            if not kwargs:
                basic = OnnxDetector(tmp, threads=threads)
                opts = ort.SessionOptions()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                opts.intra_op_num_threads = threads
                basic.sessions["scorer"] = ort.InferenceSession(str(Path(tmp) / "scorer.onnx"), opts, providers=["CPUExecutionProvider"])
                rows.append(("onnxruntime, basic optimisations", timed(lambda: basic.score(feats, q, sizes.numpy(), chunk=n), args.repeats)))
                session = det.sessions["scorer"]
                feeds = {"features": feats["features"], "region_map": feats["region_map"], "image_sizes": sizes.numpy().astype(np.int64), **q}
                binding = session.io_binding()
                for name in det.inputs["scorer"]:
                    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[name])))
                for out in session.get_outputs():
                    binding.bind_output(out.name, "cpu")
                rows.append(("onnxruntime, IO binding", timed(lambda: session.run_with_iobinding(binding), args.repeats)))
        for label, t in rows:
            print(f"{label:44s} {n / t:8.1f} candidates/s   ratio to PyTorch {ref / t:.2f}")


if __name__ == "__main__":
    main()
