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

    @torch.no_grad()
    def score(self, query: pd.Series, candidates: list[str]) -> Scores:
        q_img, q_box = transform_with_box(self.transform, load_rgb(self.root / query["query_image"]), query["query_box"])
        cache = self.model.encode_query(q_img[None].to(self.device), q_box[None].to(self.device), [query["prompt"]], [query["concept_phrase"]])
        feats = self.image_features(candidates)
        sizes = torch.tensor([self._image(c)[1] for c in candidates], device=self.device)  # [C, 2] (h, w) of each original image
        boxes, scores = self.model.predict_region(feats, cache, image_sizes=sizes, chunk_size=self.batch)
        return Scores(scores.float().cpu().numpy().astype(np.float64), boxes.float().cpu().numpy())
