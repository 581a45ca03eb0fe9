"""ARD as a method of the evaluation harness.

The query side (text, region token) is encoded once per query; each candidate's
query-independent side (backbone and input projections, ``encode_images``) is computed
once per image and kept, so the training images every query of a split shares go
through the backbone once; candidates are scored in batches.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ardetect.data.datasets import build_transform, load_rgb, transform_with_box
from ardetect.evaluation.harness import Scores


class ARDMethod:
    region_level = True

    def __init__(
        self, model, data_root: Path, image_size: int, name: str = "ARD", batch: int = 64, device: str = "cpu", max_cached: int = 4096
    ):
        self.model = model.eval()
        self.name = name
        self.root = Path(data_root)
        self.size = image_size
        self.batch = batch
        self.device = device
        self.transform = build_transform(train=False, size=image_size)
        self._image = lru_cache(maxsize=max_cached)(self._load)
        self._features: dict[str, object] = {}  # image path -> ImageCache of batch 1
        self.max_cached = max_cached

    def _load(self, rel: str) -> tuple[torch.Tensor, tuple[int, int]]:
        img = load_rgb(self.root / rel)
        tensor, _ = transform_with_box(self.transform, img, [0, 0, 1, 1])
        return tensor, (img.height, img.width)

    @torch.no_grad()
    def image_features(self, paths: list[str]):
        """``ImageCache`` of ``paths`` in order; images not seen before go through the backbone in batches."""
        from ardetect.model import ImageCache

        found = {p: self._features[p] for p in paths if p in self._features}
        missing = list(dict.fromkeys(p for p in paths if p not in found))
        for s in range(0, len(missing), self.batch):
            part = missing[s : s + self.batch]
            images = torch.stack([self._image(p)[0] for p in part]).to(self.device)  # [b, 3, S, S]
            enc = self.model.encode_images(images)
            for i, p in enumerate(part):
                found[p] = enc.select(slice(i, i + 1))
                if len(self._features) >= self.max_cached:  # the oldest entry makes room
                    self._features.pop(next(iter(self._features)))
                self._features[p] = found[p]
        return ImageCache.cat([found[p] for p in paths])

    def _inputs(self, query: pd.Series, candidates: list[str]):
        q_img, q_box = transform_with_box(self.transform, load_rgb(self.root / query["query_image"]), query["query_box"])
        cache = self.model.encode_query(q_img[None].to(self.device), q_box[None].to(self.device), [query["prompt"]], [query["concept_phrase"]])
        sizes = torch.tensor([self._image(c)[1] for c in candidates], device=self.device)  # [C, 2] (h, w) of each original image
        return self.image_features(candidates), cache, sizes

    @staticmethod
    def _scores(boxes: torch.Tensor, scores: torch.Tensor) -> Scores:
        return Scores(scores.float().cpu().numpy().astype(np.float64), boxes.float().cpu().numpy())

    @torch.no_grad()
    def score(self, query: pd.Series, candidates: list[str]) -> Scores:
        feats, cache, sizes = self._inputs(query, candidates)
        return self._scores(*self.model.predict_region(feats, cache, image_sizes=sizes, chunk_size=self.batch))

    @torch.no_grad()
    def score_variants(self, variants: dict, query: pd.Series, candidates: list[str], check: bool = True) -> dict[str, Scores]:
        """Scores of detectors that differ from this one only in their adapters, in one pass."""
        from ardetect.model import predict_region_variants

        feats, cache, sizes = self._inputs(query, candidates)
        out = predict_region_variants(self.model, variants, feats, cache, image_sizes=sizes, chunk_size=self.batch, check=check)
        return {name: self._scores(*bs) for name, bs in out.items()}


class SharedTrunkARD:
    """ARD and ARD− (or any detectors that differ only in their adapters) scored in one pass.

    ``methods()`` gives one harness method per variant; the first to see a query scores it
    for all of them and keeps the others' answers until they ask.
    """

    def __init__(self, models: dict, data_root: Path, image_size: int, batch: int = 64, device: str = "cpu"):
        from ardetect.model.detector import check_variants

        first = next(iter(models.values()))
        self.runner = ARDMethod(first, data_root, image_size, name="shared", batch=batch, device=device)
        self.models = {name: m.eval() for name, m in models.items()}
        check_variants(first, self.models)  # once, not per query
        self._pending: dict[tuple[str, str], Scores] = {}

    def _score(self, name: str, query: pd.Series, candidates: list[str]) -> Scores:
        key = (str(query["tuple_id"]), name)
        if key not in self._pending:
            for other, sc in self.runner.score_variants(self.models, query, candidates, check=False).items():
                self._pending[(key[0], other)] = sc
        return self._pending.pop(key)

    def methods(self) -> list:
        return [_Variant(self, name) for name in self.models]


class _Variant:
    region_level = True

    def __init__(self, trunk: SharedTrunkARD, name: str):
        self.trunk, self.name = trunk, name

    def score(self, query: pd.Series, candidates: list[str]) -> Scores:
        return self.trunk._score(self.name, query, candidates)
