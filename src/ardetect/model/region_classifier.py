"""The region classifier: the base class of a box, read from its crop of the image.

Our nano detector, trained from nothing in minutes, learns where objects are long
before it learns which class they are across images (docs/research.md, "Where the class
grounding stops"): its backbone names 77 % of object crops but, inside whole images, a
probe on its region features names 11-25 %. An object-crop classifier (``ardetect.train.classify``:
the one that gives the backbone its start, or by default one trained on its own, longer and
on jittered boxes too) is kept whole here, backbone and head, and used as a second stage,
as R-CNN classifies its proposals: each box is cut
out of the image with a margin (RoIAlign on the pixels), resized to ``crop`` pixels and
classified. The identity re-ranking reads it as one more factor: how likely a box and
the query region are the same class (``RegionCandidates.pick``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

MARGIN = 0.1  # context around each box, a fraction of its longer side


def crop_regions(images: Tensor, boxes: Tensor, crop: int, batch_index: Tensor | None = None) -> Tensor:
    """Crops of ``boxes`` (pixel xyxy in ``images``), each widened by ``MARGIN`` of its longer side and
    resampled to ``crop`` x ``crop`` (bilinear RoIAlign; outside the image reads 0).

    ``images`` [N, 3, H, W]; ``boxes`` [N, K, 4] (crops [N*K, 3, crop, crop], image-major) or, with
    ``batch_index`` [M] naming each box's image, [M, 4] (crops [M, 3, crop, crop]).
    """
    if batch_index is None:
        n, k = boxes.shape[:2]
        batch_index = torch.arange(n, device=boxes.device).repeat_interleave(k)
        boxes = boxes.reshape(n * k, 4)
    boxes = boxes.float()
    side = (boxes[:, 2:] - boxes[:, :2]).amax(-1, keepdim=True)  # [M, 1]
    wide = boxes + MARGIN * side * torch.tensor([-1.0, -1.0, 1.0, 1.0], device=boxes.device)
    rois = torch.cat([batch_index[:, None].to(wide.dtype), wide], 1)
    return roi_align(images.float(), rois, output_size=crop, spatial_scale=1.0, sampling_ratio=2, aligned=True)


class RegionClassifier(nn.Module):
    """An image backbone and a linear head over its coarsest map, average-pooled, on box crops.

    Frozen: it is trained once, on the training split's object crops (``pretrain``), and
    only read afterwards; it stays in eval mode whatever ``train()`` is asked.
    """

    def __init__(self, backbone: nn.Module, n_classes: int, crop: int, pixel_mean, pixel_std):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"region classifier: n_classes={n_classes}, need at least 2")
        if crop < 16:
            raise ValueError(f"region classifier: crop={crop} pixels, need at least 16")
        self.backbone = backbone
        self.head = nn.Linear(backbone.channels[-1], n_classes)
        self.crop = int(crop)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "RegionClassifier":
        return super().train(False)

    def logits(self, crops: Tensor) -> Tensor:
        """[M, 3, crop, crop] crops in [0, 1] -> [M, C] class logits (in the classifier's dtype: a model cast to bf16
        gets fp32 crops from ``crop_regions``)."""
        crops = crops.to(self.pixel_mean.dtype)
        return self.head(self.backbone((crops - self.pixel_mean) / self.pixel_std)[-1].mean((2, 3)))

    def forward(self, images: Tensor, boxes: Tensor, batch_index: Tensor | None = None) -> Tensor:
        """Class probabilities of boxes (``crop_regions``' layouts): [N, K, C], or [M, C] with ``batch_index``."""
        probs = self.logits(crop_regions(images, boxes, self.crop, batch_index)).softmax(-1)
        return probs if batch_index is not None else probs.view(*boxes.shape[:2], -1)
