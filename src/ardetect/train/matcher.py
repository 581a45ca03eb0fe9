"""Hungarian matching of decoder queries to target regions (DETR / GroundingDINO style).

Cost = w_class * token-level focal cost + w_bbox * L1(cxcywh) + w_giou * (-GIoU),
solved per image with ``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou


@dataclass
class Target:
    """Ground truth of one image.

    boxes: [n, 4] normalised cxcywh; token_map: [n, T] (1 on the tokens that name the
    region: the concept's words and region tokens). n = 0 for a negative image.
    """

    boxes: Tensor
    token_map: Tensor

    def __post_init__(self) -> None:
        if self.boxes.ndim != 2 or self.boxes.shape[-1] != 4:
            raise ValueError(f"Target.boxes must be [n, 4], got {tuple(self.boxes.shape)}")
        if self.token_map.ndim != 2 or self.token_map.shape[0] != self.boxes.shape[0]:
            raise ValueError(
                f"Target.token_map must be [n, T] with n={self.boxes.shape[0]}, got {tuple(self.token_map.shape)}"
            )


def focal_token_cost(logits: Tensor, token_map: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Class cost of every query against every target: [Nq, T] x [Nt, T] -> [Nq, Nt]."""
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    norm = token_map / token_map.sum(-1, keepdim=True).clamp(min=1)  # average over the target's tokens
    return (pos - neg) @ norm.t()


class HungarianMatcher(torch.nn.Module):
    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[Target]) -> list[tuple[Tensor, Tensor]]:
        """pred_logits [B, Q, T], pred_boxes [B, Q, 4] (normalised cxcywh) -> per image (query idx, target idx)."""
        B, Q, T = pred_logits.shape
        if len(targets) != B:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {B}")
        sizes = [len(t.boxes) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64, device=pred_logits.device)
            return [(empty, empty) for _ in targets]
        logits = pred_logits.flatten(0, 1).float()  # [B*Q, T]
        boxes = pred_boxes.flatten(0, 1).float()  # [B*Q, 4]
        tgt_boxes = torch.cat([t.boxes for t in targets]).float()  # [Nt, 4]
        tgt_map = torch.cat([t.token_map[:, :T] for t in targets]).float()  # [Nt, T]
        cost = (
            self.cost_class * focal_token_cost(logits, tgt_map, self.alpha, self.gamma)
            + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
            - self.cost_giou
            * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        )
        cost = cost.view(B, Q, -1).cpu()  # [B, Q, Nt]
        out = []
        for b, block in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(block[b].numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64, device=pred_logits.device),
                        torch.as_tensor(cols, dtype=torch.int64, device=pred_logits.device)))
        return out
