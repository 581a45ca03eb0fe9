"""ARD as a method of the evaluation harness.

The query side (text, region token) is encoded once per query; each candidate's
query-independent side (backbone and input projections, ``encode_images``) is computed
once per image and kept, so the training images every query of a split shares go
through the backbone once; candidates are scored in batches.

Every query of a split ranks the same set of images (its own training image and all
the others), in its own order (the positive first). The cached features of a set are
joined into one block once, in a canonical order; each query is scored on that block
and its results put back in the query's order, instead of joining the features anew
for every query.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import asdict
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ardetect.data.datasets import build_transform, load_rgb, transform_with_box
from ardetect.devices import device_of
from ardetect.evaluation.harness import Scores
from ardetect.train.engine import save_atomic


class ARDMethod:
    """ARD through the harness. ``identity_weight`` > 0 (or ``class_weight`` > 0) scores with the identity
    re-ranking (``RegionCandidates.pick``) over the ``top_k`` most probable boxes, with region descriptors
    pooled on ``grid`` x ``grid`` cells (and the region classifier's class match); both 0 is the paper's score."""

    region_level = True

    def __init__(
        self, model, data_root: Path, image_size: int, name: str = "ARD", batch: int = 64, device: str | None = None, max_cached: int = 4096,
        identity_weight: float = 0.0, top_k: int = 5, grid: int = 1, class_weight: float = 0.0,
    ):
        self.model = model.eval()
        self.name = name
        self.root = Path(data_root)
        self.size = image_size
        self.batch = batch
        self.device = torch.device(device) if device is not None else device_of(model)  # default: the model's
        self.identity_weight = identity_weight
        self.class_weight = class_weight
        self.top_k = top_k
        self.grid = grid
        self.transform = build_transform(train=False, size=image_size)
        self._image = lru_cache(maxsize=max_cached)(self._load)
        self._features: dict[str, object] = {}  # image path -> ImageCache of batch 1
        self._blocks: dict[tuple[tuple[str, ...], bool], object] = {}  # (sorted paths, region map) -> ImageCache of them, in that order
        self.max_cached = max_cached
        self.max_blocks = 4
        self._lock = threading.Lock()  # the caches, when queries are scored side by side (SharedTrunkARD.prefetch)

    def _load(self, rel: str) -> tuple[torch.Tensor, tuple[int, int]]:
        img = load_rgb(self.root / rel)
        tensor, _ = transform_with_box(self.transform, img, [0, 0, 1, 1])
        return tensor, (img.height, img.width)

    @torch.no_grad()
    def image_features(self, paths: list[str], region_map: bool = False):
        """``ImageCache`` of ``paths`` in order; images not seen before (or seen without the
        region map that ``region_map`` asks for) go through the backbone in batches."""
        from ardetect.model import ImageCache

        found = {p: self._features[p] for p in paths if p in self._features and (not region_map or self._features[p].region_map is not None)}
        missing = list(dict.fromkeys(p for p in paths if p not in found))
        for s in range(0, len(missing), self.batch):
            part = missing[s : s + self.batch]
            images = torch.stack([self._image(p)[0] for p in part]).to(self.device)  # [b, 3, S, S]
            enc = self.model.encode_images(images, region_map=region_map)
            for i, p in enumerate(part):
                found[p] = enc.select(slice(i, i + 1))
                self._features.pop(p, None)
                if len(self._features) >= self.max_cached:  # the oldest entry makes room
                    self._features.pop(next(iter(self._features)))
                self._features[p] = found[p]
        return ImageCache.cat([found[p] for p in paths])

    def block(self, paths: list[str], region_map: bool = False):
        """(``ImageCache`` of the distinct ``paths`` in sorted order, position of each of ``paths`` in it [C]).

        The block of a set is joined once and kept (the ``max_blocks`` most recent sets)."""
        key = (tuple(sorted(set(paths))), region_map)
        with self._lock:
            found = self._blocks.pop(key, None)
            if found is None:
                found = self.image_features(list(key[0]), region_map)
                if len(self._blocks) >= self.max_blocks:
                    self._blocks.pop(next(iter(self._blocks)))
            self._blocks[key] = found  # most recent last
        where = {p: i for i, p in enumerate(key[0])}
        return found, torch.tensor([where[p] for p in paths], dtype=torch.long, device=self.device)

    def _inputs(self, query: pd.Series, candidates: list[str], region_map: bool = False, query_map: bool = False):
        """(candidate block, query cache, block image sizes [N, 2], position of each candidate in the block [C])."""
        q_img, q_box = transform_with_box(self.transform, load_rgb(self.root / query["query_image"]), query["query_box"])
        cache = self.model.encode_query(
            q_img[None].to(self.device), q_box[None].to(self.device), [query["prompt"]], [query["concept_phrase"]], region_map=query_map
        )
        feats, order = self.block(candidates, region_map)
        sizes = torch.tensor([self._image(c)[1] for c in sorted(set(candidates))], device=self.device)  # [N, 2] (h, w) of each original image
        return feats, cache, sizes, order

    @staticmethod
    def _scores(boxes: torch.Tensor, scores: torch.Tensor) -> Scores:
        return Scores(scores.float().cpu().numpy().astype(np.float64), boxes.float().cpu().numpy())

    @torch.no_grad()
    def score(self, query: pd.Series, candidates: list[str]) -> Scores:
        identity = self.identity_weight > 0 or self.class_weight > 0
        feats, cache, sizes, order = self._inputs(query, candidates, identity, identity and self.grid > 1)
        boxes, scores = self.model.predict_region(
            feats, cache, image_sizes=sizes, chunk_size=self.batch, identity_weight=self.identity_weight, top_k=self.top_k, grid=self.grid,
            class_weight=self.class_weight,
        )
        return self._scores(boxes[order], scores[order])

    @torch.no_grad()
    def candidates_variants(
        self, variants: dict, query: pd.Series, candidates: list[str], check: bool = True, identity: bool = False, grids: Sequence[int] = (1,),
        classes: bool = False,
    ) -> dict:
        """``RegionCandidates`` of detectors that differ from this one only in their adapters, in one pass."""
        from ardetect.model import predict_region_variants

        feats, cache, sizes, order = self._inputs(query, candidates, identity, identity and max(grids) > 1)
        found = predict_region_variants(
            self.model, variants, feats, cache, image_sizes=sizes, chunk_size=self.batch, check=check, top_k=self.top_k,
            identity=identity, grids=grids, classes=classes,
        )
        return {name: c.select(order) for name, c in found.items()}


class SharedTrunkARD:
    """ARD and ARD− (or any detectors that differ only in their adapters) scored in one pass.

    ``method(label, variant, identity_weight, grid, class_weight)`` gives a harness method; the first
    method to see a query runs the detector once for every variant and keeps the top boxes (with their
    region similarity for each pooling grid of ``grids`` when ``identity``, and their class match
    when ``classes``) until every method made so far has read them.
    """

    def __init__(
        self, models: dict, data_root: Path, image_size: int, batch: int = 64, device: str | None = None, top_k: int = 5, identity: bool = False,
        grids: Sequence[int] = (1,), classes: bool = False,
    ):
        from ardetect.model.detector import check_variants

        first = next(iter(models.values()))
        self.runner = ARDMethod(first, data_root, image_size, name="shared", batch=batch, device=device, top_k=top_k)
        self.models = {name: m.eval() for name, m in models.items()}
        self.identity = identity
        if classes and (not identity or first.region_classifier is None):
            raise ValueError("classes=True: the class match needs identity=True and a detector with a region classifier")
        self.classes = classes
        self.grids = tuple(dict.fromkeys(int(g) for g in grids))
        if not self.grids or min(self.grids) < 1:
            raise ValueError(f"grids={list(grids)}: give at least one pooling grid, each >= 1")
        check_variants(first, self.models)  # once, not per query
        self._labels: set[str] = set()
        self._pending: dict[tuple, tuple[dict, set[str]]] = {}  # (tuple_id, *candidates) -> (candidates of each variant, labels still to read)
        self._fingerprint: str | None = None
        self._digests: dict[str, bytes] = {}  # image path -> SHA-256 of its file (the kept blocks' names)

    def _run(self, query: pd.Series, candidates: list[str]) -> dict:
        return self.runner.candidates_variants(self.models, query, candidates, check=False, identity=self.identity, grids=self.grids,
                                               classes=self.classes)

    def prefetch(self, tuples: pd.DataFrame, negatives: pd.DataFrame, workers: int | None = None, progress: bool = True,
                 keep: Path | None = None, block: int = 32) -> None:
        """Run the detector on every query of ``tuples`` ahead of the methods reading them,
        ``workers`` queries side by side (default: one per core), each on one intra-op thread.

        On a few cores the detector's many small operations keep two intra-op threads only
        partly busy; queries scored side by side keep every core busy (``bench/bench_eval_cpu.py``).
        Every query is scored on one thread whichever worker takes it, so the scores do
        not depend on ``workers``. Make every method first: each reads its queries once.

        ``keep``: a folder where the results are written ``block`` queries at a time, and read back
        instead of scored when a later call (a stage run again after a kill) meets the same block:
        the same detectors' weights and scoring settings (a subfolder each), the same queries and
        the same candidates, their image files' bytes included (the block's name).
        """
        from ardetect.evaluation.harness import candidates_of

        cands = candidates_of(tuples, negatives)
        todo = [(q, cands[q["tuple_id"]]) for _, q in tuples.iterrows() if (str(q["tuple_id"]), *cands[q["tuple_id"]]) not in self._pending]
        if not todo:
            return
        workers = torch.get_num_threads() if workers is None else int(workers)
        if workers < 1:
            raise ValueError(f"workers={workers}: give at least 1 (or None: one per core)")
        if block < 1:
            raise ValueError(f"block={block}: give at least 1 query a block")
        labels = set(self._labels)
        parts = [todo[i : i + block] for i in range(0, len(todo), block)] if keep is not None else [todo]
        if keep is not None:
            keep = Path(keep) / self.fingerprint()
        threads = torch.get_num_threads()
        bar = tqdm(total=len(todo), desc="score queries", disable=not progress)
        read = 0
        try:
            with ThreadPoolExecutor(workers) as pool:
                for part in parts:
                    path = None if keep is None else keep / f"{self._block_key(part)}.pt"
                    found = None if path is None else _read_block(path, len(part))
                    if found is None:
                        self.runner.block(part[0][1], self.identity)  # the candidates' features, on every thread, before the workers share them
                        torch.set_num_threads(1)
                        found = []
                        for one in pool.map(lambda qc: self._run(*qc), part):
                            found.append(one)
                            bar.update(1)
                        torch.set_num_threads(threads)
                        if path is not None:
                            save_atomic([{name: asdict(c) for name, c in one.items()} for one in found], path)
                    else:
                        read += len(part)
                        bar.update(len(part))
                    for (q, c), one in zip(part, found):
                        self._pending[(str(q["tuple_id"]), *c)] = (one, set(labels))
        finally:
            torch.set_num_threads(threads)
            bar.close()
        if read:
            print(f"[evaluate] {read} of {len(todo)} queries read back from {keep} (scored by an earlier run that did not finish)")

    def fingerprint(self) -> str:
        """A digest of what the scores depend on besides the queries: every detector's weights and the scoring settings."""
        if self._fingerprint is None:
            r = self.runner
            h = hashlib.sha256(repr((r.size, r.batch, r.top_k, str(r.device), self.identity, self.grids, self.classes)).encode())
            for name in sorted(self.models):
                h.update(name.encode())
                for key, value in self.models[name].state_dict().items():
                    h.update(key.encode())
                    h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:24]
        return self._fingerprint

    def _block_key(self, part: list) -> str:
        """A block of queries' name: a digest of each query (its fields the detector reads) and its candidates, in order,
        with the bytes of every image file they name."""
        h = hashlib.sha256()
        for q, cands in part:
            fields = [str(q[k]) for k in ("tuple_id", "query_image", "query_box", "prompt", "concept_phrase")]
            h.update("\x1f".join([*fields, *map(str, cands)]).encode() + b"\x1e")
            for path in (q["query_image"], *cands):
                h.update(self._file_digest(str(path)))
        return h.hexdigest()[:24]

    def _file_digest(self, rel: str) -> bytes:
        if rel not in self._digests:
            self._digests[rel] = hashlib.sha256((self.runner.root / rel).read_bytes()).digest()
        return self._digests[rel]

    def candidates(self, label: str, variant: str, query: pd.Series, candidates: list[str]):
        key = (str(query["tuple_id"]), *candidates)
        if key not in self._pending:
            found = self._run(query, candidates)
            self._pending[key] = (found, set(self._labels))
        found, waiting = self._pending[key]
        waiting.discard(label)
        if not waiting:
            del self._pending[key]
        return found[variant]

    def method(self, label: str, variant: str, identity_weight: float = 0.0, grid: int = 1, class_weight: float = 0.0) -> "_Variant":
        if variant not in self.models:
            raise ValueError(f"variant={variant!r} is not one of {list(self.models)}")
        if class_weight > 0 and not self.classes:
            raise ValueError(f"class_weight={class_weight} needs SharedTrunkARD(..., classes=True)")
        if identity_weight > 0 and not self.identity:
            raise ValueError(f"identity_weight={identity_weight} needs SharedTrunkARD(..., identity=True)")
        if identity_weight > 0 and grid not in self.grids:  # w = 0, the paper's score, uses no grid
            raise ValueError(f"grid={grid!r} is not one of this trunk's grids {list(self.grids)}")
        if label in self._labels:
            raise ValueError(f"label={label!r} is already a method of this trunk")
        self._labels.add(label)
        return _Variant(self, label, variant, identity_weight, grid, class_weight)

    def methods(self, identity: dict[str, tuple] | None = None) -> list:
        """One method per variant, named after it, with its (identity weight, grid[, class weight]) from ``identity`` (default (0, 1, 0))."""
        chosen = identity or {}
        return [self.method(name, name, *chosen.get(name, (0.0, 1))) for name in self.models]


