"""Object-crop classification of the image backbone, before detection pre-training.

GroundingDINO's Swin comes to detection pre-trained on ImageNet; our randomly
initialised CNN does not, and detection losses alone teach it objectness long before
classes (measured: after an epoch of detection pre-training a linear probe on its
region features reads 6 % of the world's classes on val, 4 % by chance). This step
gives the backbone its "ImageNet" on the world itself: every object of the training
split's images, cut out with a margin and resized to ``crop`` pixels, classified into
its base class by a linear head on the backbone's coarsest map, average-pooled. The
detector's backbone goes on from these weights (and batch-norm statistics). The detector's
frozen region classifier (``ardetect.model.region_classifier``) is either a copy of them
with the head or, with ``pretrain.region_classifier_epochs``, a classification of its own
(``train_region_classifier``): a fresh backbone trained longer, on each object's exact crop
and jittered ones, as imprecise as the detector's boxes it is later given. Crops are cut
from the images at the detector's input size with the region classifier's own RoIAlign
crop, so that it classifies the boxes it is later given as it was trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ardetect.data.datasets import build_transform, load_rgb, transform_with_boxes
from ardetect.devices import device_of
from ardetect.model.region_classifier import crop_regions

log = logging.getLogger("ardetect")


def not_learned(accuracy: float, labels: torch.Tensor, lr: float, min_crops: int = 100) -> str | None:
    """The warning for a crop classification whose val accuracy is no better than naming the most
    frequent class every time (within 1.5x of it), or None. Fewer than ``min_crops`` val crops are too
    few to tell. A randomly initialised Swin at the CNN's lr (0.002) ends there: its loss settles at
    log(classes) (docs/research.md, "The GPU recipe, from scratch")."""
    if len(labels) < min_crops:
        return None
    majority = float(torch.bincount(labels.long()).max()) / len(labels)
    if accuracy > 1.5 * majority:
        return None
    return (f"the crop classification did not learn: val accuracy {accuracy:.3f}, and the most frequent class alone "
            f"scores {majority:.3f}; lr={lr:g} is likely too high for this backbone (a Swin from scratch learns at 0.0003: "
            f"pretrain.classify_lr)")


def object_crops(objects: pd.DataFrame, images: Sequence[str], data_root: Path, vocabulary: Sequence[str], crop: int, image_size: int,
                 min_area: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(crops [N, 3, crop, crop] uint8, class index [N]) of the objects of ``images`` with at least
    ``min_area`` pixels, cut (``crop_regions``) from the images resized to ``image_size``."""
    index = {c: i for i, c in enumerate(vocabulary)}
    rows = objects[objects["image"].isin(set(images)) & (objects["area"] >= min_area)]
    unknown = sorted(set(rows["base_class"].astype(str)) - set(index))
    if unknown:
        raise ValueError(f"object_crops: classes {unknown[:3]} are not in the vocabulary")
    transform = build_transform(train=False, size=image_size)
    crops, labels = [], []
    for image, group in rows.groupby("image", sort=True):
        picture, boxes = transform_with_boxes(transform, load_rgb(Path(data_root) / image), np.stack(group["box"].to_numpy()).astype(np.float32))
        part = crop_regions(picture[None], boxes[None].float(), crop)  # [n, 3, crop, crop] in [0, 1]
        crops.append((part * 255).round().clamp(0, 255).to(torch.uint8))
        labels += [index[c] for c in group["base_class"].astype(str)]
    if not crops:
        raise ValueError("object_crops: no objects in these images")
    return torch.cat(crops), torch.tensor(labels, dtype=torch.long)


