"""ARD as a method of the evaluation harness: query side encoded once, candidates batched."""

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

    def __init__(self, model, data_root: Path, image_size: int, name: str = "ARD", batch: int = 64, device: str = "cpu"):
        self.model = model.eval()
        self.name = name
        self.root = Path(data_root)
        self.size = image_size
        self.batch = batch
        self.device = device
        self.transform = build_transform(train=False, size=image_size)
        self._image = lru_cache(maxsize=4096)(self._load)

    def _load(self, rel: str) -> tuple[torch.Tensor, tuple[int, int]]:
        img = load_rgb(self.root / rel)
        tensor, _ = transform_with_box(self.transform, img, [0, 0, 1, 1])
        return tensor, (img.height, img.width)

    @torch.no_grad()
    def score(self, query: pd.Series, candidates: list[str]) -> Scores:
        q_img, q_box = transform_with_box(self.transform, load_rgb(self.root / query["query_image"]), query["query_box"])
        cache = self.model.encode_query(q_img[None].to(self.device), q_box[None].to(self.device), [query["prompt"]], [query["concept_phrase"]])
        loaded = [self._image(c) for c in candidates]
        images = torch.stack([t for t, _ in loaded]).to(self.device)
        sizes = torch.tensor([s for _, s in loaded], device=self.device)  # [C, 2] (h, w) of each original image
        boxes, scores = self.model.predict_region(images, cache, image_sizes=sizes, chunk_size=self.batch)
        return Scores(scores.float().cpu().numpy().astype(np.float64), boxes.float().cpu().numpy())
