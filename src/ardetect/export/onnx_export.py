"""Write a trained detector as three ONNX graphs, its tokenizer and a manifest.

``export_detector`` traces ``ardetect.export.graphs`` with ``torch.onnx.export`` (opset
17 by default, dynamic batch and prompt-length axes), checks each file with
``onnx.checker``, and writes ``manifest.json``: every graph's inputs and outputs (names,
shapes, types) and SHA-256, the image size and normalisation, the identity re-ranking's
weight, pooling grid and top-k, the source checkpoints' digests and the metrics the model
earned. Optional scorer variants: fp16 (for a GPU) and int8 dynamic quantization (CPU).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ardetect.digest import file_sha256 as sha256
from ardetect.export.graphs import (
    PROMPT_INPUTS, TOKEN_INPUTS, ImageEncoderGraph, QueryEncoderGraph, ScorerGraph, image_outputs, query_outputs,
)

FORMAT_VERSION = 1
GRAPHS = ("image_encoder", "query_encoder", "scorer")
VARIANTS = {"fp16": "variants/scorer_fp16.onnx", "int8": "variants/scorer_int8.onnx"}  # precision -> scorer file
TRACE_PROMPT = ("a photo of a V* cat on a rock .", "V* cat")  # any prompt traces the same graph (axes are dynamic)


class ExportError(ValueError):
    """An export could not be written or read; the message names the file and the problem."""


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def graph_signature(path: Path) -> dict:
    """{"inputs": [{name, shape, type}], "outputs": [...]} of an ONNX file (symbolic axes by name)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    elem = lambda v: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name  # noqa: E731
    side = lambda vs: [{"name": v.name, "shape": _dims(v), "type": elem(v)} for v in vs]  # noqa: E731
    return {"inputs": side(model.graph.input), "outputs": side(model.graph.output)}


