"""Pure box functions, named by box format. torchvision.ops does the work where it can.

Formats: ``xyxy`` (x0, y0, x1, y1), ``cxcywh`` (centre, width, height); ``_norm`` means
divided by the image width/height (values in [0, 1]), otherwise pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou, generalized_box_iou

__all__ = [
    "box_iou",
    "generalized_box_iou",
    "cxcywh_to_xyxy",
    "xyxy_to_cxcywh",
    "cxcywh_norm_to_xyxy_pixels",
    "xyxy_pixels_to_cxcywh_norm",
    "check_boxes_in_image",
]


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def _wh_scale(image_sizes: Tensor) -> Tensor:
    """[N, 2] (height, width) -> [N, 4] (w, h, w, h)."""
    h, w = image_sizes.unbind(-1)
    return torch.stack([w, h, w, h], dim=-1).to(torch.float32)


def cxcywh_norm_to_xyxy_pixels(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """[..., 4] normalised cxcywh -> pixel xyxy, ``image_sizes`` [N, 2] (height, width) matching the leading dim."""
    scale = _wh_scale(image_sizes)  # [N, 4]
    while scale.dim() < boxes.dim():
        scale = scale.unsqueeze(-2)
    return cxcywh_to_xyxy(boxes.float()) * scale


def xyxy_pixels_to_cxcywh_norm(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """[N, 4] pixel xyxy -> normalised cxcywh, ``image_sizes`` [N, 2] (height, width)."""
    return xyxy_to_cxcywh(boxes.float() / _wh_scale(image_sizes))


def check_boxes_in_image(boxes: Tensor, height: int, width: int, name: str = "box", tol: float = 1e-3) -> None:
    """Raise ``ValueError`` unless every [N, 4] pixel xyxy box lies inside an ``height`` x ``width`` image and has area."""
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] (pixel xyxy), got {list(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{name} holds non-finite values: {boxes.tolist()}")
    x0, y0, x1, y1 = boxes.unbind(-1)
    for i in range(boxes.shape[0]):
        b = [round(float(v), 2) for v in boxes[i]]
        if not (x1[i] > x0[i] and y1[i] > y0[i]):
            raise ValueError(f"{name}[{i}]={b} is degenerate: need x1 > x0 and y1 > y0 (pixel xyxy)")
        if x0[i] < -tol or y0[i] < -tol or x1[i] > width + tol or y1[i] > height + tol:
            raise ValueError(f"{name}[{i}]={b} lies outside the {width}x{height} (w x h) image")
