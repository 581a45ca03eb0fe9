"""Concept boxes by GroundingDINO and masks by SAM, prompted by those boxes."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.ops import nms

from ardetect.generation.models import GroundingDino


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # xyxy pixels, inside the image
    score: float
    label: str  # the words GroundingDINO tied the box to


def detect(gd: GroundingDino, image: Image.Image, phrase: str, box_threshold: float, text_threshold: float,
           nms_iou: float = 0.5) -> list[Detection]:
    """Boxes of ``phrase`` in ``image``, highest score first, after NMS; only boxes tied to a word of ``phrase``."""
    text = phrase.lower().strip().rstrip(".") + "."  # GroundingDINO reads lower-case phrases ending in "."
    inputs = gd.processor(images=image.convert("RGB"), text=text, return_tensors="pt").to(gd.device)
    with torch.no_grad():
        outputs = gd.model(**inputs)
    res = gd.processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=box_threshold, text_threshold=text_threshold,
        target_sizes=[(image.height, image.width)],
    )[0]
    boxes, scores = res["boxes"].float().cpu(), res["scores"].float().cpu()  # [n, 4], [n]
    labels = res["text_labels"] if "text_labels" in res else res["labels"]
    if len(boxes) == 0:
        return []
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
    words = set(re.findall(r"[a-z0-9]+", phrase.lower()))
    keep_ok = [
        i for i in range(len(boxes))
        if boxes[i, 2] - boxes[i, 0] >= 1 and boxes[i, 3] - boxes[i, 1] >= 1
        and words & set(re.findall(r"[a-z0-9]+", str(labels[i]).lower()))
    ]
    if not keep_ok:
        return []
    idx = torch.tensor(keep_ok)
    kept = idx[nms(boxes[idx], scores[idx], nms_iou)]  # sorted by score, high first
    return [Detection(tuple(float(v) for v in boxes[i].tolist()), float(scores[i]), str(labels[i])) for i in kept.tolist()]


_SAM_LOCK = threading.Lock()


def segment(predictor, image: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> list[np.ndarray]:
    """SAM's mask for each box (bool [H, W]), cut to the box it was prompted with."""
    if not boxes:
        return []
    with _SAM_LOCK:  # a predictor holds one image at a time: thread workers sharing it take turns
        predictor.set_image(np.ascontiguousarray(image))
        found = [predictor.predict(box=np.asarray(box, dtype=np.float32), multimask_output=False)[0] for box in boxes]  # [1, H, W] each
    h, w = image.shape[:2]
    out = []
    for box, masks in zip(boxes, found):
        x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
        x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
        inside = np.zeros((h, w), dtype=bool)
        inside[y0:y1, x0:x1] = True
        out.append(masks[0].astype(bool) & inside)
    return out


def label_map(masks: list[np.ndarray]) -> np.ndarray:
    """uint8 [H, W]: object k (1-based, list order) where its mask is and no earlier object's is."""
    if len(masks) > 255:
        raise ValueError(f"{len(masks)} objects do not fit an 8-bit label map")
    labels = np.zeros(masks[0].shape, dtype=np.uint8)
    for k, m in enumerate(masks, start=1):
        labels[m & (labels == 0)] = k
    return labels


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """xyxy box of a bool mask (pixel edges, as the quality gate measures it); None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
