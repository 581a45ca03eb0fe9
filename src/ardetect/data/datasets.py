"""Torch datasets over the tuple record.

Boxes are converted once here from pixel xyxy (at rest) to what the model wants,
and every image transform moves its boxes with it (torchvision ``transforms.v2``
with ``tv_tensors.BoundingBoxes``) — the query image's box included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

def build_transform(train: bool, size: int) -> v2.Compose:
    """Resize to ``size``; when training also flip, shift/scale and jitter colour (boxes follow)."""
    ops: list = [v2.ToImage()]
    if train:
        ops += [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomAffine(degrees=0.0, translate=(0.06, 0.06), scale=(0.9, 1.1)),
            v2.ColorJitter(brightness=0.15, contrast=0.15, saturation=0.15),
        ]
    ops += [
        v2.Resize((size, size), antialias=True),
        v2.ClampBoundingBoxes(),
        v2.ToDtype(torch.float32, scale=True),  # [0, 1]; the model normalises
    ]
    return v2.Compose(ops)


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def load_uint8(path: Path) -> tv_tensors.Image:
    """[3, H, W] uint8 image tensor (decoded once; transforms run on tensors)."""
    return tv_tensors.Image(torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1).contiguous())


def transform_with_boxes(transform: v2.Compose, image, boxes_xyxy) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``transform`` to an image (PIL or [3, H, W] tensor) and its [n, 4] pixel xyxy boxes.

    Returns ([3, S, S] float in [0, 1], [n, 4] pixel xyxy in the transformed image, clamped to it).
    """
    h, w = (image.height, image.width) if isinstance(image, Image.Image) else tuple(image.shape[-2:])
    boxes = tv_tensors.BoundingBoxes(
        torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)), format="XYXY", canvas_size=(h, w)
    )
    img, out = transform(image, boxes)
    return img, out.as_subclass(torch.Tensor)


def transform_with_box(transform: v2.Compose, image, box_xyxy) -> tuple[torch.Tensor, torch.Tensor]:
    """``transform_with_boxes`` of one box: ([3, S, S] float in [0, 1], [4] pixel xyxy)."""
    img, out = transform_with_boxes(transform, image, [list(box_xyxy)])
    return img, out[0]


@dataclass
class Sample:
    """One model input: the target image X and the query side (Q, R_Q, p)."""

    image: torch.Tensor  # [3, S, S] in [0, 1]
    box: torch.Tensor  # [4] normalised cxcywh of R_X in the transformed image ([0, 4] empty for a negative)
    box_xyxy: torch.Tensor  # [4] pixel xyxy in the transformed image
    query_image: torch.Tensor  # [3, S, S]
    query_box: torch.Tensor  # [4] pixel xyxy of R_Q in the transformed query image
    prompt: str
    concept_phrase: str
    tuple_id: str
    positive: bool
    image_key: str  # the target image's path relative to the data root (same image = same concept)


class TupleDataset(torch.utils.data.Dataset):
    """Positive tuples of one split; optionally pairs a query with another training image (a negative)."""

    def __init__(self, tuples: pd.DataFrame, data_root: Path, split: str, image_size: int, train: bool):
        self.rows = tuples[tuples["split"] == split].reset_index(drop=True)
        if self.rows.empty:
            raise ValueError(f"TupleDataset: no tuples in split {split!r}")
        self.root = Path(data_root)
        self.size = image_size
        self.transform = build_transform(train, image_size)
        self._decoded: dict[str, tv_tensors.Image] = {}

    def image(self, rel: str) -> tv_tensors.Image:
        """Decoded image, kept in memory after the first read (the default world fits in ~0.3 GB)."""
        img = self._decoded.get(rel)
        if img is None:
            img = self._decoded[rel] = load_uint8(self.root / rel)
        return img

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, index: int, target_image: str | None = None) -> Sample:
        """Tuple ``index``; with ``target_image`` the query is paired with that negative image instead of X."""
        r = self.rows.iloc[index]
        q_img, q_box = transform_with_box(self.transform, self.image(r["query_image"]), r["query_box"])
        if target_image is None:
            x_img, x_box = transform_with_box(self.transform, self.image(r["train_image"]), r["train_box"])
            norm = box_convert(x_box[None], "xyxy", "cxcywh")[0] / self.size
            positive, key = True, r["train_image"]
        else:
            x_img, _ = transform_with_box(self.transform, self.image(target_image), [0, 0, 1, 1])
            x_box, norm, positive, key = torch.zeros(4), torch.zeros(0, 4), False, target_image
        return Sample(x_img, norm, x_box, q_img, q_box, r["prompt"], r["concept_phrase"], r["tuple_id"], positive, key)

    def __getitem__(self, index: int) -> Sample:
        return self.item(index)


