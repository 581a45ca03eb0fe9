"""Set criterion: token-level sigmoid focal loss, L1 and GIoU on matched queries.

Negatives (phase 2) are images with no target: every token target is 0, so their
focal loss pushes all query-token similarities down. Auxiliary losses repeat the
same terms on every intermediate decoder layer and on the encoder proposals.

``region_contrast`` (phase 1, optional, weight ``weight_align``) is our addition for
detectors trained from scratch: it pulls each query region token towards the same
pooling of its target region and away from the other positives' target regions in the
batch, so that identity features form long before the detection losses alone find them.
With ``align_negatives`` = k > 0 the regions at the detector's k most probable boxes
away from each target region (other objects of the target image, same-class
distractors among them) join as further negatives: a batch of 4 alone offers 3.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from ardetect.train.matcher import HungarianMatcher, Target


class SetCriterion(torch.nn.Module):
    def __init__(
        self,
        matcher: HungarianMatcher,
        weight_class: float = 2.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        weight_align: float = 0.0,
        align_temperature: float = 0.1,
        align_negatives: int = 0,
        weight_rank: float = 0.0,
        rank_grid: int = 4,
        rank_identity_weight: float = 5.0,
        rank_top_k: int = 5,
    ):
        super().__init__()
        self.matcher = matcher
        self.weights = {
            "loss_class": weight_class, "loss_bbox": weight_bbox, "loss_giou": weight_giou, "loss_align": weight_align, "loss_rank": weight_rank,
        }
        self.rank_settings = (rank_grid, rank_identity_weight, rank_top_k)
        self.alpha, self.gamma = alpha, gamma
        self.align_temperature = align_temperature
        if align_negatives < 0:
            raise ValueError(f"align_negatives={align_negatives} must be >= 0")
        self.align_negatives = align_negatives if weight_align > 0 else 0

    @property
    def uses_align(self) -> bool:
        """Whether the criterion wants ``outputs["align"]`` (region contrast weighted above 0)."""
        return self.weights["loss_align"] > 0

    @property
    def rank_inputs(self) -> tuple[int, float, int] | None:
        """(grid, identity weight, top k) of the ``outputs["rank"]`` the criterion wants, or None (weight 0)."""
        return self.rank_settings if self.weights["loss_rank"] > 0 else None

    def single(self, logits: Tensor, boxes: Tensor, token_mask: Tensor, targets: list[Target], num_boxes: float) -> dict[str, Tensor]:
        """Losses of one prediction set: logits [B, Q, T], boxes [B, Q, 4], token_mask [B, T] (True = real token)."""
        B, Q, T = logits.shape
        indices = self.matcher(logits, boxes, targets)
        target_cls = torch.zeros_like(logits)  # [B, Q, T]
        for b, (qi, ti) in enumerate(indices):
            if len(qi):
                target_cls[b, qi] = targets[b].token_map[ti, :T].to(logits.dtype)
        focal = sigmoid_focal_loss(logits, target_cls, alpha=self.alpha, gamma=self.gamma, reduction="none")
        valid = token_mask[:, None, :].to(focal.dtype)  # [B, 1, T]
        loss_class = (focal * valid).sum() / num_boxes
        src = torch.cat([boxes[b, qi] for b, (qi, _) in enumerate(indices)])  # [M, 4]
        tgt = torch.cat([targets[b].boxes[ti] for b, (_, ti) in enumerate(indices)]).to(src.dtype)  # [M, 4]
        if len(src):
            loss_bbox = torch.nn.functional.l1_loss(src, tgt, reduction="sum") / num_boxes
            giou = generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
            loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
        else:  # negatives only: no box terms, but keep the graph connected
            loss_bbox = boxes.sum() * 0.0
            loss_giou = boxes.sum() * 0.0
        return {"loss_class": loss_class, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: Mapping, targets: list[Target], token_mask: Tensor) -> dict[str, Tensor]:
        """``outputs``: pred_logits, pred_boxes, and optionally aux_outputs (list) and enc_outputs (dict).

        Returns every unweighted term (suffix ``_<i>`` for decoder layer i, ``_enc`` for the
        encoder) and ``loss``, their weighted sum.
        """
        num_boxes = float(max(sum(len(t.boxes) for t in targets), 1))
        losses = self.single(outputs["pred_logits"], outputs["pred_boxes"], token_mask, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            for k, v in self.single(aux["pred_logits"], aux["pred_boxes"], token_mask, targets, num_boxes).items():
                losses[f"{k}_{i}"] = v
        enc = outputs.get("enc_outputs")
        if enc:
            for k, v in self.single(enc["pred_logits"], enc["pred_boxes"], token_mask, targets, num_boxes).items():
                losses[f"{k}_enc"] = v
        if self.uses_align and outputs.get("align") is not None:
            query_regions, target_regions, same, others = outputs["align"]
            losses["loss_align"] = region_contrast(query_regions, target_regions, same, self.align_temperature, others)
        if self.rank_inputs is not None and outputs.get("rank") is not None:
            losses["loss_rank"] = ranking_loss(*outputs["rank"])
        total = sum(self.weights[k.rsplit("_", 1)[0] if k not in self.weights else k] * v for k, v in losses.items())
        losses["loss"] = total
        return losses


def orthogonality(weight: Tensor) -> Tensor:
    """‖W Wᵀ − I‖_F (Frobenius, not squared), the adapters' regulariser."""
    eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return torch.linalg.matrix_norm(weight @ weight.t() - eye, ord="fro")


