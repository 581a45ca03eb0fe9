"""Run an exported detector with onnxruntime: load, check, preprocess, tokenize, score.

``OnnxDetector`` reads a folder written by ``export_detector``: it checks the manifest and
every graph's SHA-256 (a corrupt, truncated or swapped file is refused with its name),
opens one onnxruntime session per graph with the providers available (CUDA, then CPU,
unless told otherwise) and reports the ones actually used. Images go through the same
resize as evaluation (``prepare_image``) and prompts through the training's tokenizer
function (``ardetect.model.text.tokenize_prompts``).

``OnnxARDMethod`` puts it behind the evaluation harness's method interface, so ONNX scores
are ranked and judged by the same code as PyTorch's.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from ardetect.export.onnx_export import FORMAT_VERSION, GRAPHS, ExportError, sha256
from ardetect.procs import usable_cores

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def load_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise ExportError(f"{path} not found: {folder} is not an export folder (run the export stage or `ard export`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {manifest.get('format_version')!r}, this ardetect reads {FORMAT_VERSION}")
    return manifest


def clip_to_images(boxes: np.ndarray, image_sizes: np.ndarray) -> np.ndarray:
    """Pixel xyxy boxes [N, 4] clipped to their images' (h, w) [N, 2]: what a user is shown. The detector's box may run
    past its image's edge (96 of the default test split's 3,120 top-10 boxes do); the evaluation and the export's parity read it
    as the detector gives it."""
    hw = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)
    return np.clip(np.asarray(boxes, dtype=np.float64), 0.0, hw[:, [1, 0, 1, 0]])


def prepare_image(image, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An image (path or PIL) -> ([3, size, size] float32 in [0, 1], (height, width) of the original): evaluation's resize."""
    return prepare_image_and_box(image, size, None)[::2]


def prepare_image_and_box(image, size: int, box) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """``prepare_image`` and a pixel xyxy box of the original mapped into the resized image."""
    from PIL import Image

    from ardetect.data.datasets import transform_with_box
    from ardetect.images import open_image, to_rgb

    # as the service reads an upload: EXIF orientation applied, 16-bit and float images scaled (the pipeline's 8-bit
    # PNGs come out as they are), so a path given to the registered model answers as the service does
    img = open_image(Path(image)) if not isinstance(image, Image.Image) else to_rgb(image)
    tensor, out = transform_with_box(_transform(size), img, [0, 0, 1, 1] if box is None else list(box))
    return tensor.numpy(), (None if box is None else out.numpy()), (img.height, img.width)