class _Variant:
    region_level = True

    def __init__(self, trunk: SharedTrunkARD, label: str, variant: str, identity_weight: float, grid: int = 1, class_weight: float = 0.0):
        self.trunk, self.name, self.variant, self.identity_weight, self.grid = trunk, label, variant, identity_weight, grid
        self.class_weight = class_weight

    def score(self, query: pd.Series, candidates: list[str]) -> Scores:
        found = self.trunk.candidates(self.name, self.variant, query, candidates)
        return ARDMethod._scores(*found.pick(self.identity_weight, self.grid, self.class_weight))


def fit_identity_weights(
    trunk: SharedTrunkARD, variants: Sequence[str], tuples: pd.DataFrame, negatives: pd.DataFrame, grid: Sequence[float],
    iou_threshold: float = 0.5, progress: bool = False, metric: str | Sequence[str] = "recall@10", summaries: dict | None = None,
    workers: int | None = None, class_weights: Sequence[float] = (0.0,), keep: Path | None = None,
) -> dict[str, tuple[float, int, float, dict[tuple[int, float, float], float]]]:
    """For each of ``variants``, the identity weight of ``grid`` and the pooling grid of the
    trunk's ``grids`` with the best ``metric`` (a summary key of the harness, Recall@10 by
    default, or several whose mean decides) on ``tuples`` (a validation split: never the test tuples); ties go to the coarser
    pooling grid, then to the smaller weight (w = 0 is the paper's score whatever the pooling
    grid, so it is tried once, with the coarsest grid). Each is tried with every class weight of
    ``class_weights`` (the region classifier's factor; above 0 needs a trunk made with
    ``classes=True``); ties go to the smaller class weight.

    The detector runs once per query for every variant, weight and pooling grid. Returns
    {variant: (weight, pooling grid, class weight, {(pooling grid, weight, class weight): metric (the mean of several)})};
    ``summaries``, when given, receives every combination's whole harness summary under (variant,
    grid, weight, class weight); ``workers`` queries are scored side by side (``SharedTrunkARD.prefetch``), and
    ``keep`` keeps their results for a run again after a kill (the same).
    """
    from ardetect.evaluation.harness import evaluate_method

    weights = sorted(set(float(w) for w in grid))
    if not weights:
        raise ValueError("grid is empty: give at least one identity weight")
    keys = [metric] if isinstance(metric, str) else list(metric)
    if not keys:
        raise ValueError("metric is empty: give at least one summary key")
    classes = sorted(set(float(a) for a in class_weights)) or [0.0]
    combos = [(g, w, a) for g in sorted(trunk.grids) for w in weights for a in classes if w > 0 or g == min(trunk.grids)]
    methods = {v: [trunk.method(f"{v}@fit{w:g}x{g}a{a:g}", v, w, g, a) for g, w, a in combos] for v in variants}  # all made before any runs
    trunk.prefetch(tuples, negatives, workers, progress=progress, keep=keep)
    out = {}
    for v, ms in methods.items():
        recalls = {}
        for m in ms:
            summary = evaluate_method(m, tuples, negatives, iou_threshold, progress=progress).summary
            missing = [k for k in keys if k not in summary]
            if missing:
                raise ValueError(f"metric={keys}: {missing} not among the harness summary's keys {sorted(summary)}")
            recalls[(m.grid, m.identity_weight, m.class_weight)] = float(np.mean([summary[k] for k in keys]))
            if summaries is not None:
                summaries[(v, m.grid, m.identity_weight, m.class_weight)] = summary
        g, w, a = max(recalls, key=lambda gwa: (recalls[gwa], -gwa[0], -gwa[1], -gwa[2]))
        out[v] = (w, g, a, recalls)
    return out


def _read_block(path: Path, n: int) -> list[dict] | None:
    """A kept block's ``RegionCandidates`` per query, or None when it is not there or cannot be read (it is then scored again)."""
    from ardetect.model.detector import RegionCandidates

    if not path.exists():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, list) or len(raw) != n:
            raise TypeError(f"it holds {type(raw).__name__} of {len(raw) if isinstance(raw, list) else '?'} entries, not {n} queries")
        return [{name: RegionCandidates(**fields) for name, fields in one.items()} for one in raw]
    except Exception as exc:  # noqa: BLE001 - a file cut short or overwritten: score the block again, and overwrite it
        print(f"[evaluate] kept scores {path} cannot be read ({type(exc).__name__}: {exc}); scoring its queries again")
        return None