class NegativeSampler:
    """k negatives per positive, drawn fresh every epoch from a seeded generator.

    The pool of a tuple is the training images of every other concept in its split;
    ``same_class`` of the k (ours; 0 = the paper's uniform draw) come from the concepts of
    the tuple's own base class, the hard negatives the ranking has to tell apart, as far as
    there are any. ``distractor_class`` of the k (ours; needs ``objects``, the record's
    objects table) come from images whose concept is of another class but which hold a
    distractor of the tuple's base class: the images a score that reads the class alone
    ranks with the concept's own, as far as there are any. Draws depend on (seed, epoch,
    tuple index) only, so they differ between epochs, repeat exactly when an interrupted
    run resumes, and are the same under DDP.
    """

    def __init__(self, tuples: pd.DataFrame, split: str, k: int, seed: int, same_class: int = 0, distractor_class: int = 0,
                 objects: pd.DataFrame | None = None):
        if k < 0:
            raise ValueError(f"NegativeSampler: k={k} must be >= 0")
        if same_class < 0 or distractor_class < 0 or same_class + distractor_class > k:
            raise ValueError(f"NegativeSampler: same_class={same_class} and distractor_class={distractor_class} must be >= 0 "
                             f"and add up to at most k={k}")
        if distractor_class and objects is None:
            raise ValueError(f"NegativeSampler: distractor_class={distractor_class} needs the objects table (objects=...)")
        rows = tuples[tuples["split"] == split].reset_index(drop=True)
        pool = rows.drop_duplicates("concept_id")
        self.images = pool["train_image"].to_numpy()
        self.concepts = pool["concept_id"].to_numpy()
        self.row_concepts = rows["concept_id"].to_numpy()
        if same_class or distractor_class:
            self.classes, self.row_classes = pool["base_class"].to_numpy(), rows["base_class"].to_numpy()
        if distractor_class:
            held = objects[(objects["role"] == "distractor") & objects["image"].isin(set(self.images))]
            held = held.groupby("image")["base_class"].agg(frozenset).to_dict()  # image -> classes of its distractors
            # per query class, the pool images of another class's concept that hold a distractor of it (computed once, not per draw)
            self.holding = {c: (self.classes != c) & np.array([c in held.get(i, ()) for i in self.images], dtype=bool)
                            for c in set(self.row_classes)}
        if k > len(self.images) - 1:
            raise ValueError(f"NegativeSampler: k={k} but split {split!r} has only {len(self.images) - 1} negatives per tuple")
        self.k, self.seed, self.same_class, self.distractor_class = k, seed, same_class, distractor_class

    def draw(self, index: int, epoch: int) -> list[str]:
        rng = np.random.default_rng([self.seed, epoch, index])
        allowed = self.concepts != self.row_concepts[index]
        if not (self.same_class or self.distractor_class):
            return list(self.images[rng.choice(np.flatnonzero(allowed), size=self.k, replace=False)])
        cls = self.row_classes[index]
        hard = np.zeros(0, dtype=int)
        if self.same_class:
            near = np.flatnonzero(allowed & (self.classes == cls))
            hard = rng.choice(near, size=min(self.same_class, len(near)), replace=False)
        if self.distractor_class:
            near = np.flatnonzero(allowed & self.holding[cls])
            hard = np.concatenate([hard, rng.choice(near, size=min(self.distractor_class, len(near)), replace=False)])
        rest = np.setdiff1d(np.flatnonzero(allowed), hard)
        return list(self.images[np.concatenate([hard, rng.choice(rest, size=self.k - len(hard), replace=False)])])