def classify_backbone(model, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None, n_classes: int,
                      epochs: int, batch_size: int, lr: float, seed: int, weight_decay: float = 1e-4) -> tuple[list[dict], torch.nn.Linear]:
    """Train ``model.backbone`` with a linear head on object crops (horizontal flips; one-cycle lr).

    Returns (one record per epoch: mean training loss and, with ``val``, the val crops' accuracy; the head).
    """
    crops, labels = train
    if len(crops) < batch_size:
        raise ValueError(f"classify_backbone: {len(crops)} crops, fewer than batch_size={batch_size}")
    backbone = model.backbone
    generator = torch.Generator().manual_seed(seed)
    was_training = backbone.training
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        backbone.eval()  # one crop through batch norm in training mode would fail on a 1x1 map
        channels = backbone(model.normalize(crops[:1].to(device_of(backbone)).float() / 255))[-1].shape[1]
        backbone.train(was_training)
        head = torch.nn.Linear(channels, n_classes)
    device = device_of(backbone)
    head = head.to(device)
    params = [p for p in backbone.parameters() if p.requires_grad]
    if not params:
        raise ValueError("classify_backbone: the image backbone is frozen (pretrained); nothing to train")
    optimizer = torch.optim.AdamW([*params, *head.parameters()], lr=lr, weight_decay=weight_decay)
    steps = len(crops) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps, pct_start=0.15)

    def logits(x: torch.Tensor) -> torch.Tensor:  # crops stay on the CPU; each batch goes to the backbone's device
        return head(backbone(model.normalize(x.to(device).float() / 255))[-1].mean((2, 3)))

    history = []
    try:
        for epoch in range(epochs):
            backbone.train()
            order = torch.randperm(len(crops), generator=generator)
            losses = []
            for s in tqdm(range(steps), desc=f"classify epoch {epoch + 1}/{epochs}", leave=False):
                pick = order[s * batch_size : (s + 1) * batch_size]
                x = crops[pick]
                flip = torch.rand(len(x), generator=generator) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                loss = torch.nn.functional.cross_entropy(logits(x), labels[pick].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
            record = {"classify_epoch": epoch + 1, "classify_loss": float(np.mean(losses))}
            if val is not None and len(val[0]):
                backbone.eval()
                with torch.no_grad():
                    hits = sum(int((logits(val[0][i : i + 256]).argmax(-1).cpu() == val[1][i : i + 256]).sum()) for i in range(0, len(val[0]), 256))
                record["val_classify_accuracy"] = hits / len(val[0])
            history.append(record)
            print("[pretrain] classify " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
    finally:
        backbone.train(was_training)
    if history and "val_classify_accuracy" in history[-1]:
        warning = not_learned(history[-1]["val_classify_accuracy"], val[1], lr)
        if warning:
            log.warning(warning)
    return history, head


def jitter_boxes(objects: pd.DataFrame, jitter: float, seed: int) -> pd.DataFrame:
    """A copy of ``objects`` whose every box has each side moved by up to ``jitter`` of the box's width (x)
    or height (y), uniformly and independently (seeded); a box keeps at least 2 pixels a side."""
    if not 0 <= jitter < 0.5:
        raise ValueError(f"jitter={jitter} must be in [0, 0.5)")
    boxes = np.stack(objects["box"].to_numpy()).astype(np.float64)
    size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, 1)  # [N, 4] w, h, w, h
    moved = boxes + np.random.default_rng(seed).uniform(-jitter, jitter, size=boxes.shape) * size
    moved[:, 2:] = np.maximum(moved[:, 2:], moved[:, :2] + 2)
    out = objects.copy()
    out["box"] = list(moved.astype(np.float32))
    return out


def train_region_classifier(model, objects: pd.DataFrame, images: Sequence[str], val: tuple[torch.Tensor, torch.Tensor] | None,
                            data_root: Path, vocabulary: Sequence[str], crop: int, image_size: int, min_area: int, epochs: int,
                            copies: int, jitter: float, batch_size: int, lr: float, seed: int, weight_decay: float = 1e-4) -> list[dict]:
    """Train ``model.region_classifier`` afresh: a randomly initialised backbone (seeded) and a linear head
    classify every object's crop, the exact box and ``copies`` - 1 jittered ones (``jitter_boxes``), for
    ``epochs`` passes over them. The global random state is left as it was, so that what trains after it
    (the detection epochs) does not depend on it. Returns the per-epoch records (``region_`` keys)."""
    from types import SimpleNamespace

    from ardetect.model.backbone import build_image_backbone

    classifier = model.region_classifier
    if classifier is None:
        raise ValueError("train_region_classifier: the model has no region classifier (add_region_classifier first)")
    sets = [object_crops(objects if c == 0 else jitter_boxes(objects, jitter, seed + c), images, data_root, vocabulary, crop, image_size,
                         min_area) for c in range(copies)]
    train = (torch.cat([s[0] for s in sets]), torch.cat([s[1] for s in sets]))
    print(f"[pretrain] region classifier: {len(train[0])} crops ({copies} a object), {epochs} epochs")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_image_backbone(model.cfg.model_copy(update={"image_pretrained": None})).to(device_of(model.backbone))
        history, head = classify_backbone(SimpleNamespace(backbone=backbone, normalize=model.normalize), train, val, len(vocabulary), epochs,
                                          batch_size, lr, seed, weight_decay)
    classifier.backbone.load_state_dict(backbone.state_dict())
    classifier.head.load_state_dict(head.state_dict())
    return [{f"region_{k}": v for k, v in r.items()} for r in history]