@lru_cache(maxsize=8)
def _transform(size: int):
    from ardetect.data.datasets import build_transform

    return build_transform(train=False, size=size)


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The providers to ask onnxruntime for: ``requested`` (those available), else the preferred available ones."""
    import onnxruntime as ort

    available = [p for p in ort.get_available_providers() if p == "CPUExecutionProvider" or _usable(p)]
    wanted = list(requested) if requested else list(PREFERRED_PROVIDERS)
    chosen = [p for p in wanted if p in available]
    if requested and not chosen:
        raise ExportError(f"providers={list(requested)}: none is available here (onnxruntime has {available})")
    return chosen or ["CPUExecutionProvider"]


def _usable(provider: str) -> bool:
    """Whether a GPU provider onnxruntime was built with can run here: onnxruntime-gpu lists CUDA and
    TensorRT on any machine and only fails (loudly) when a session asks for them without a GPU."""
    import ctypes.util

    import torch

    if not torch.cuda.is_available():
        return False
    if provider == "TensorrtExecutionProvider":
        return ctypes.util.find_library("nvinfer") is not None
    return True


class OnnxDetector:
    """An exported detector on onnxruntime.

    ``precision``: the scorer to run, "fp32" (default), or a variant the export wrote ("fp16",
    "int8"). ``providers``: onnxruntime execution providers in order of preference (default:
    TensorRT, CUDA, CPU, those available); ``providers_used`` says which each session got.
    ``threads``: CPU threads (default: every core). The encoders use them inside each call; the
    scorer on the CPU runs single-threaded calls on chunks of candidates side by side, one per
    thread, which keeps both cores busy where splitting each small operation between threads
    does not (``bench/bench_onnx_cpu.py`` measures both).
    """

    CPU_CHUNK = 4  # candidates per scorer call on the CPU: each call's tensors stay in the core's cache
    GPU_CHUNK = 64

    def __init__(self, folder: str | Path, precision: str = "fp32", providers: Sequence[str] | None = None, threads: int | None = None,
                 verify: bool = True):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.manifest = m = load_manifest(self.folder)
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        self.threads = int(threads or usable_cores())
        self.verify = verify
        self._providers = choose_providers(providers)
        self.sessions = {name: self._open(name, m["graphs"][name]["file"]) for name in GRAPHS if name != "scorer"}
        self._set_scorer(precision)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder / m["tokenizer"]["path"]))
        self.size = int(m["image_size"])

    def with_precision(self, precision: str) -> "OnnxDetector":
        """This detector with another scorer variant, sharing the encoders' sessions and the tokenizer."""
        other = copy.copy(self)
        other.sessions = dict(self.sessions)
        other._set_scorer(precision)
        return other

    def _set_scorer(self, precision: str) -> None:
        m = self.manifest
        if precision == "fp32":
            file = m["graphs"]["scorer"]["file"]
        elif precision in m.get("variants", {}):
            file = m["variants"][precision]["file"]
        else:
            raise ExportError(f"precision={precision!r}: {self.folder} has the scorer variants {['fp32', *m.get('variants', {})]}")
        self.precision = precision
        self.sessions["scorer"] = self._open("scorer", file)
        self.inputs = {n: [i.name for i in s.get_inputs()] for n, s in self.sessions.items()}
        self.providers_used = {n: s.get_providers()[0] for n, s in self.sessions.items()}
        on_cpu = self.providers_used["scorer"] == "CPUExecutionProvider"
        # a GPU scorer runs its (internally parallel) calls one after another on bigger chunks
        self.chunk = self.CPU_CHUNK if on_cpu else self.GPU_CHUNK
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ardetect-scorer") if on_cpu and self.threads > 1 else None

    def _open(self, name: str, file: str):
        """An onnxruntime session of ``file`` after its SHA-256 check; the scorer's runs are single-threaded (see the class)."""
        import onnxruntime as ort

        path = self.folder / file
        if not path.is_file():
            raise ExportError(f"{path} not found: the export in {self.folder} is incomplete")
        if self.verify and sha256(path) != self.manifest["sha256"].get(file):
            raise ExportError(f"{path}: SHA-256 differs from manifest.json: the file is corrupt or from another export")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = 1 if name == "scorer" else self.threads
        opts.log_severity_level = 3
        try:
            return ort.InferenceSession(str(path), opts, providers=self._providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise ExportError(f"{path}: onnxruntime cannot load it ({type(err).__name__}: {str(err).strip()[:300]})") from None

    # --- the three graphs -------------------------------------------------------------
    @property
    def image_arrays(self) -> list[str]:
        """The image encoder's outputs: what an index keeps per image ("features", "region_map", and
        "pixels" for a detector with a region classifier)."""
        return [o.name for o in self.sessions["image_encoder"].get_outputs()]

    def encode_images(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """[N, 3, S, S] float32 in [0, 1] -> {"features", "region_map"[, "pixels"]} (``image_arrays``: what an index keeps per image)."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (3, self.size, self.size):
            raise ValueError(f"images must be [N, 3, {self.size}, {self.size}], got {list(images.shape)}")
        return dict(zip(self.image_arrays, self.sessions["image_encoder"].run(None, {"images": images})))

    def tokenize(self, prompt: str, concept_phrase: str) -> dict[str, np.ndarray]:
        """The prompt's arrays (``TokenizedPrompts``) from the training's tokenizer function."""
        from ardetect.model.text import tokenize_prompts

        tok = tokenize_prompts(self.tokenizer, [prompt], [concept_phrase], 1, self.manifest["tokenizer"]["max_text_len"])
        return {k: v.numpy() for k, v in tok.__dict__.items() if hasattr(v, "numpy")}

    def encode_query(self, image, box, prompt: str, concept_phrase: str) -> dict[str, np.ndarray]:
        """A query (image path or PIL, pixel xyxy box in it, prompt, concept phrase) -> the query cache the scorer reads."""
        img, qbox, _ = prepare_image_and_box(image, self.size, box)
        return self.encode_prepared_query(img, qbox, prompt, concept_phrase)

    def encode_prepared_query(self, image: np.ndarray, box: np.ndarray, prompt: str, concept_phrase: str) -> dict[str, np.ndarray]:
        """``encode_query`` of an image already resized (``prepare_image``) and its box in that image."""
        from ardetect.model.box_ops import check_boxes_in_image

        import torch

        box = np.asarray(box, dtype=np.float32).reshape(1, 4)
        check_boxes_in_image(torch.from_numpy(box), self.size, self.size, "query_box")
        tok = self.tokenize(prompt, concept_phrase)
        feeds = {"query_image": np.ascontiguousarray(image[None], dtype=np.float32), "query_box": box, **tok}
        names = [o.name for o in self.sessions["query_encoder"].get_outputs()]
        found = dict(zip(names, self.sessions["query_encoder"].run(None, {k: feeds[k] for k in self.inputs["query_encoder"]})))
        return {**found, "query_box": box, **tok}

    def score(self, images: dict[str, np.ndarray], query: dict[str, np.ndarray], image_sizes: np.ndarray,
              chunk: int | None = None, stop: "Stop | None" = None) -> dict[str, np.ndarray]:
        """Candidates' ``encode_images`` output, the ``encode_query`` output and the candidates' original
        (h, w) [N, 2] -> {"boxes" [N, 4] pixel xyxy, "scores" [N], "top_boxes", "top_probs", "top_similarity"[, "top_class_match"]}.
        ``chunk``: candidates per scorer call (default: ``self.chunk``, by provider). ``stop``: a ``Stop``
        whose ``set()`` ends the scoring early (``Stopped``): no further call starts and calls in flight
        are terminated by onnxruntime."""
        n = len(images["features"])
        sizes = np.asarray(image_sizes, dtype=np.int64).reshape(n, 2)
        names = self.inputs["scorer"]
        chunk = int(chunk or self.chunk)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")

        def run(s: int) -> list[np.ndarray]:
            feeds = {**{k: images[k][s : s + chunk] for k in self.image_arrays}, "image_sizes": sizes[s : s + chunk], **query}
            if stop is None:
                return self.sessions["scorer"].run(None, {k: feeds[k] for k in names})
            with stop.call() as opts:
                try:
                    return self.sessions["scorer"].run(None, {k: feeds[k] for k in names}, opts)
                except Exception:
                    if stop.is_set():
                        raise Stopped("scoring stopped") from None
                    raise

        starts = range(0, n, chunk)
        parts = list(self._pool.map(run, starts)) if self._pool is not None and n > chunk else [run(s) for s in starts]
        keys = [o.name for o in self.sessions["scorer"].get_outputs()]
        return {k: np.concatenate([p[i] for p in parts]) for i, k in enumerate(keys)}


class Stopped(RuntimeError):
    """Scoring ended early because its ``Stop`` was set."""


class Stop:
    """Ends a scoring early from another thread: ``set()`` refuses every further scorer call and
    terminates the calls in flight (onnxruntime's ``RunOptions.terminate``)."""

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._running: set = set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        with self._lock:
            self._event.set()
            for opts in self._running:
                opts.terminate = True

    @contextmanager
    def call(self):
        """RunOptions for one scorer call, terminated if ``set()`` comes while it runs."""
        import onnxruntime as ort

        opts = ort.RunOptions()
        with self._lock:
            if self._event.is_set():
                raise Stopped("scoring stopped")
            self._running.add(opts)
        try:
            yield opts
        finally:
            with self._lock:
                self._running.discard(opts)


class OnnxARDMethod:
    """An ``OnnxDetector`` as a method of the evaluation harness (``ardetect.evaluation.harness``):
    the same candidates, preprocessing and ranking as ``ARDMethod``, scored by the exported graphs."""

    region_level = True

    def __init__(self, detector: OnnxDetector, data_root: Path, name: str = "ARD (ONNX)", batch: int = 64, features: dict | None = None,
                 queries: dict | None = None):
        self.detector, self.root, self.name, self.batch = detector, Path(data_root), name, batch
        # image path -> ({image encoder output: array}, original size), and query -> its encoding: ``features`` and
        # ``queries`` share them between detectors with the same encoders (scorer variants of one export)
        self._features: dict[str, tuple[dict[str, np.ndarray], tuple[int, int]]] = {} if features is None else features
        self._queries: dict[tuple, dict[str, np.ndarray]] = {} if queries is None else queries

    def image_features(self, paths: list[str]) -> dict[str, np.ndarray]:
        missing = list(dict.fromkeys(p for p in paths if p not in self._features))
        for s in range(0, len(missing), self.batch):
            part = missing[s : s + self.batch]
            prepared = [prepare_image(self.root / p, self.detector.size) for p in part]
            enc = self.detector.encode_images(np.stack([a for a, _ in prepared]))
            for i, p in enumerate(part):
                self._features[p] = ({k: v[i] for k, v in enc.items()}, prepared[i][1])
        rows = [self._features[p] for p in paths]
        return {**{k: np.stack([r[0][k] for r in rows]) for k in rows[0][0]}, "sizes": np.array([r[1] for r in rows], dtype=np.int64)}

    def score(self, query, candidates: list[str]):
        from ardetect.evaluation.harness import Scores

        key = (str(query["query_image"]), tuple(float(v) for v in query["query_box"]), query["prompt"], query["concept_phrase"])
        if key not in self._queries:
            self._queries[key] = self.detector.encode_query(self.root / key[0], key[1], key[2], key[3])
        q = self._queries[key]
        feats = self.image_features(list(candidates))
        out = self.detector.score(feats, q, feats["sizes"])
        return Scores(out["scores"].astype(np.float64), out["boxes"].astype(np.float64))