def check_graph(path: Path) -> None:
    """``onnx.checker`` on a file; a clear ``ExportError`` naming it otherwise."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # onnx raises several types (ValidationError, DecodeError, ...)
        raise ExportError(f"{path}: not a valid ONNX graph ({type(err).__name__}: {str(err).strip()[:300]})") from None


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict, opset: int) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer warns on every shape-dependent Python branch it freezes
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, do_constant_folding=True)
        results = module(*args)
    shapes = {n: tuple(t.shape) for n, t in zip([*inputs, *outputs], [*args, *(results if isinstance(results, tuple) else (results,))])}
    _pin_static_dims(path, shapes, axes)
    check_graph(path)


def _pin_static_dims(path: Path, shapes: dict[str, tuple], axes: dict) -> None:
    """Give every input and output axis that is not dynamic its size: the tracer leaves some as
    made-up names (a concatenation's), which would reach the manifest as if they varied."""
    import onnx

    model = onnx.load(str(path))
    changed = False
    for value in [*model.graph.input, *model.graph.output]:
        if value.name not in shapes:
            continue
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if i not in axes.get(value.name, {}) and dim.dim_param and i < len(shapes[value.name]):
                dim.dim_value = int(shapes[value.name][i])  # (setting the value clears the name)
                changed = True
    if changed:
        onnx.save(model, str(path))


def export_detector(
    model, out_dir: Path, identity_weight: float, grid: int, top_k: int, opset: int = 17,
    sources: Mapping[str, Path] | None = None, metrics: Mapping | None = None, fp16: bool = True, int8: bool = True,
    class_weight: float = 0.0,
) -> dict:
    """Write ``model`` (an ``ARDetector``) to ``out_dir`` as the three graphs, ``tokenizer/`` and ``manifest.json``.

    ``identity_weight``, ``grid``, ``top_k``, ``class_weight``: the scorer's rule (``RegionCandidates.pick``), as
    ``evaluate`` fitted it for the row it reports as ARD. ``sources``: checkpoint files whose
    digests the manifest records; ``metrics``: what the model earned (copied into the manifest).
    Returns the manifest.
    """
    from ardetect.train.phases import image_size_of

    if opset < 17:
        raise ExportError(f"opset={opset}: the export needs opset >= 17")
    if not model.cfg.region_tokens:
        raise ExportError("this detector has no region tokens (model.region_tokens=False): ARD's query needs them; nothing to export")
    if identity_weight < 0 or grid < 1 or top_k < 1 or class_weight < 0:
        raise ExportError(f"identity_weight={identity_weight}, grid={grid}, top_k={top_k}, class_weight={class_weight}: "
                          "need weights >= 0, grid >= 1, top_k >= 1")
    if class_weight > 0 and model.region_classifier is None:
        raise ExportError(f"class_weight={class_weight}: this detector has no region classifier (pretrain.classify_epochs: 0?)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    size = image_size_of(model)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, size, size, generator=g)
    tok = model.tokenize([TRACE_PROMPT[0]], [TRACE_PROMPT[1]])
    query_image = torch.rand(1, 3, size, size, generator=g)
    query_box = torch.tensor([[0.1 * size, 0.15 * size, 0.6 * size, 0.7 * size]])

    image_out = image_outputs(model)
    _export(ImageEncoderGraph(model).eval(), (images,), out_dir / "image_encoder.onnx", ["images"], image_out,
            {"images": {0: "n"}, **{k: {0: "n"} for k in image_out}}, opset)

    text_axes = {k: {0: "b", 1: "l"} for k in ("input_ids", "text_position_ids")} | {"text_self_mask": {0: "b", 1: "l", 2: "l"}}
    prompt_axes = {k: {0: "b", 1: "t"} for k in ("gather_index", "token_mask", "position_ids", "concept_mask", "region_mask")}
    prompt_axes["self_attn_mask"] = {0: "b", 1: "t", 2: "t"}
    query_args = (query_image, query_box, *[getattr(tok, k) for k in TOKEN_INPUTS])
    query_out = query_outputs(model)
    _export(QueryEncoderGraph(model).eval(), query_args, out_dir / "query_encoder.onnx", ["query_image", "query_box", *TOKEN_INPUTS],
            query_out, {"query_image": {0: "b"}, "query_box": {0: "b"}, "text": {0: "b", 1: "t"}, "query_region_map": {0: "b"},
                        **{k: {0: "b"} for k in query_out[2:]}, **text_axes, **prompt_axes}, opset)

    scorer = ScorerGraph(model, identity_weight, grid, top_k, size, class_weight).eval()
    with torch.no_grad():
        image_side = ImageEncoderGraph(model)(images)
        query_side = QueryEncoderGraph(model)(*query_args)
    sizes = torch.tensor([[size, size]] * len(images))
    classes = class_weight > 0
    score_in = ["features", "region_map", "image_sizes", "text", "query_region_map", "query_box", *PROMPT_INPUTS,
                *(["pixels", "query_class"] if classes else [])]
    score_out = ["boxes", "scores", "top_boxes", "top_probs", "top_similarity", *(["top_class_match"] if classes else [])]
    axes = {"features": {0: "n"}, "region_map": {0: "n"}, "image_sizes": {0: "n"}, "text": {1: "t"}, "pixels": {0: "n"},
            "self_attn_mask": {1: "t", 2: "t"}, **{k: {1: "t"} for k in PROMPT_INPUTS if k != "self_attn_mask"},
            **{k: {0: "n"} for k in score_out}}
    args = (*image_side[:2], sizes, *query_side[:2], query_box, *[getattr(tok, k) for k in PROMPT_INPUTS],
            *((image_side[2], query_side[2]) if classes else ()))
    _export(scorer, args, out_dir / "scorer.onnx", score_in, score_out, {k: v for k, v in axes.items() if k in score_in + score_out}, opset)

    variants = {}
    (out_dir / "variants").mkdir(exist_ok=True)  # always there (a DVC output), empty when no variant is asked for
    if fp16:
        variants["fp16"] = _fp16_variant(out_dir / "scorer.onnx", out_dir / VARIANTS["fp16"])
    if int8:
        variants["int8"] = _int8_variant(out_dir / "scorer.onnx", out_dir / VARIANTS["int8"])

    model.tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    files = [*(f"{n}.onnx" for n in GRAPHS), *variants.values()]
    manifest = {
        "format_version": FORMAT_VERSION,
        "opset": opset,
        "image_size": size,
        "input_range": [0.0, 1.0],
        "normalisation": {"mean": [float(v) for v in model.pixel_mean.flatten()], "std": [float(v) for v in model.pixel_std.flatten()],
                          "where": "inside image_encoder and query_encoder: feed RGB in [0, 1], resized to image_size"},
        "resize": "bilinear with antialias to image_size x image_size (ardetect.export.runtime.prepare_image)",
        "tokenizer": {"path": "tokenizer", "max_text_len": model.cfg.max_text_len, "region_tokens": 1,
                      "function": "ardetect.model.text.tokenize_prompts (the training's own)"},
        "score": {"identity_weight": float(identity_weight), "grid": int(grid), "top_k": int(top_k), "class_weight": float(class_weight),
                  "rule": "paper (top box probability)" if identity_weight == 0 and class_weight == 0 else
                          "identity re-ranking: max over top_k boxes of prob * exp(w * (cos - 1)) * class_match ** a"},
        "query_batch": 1,
        "graphs": {n: {"file": f"{n}.onnx", **graph_signature(out_dir / f"{n}.onnx")} for n in GRAPHS},
        "variants": {p: {"file": f} for p, f in variants.items()},
        "model_config": model.cfg.model_dump(mode="json"),
        "sources": {k: {"path": str(p), "sha256": sha256(Path(p))} for k, p in (sources or {}).items()},
        "metrics": dict(metrics or {}),
        "sha256": {f: sha256(out_dir / f) for f in files},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _fp16_variant(src: Path, dst: Path) -> str:
    """The scorer with fp16 weights and arithmetic, fp32 inputs and outputs (for a GPU)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from onnxruntime.transformers.onnx_model import OnnxModel

    dst.parent.mkdir(parents=True, exist_ok=True)
    model = OnnxModel(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True))
    model.topological_sort()  # the converter appends its input casts after their readers
    onnx.save(model.model, str(dst))
    check_graph(dst)
    return VARIANTS["fp16"]


def _int8_variant(src: Path, dst: Path) -> str:
    """The scorer with int8 dynamically quantized matrix products (for a CPU)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.addFilter(_quantizer_advice)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.removeFilter(_quantizer_advice)
    check_graph(dst)
    return VARIANTS["int8"]


# What onnxruntime's quantizer logs on the root logger of every scorer: advice to pre-process first, a 12-line type
# dump for the integer indices of a NonZero, which are not to be quantized, and (at INFO, shown by the stages' logging)
# one "Quantization parameters for tensor ... not specified" line for each activation it leaves in float: 98 lines in
# the default world's export. The int8 variant's own error is measured and reported (parity.json "int8"), so these say
# nothing the user can act on; the quantizer's other warnings and errors still pass.
QUANTIZER_ADVICE = ("Please consider to run pre-processing before quantization", "Inference failed or unsupported type to quantize")


def _quantizer_advice(record: logging.LogRecord) -> bool:
    if str(record.msg).startswith(QUANTIZER_ADVICE):
        return False
    return not (record.levelno < logging.WARNING and _from_quantizer(record))


def _from_quantizer(record: logging.LogRecord) -> bool:
    parts = Path(record.pathname).parts
    return "onnxruntime" in parts and "quantization" in parts