def adapter_regulariser(w_query: Tensor, w_prompt: Tensor) -> Tensor:
    """½(‖FFᵀ − I‖_F + ‖F̃F̃ᵀ − I‖_F), biases excluded (ARD eq. 3)."""
    return 0.5 * (orthogonality(w_query) + orthogonality(w_prompt))


def region_contrast(
    query_regions: Tensor, target_regions: Tensor, same: Tensor, temperature: float = 0.1, extra_negatives: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE between M query region tokens and their M target regions ([M, D] each).

    Pair i is the positive of row i; pairs of the same concept (``same`` [M, M], True on
    the diagonal) are left out of the negatives. Cosine similarity over ``temperature``.
    ``extra_negatives`` [E, D] are further regions known to show none of the concepts
    (other objects of the target images): negatives of every query region, in the
    query-to-target direction.
    """
    m = query_regions.shape[0]
    n_extra = 0 if extra_negatives is None else extra_negatives.shape[0]
    if m < 2 and not n_extra:
        return query_regions.sum() * 0.0 + target_regions.sum() * 0.0  # no negatives: nothing to contrast
    q = torch.nn.functional.normalize(query_regions.float(), dim=-1)
    t = torch.nn.functional.normalize(target_regions.float(), dim=-1)
    logits = q @ t.T / temperature  # [M, M]
    eye = torch.eye(m, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same.to(logits.device) & ~eye, float("-inf"))
    labels = torch.arange(m, device=logits.device)
    rows = logits if not n_extra else torch.cat([logits, q @ torch.nn.functional.normalize(extra_negatives.float(), dim=-1).T / temperature], 1)  # [M, M + E]
    return 0.5 * (torch.nn.functional.cross_entropy(rows, labels) + torch.nn.functional.cross_entropy(logits.T, labels))


def ranking_loss(scores: Tensor, group: Tensor, positive: Tensor) -> Tensor:
    """Cross-entropy of ranking each group's positive image first among the group's images by
    ``scores`` [B] (log attribution scores; -inf = not rankable). Mean over groups with a
    finite positive score and at least one other image; 0 when there is none."""
    terms = []
    for g in torch.unique(group):
        mine = group == g
        row, pos = scores[mine], positive[mine]
        if int(pos.sum()) != 1 or len(row) < 2 or not bool(torch.isfinite(row[pos]).all()):
            continue
        terms.append(torch.logsumexp(row, 0) - row[pos][0])
    if not terms:
        return scores.masked_fill(~torch.isfinite(scores), 0.0).sum() * 0.0
    return torch.stack(terms).mean()
