"""The detector cut into the three graphs the export writes, as plain ``nn.Module`` wrappers.

- ``ImageEncoderGraph``: candidate images -> the query-independent features an index keeps
  per training image (``ARDetector.encode_images`` with the region map).
- ``QueryEncoderGraph``: query image, query box and the tokenized prompt -> the query side
  (``ARDetector.encode_query``): prompt features with the region token, and the query
  image's region map the re-ranking's descriptor is pooled from.
- ``ScorerGraph``: both sides -> each candidate's chosen box and score, and its top-k boxes.
  The identity re-ranking (weight and pooling grid fitted by ``evaluate``) is part of the
  graph, through the same ``top_regions`` and ``RegionCandidates.pick`` the evaluation uses.

Candidate images are square and unpadded (the pipeline resizes every image to the model's
size), so the padding mask is all ones and the position embeddings are the same for every
image: the scorer holds them as a constant instead of the index storing them per image.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ardetect.model.detector import ImageCache, QueryCache

# names of the tokenized prompt's arrays, as ``TokenizedPrompts`` holds them (the query encoder's inputs)
TOKEN_INPUTS = (
    "input_ids", "text_self_mask", "text_position_ids", "gather_index",
    "token_mask", "self_attn_mask", "position_ids", "concept_mask", "region_mask",
)
# the prompt arrays the scorer reads (the detector's prompt layout)
PROMPT_INPUTS = ("token_mask", "self_attn_mask", "position_ids", "concept_mask", "region_mask")


def image_outputs(model) -> list[str]:
    """The arrays the image encoder gives per image (and an index keeps): ``pixels`` too when the
    detector has a region classifier (it crops the scorer's boxes from them)."""
    return ["features", "region_map", *(["pixels"] if model.region_classifier is not None else [])]


def query_outputs(model) -> list[str]:
    return ["text", "query_region_map", *(["query_class"] if model.region_classifier is not None else [])]


class ImageEncoderGraph(nn.Module):
    """images [N, 3, S, S] in [0, 1] -> features [N, L, D] (projected, all levels), region_map [N, D, S/8, S/8]
    (and, with a region classifier, pixels [N, 3, S, S]: the images, which the scorer crops)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        cache = self.model.encode_images(images, region_map=True)
        return (cache.features, cache.region_map) + ((images + 0.0,) if cache.pixels is not None else ())


class QueryEncoderGraph(nn.Module):
    """query image [B, 3, S, S], query box [B, 4] (pixel xyxy in it) and the tokenized prompt
    (``TOKEN_INPUTS``) -> prompt features [B, T, D] and the query image's region map [B, D, S/8, S/8]
    (and, with a region classifier, query_class [B, C]: the class probabilities of the query box)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, query_image: Tensor, query_box: Tensor, input_ids: Tensor, text_self_mask: Tensor, text_position_ids: Tensor,
                gather_index: Tensor, token_mask: Tensor, self_attn_mask: Tensor, position_ids: Tensor, concept_mask: Tensor,
                region_mask: Tensor) -> tuple[Tensor, ...]:
        from ardetect.model.text import TokenizedPrompts

        m = self.model
        tok = TokenizedPrompts(input_ids, torch.ones_like(input_ids), text_self_mask, text_position_ids, gather_index, token_mask,
                               self_attn_mask, position_ids, concept_mask, region_mask, 1)
        text = m._run_text_backbone(tok)  # [B, L, D]
        rmap = m.region_map(m.image_features(query_image, query=True))  # [B, D, h, w]
        region = m.pool_map(rmap, query_box[:, None])  # [B, 1, D]
        source = torch.cat([text, region.to(text.dtype)], 1)
        features = torch.gather(source, 1, gather_index[..., None].expand(-1, -1, source.shape[-1]))  # [B, T, D]
        if m.region_classifier is None:
            return features, rmap
        return features, rmap, m.region_classifier(query_image, query_box[:, None])[:, 0]


class ScorerGraph(nn.Module):
    """Candidates' features and region maps (``ImageEncoderGraph``), their original sizes [N, 2]
    (h, w), and one query (batch 1: ``QueryEncoderGraph``'s outputs, its box and prompt arrays) ->
    boxes [N, 4] pixel xyxy, scores [N], top_boxes [N, K, 4], top_probs [N, K], top_similarity [N, K]
    (and top_class_match [N, K] with ``class_weight`` > 0).

    ``identity_weight`` 0 is the paper's score (the most probable box); above 0 the identity
    re-ranking over the ``top_k`` boxes with descriptors pooled on ``grid`` x ``grid`` cells.
    ``class_weight`` > 0 (a detector with a region classifier) also weighs each box's class match
    to the query region; the scorer then reads the candidates' ``pixels`` and the ``query_class``.
    """

    def __init__(self, model, identity_weight: float, grid: int, top_k: int, image_size: int, class_weight: float = 0.0):
        super().__init__()
        if class_weight > 0 and model.region_classifier is None:
            raise ValueError(f"class_weight={class_weight}: this detector has no region classifier")
        self.model = model
        self.class_weight = float(class_weight)
        self.identity_weight = float(identity_weight)
        self.grid = int(grid)
        self.top_k = int(top_k)
        with torch.no_grad():  # the unpadded layout's constants: padding mask, positions, valid ratios
            probe = model.encode_images(torch.zeros(2, 3, image_size, image_size)).select(slice(0, 1))  # (2: GroupNorm of a 1x1 level needs it)
        self.shapes = probe.shapes
        self.image_size = probe.image_size
        self.register_buffer("pos", probe.pos, persistent=False)  # [1, L, D]
        self.register_buffer("valid_ratios", probe.valid_ratios, persistent=False)  # [1, levels, 2]

    def forward(self, features: Tensor, region_map: Tensor, image_sizes: Tensor, text: Tensor, query_region_map: Tensor,
                query_box: Tensor, token_mask: Tensor, self_attn_mask: Tensor, position_ids: Tensor, concept_mask: Tensor,
                region_mask: Tensor, pixels: Tensor | None = None, query_class: Tensor | None = None) -> tuple[Tensor, ...]:
        from ardetect.model.detector import ARDetector, class_match

        n = features.shape[0]
        images = ImageCache(
            features, torch.ones(features.shape[:2], dtype=torch.bool, device=features.device), self.pos.expand(n, -1, -1),
            self.shapes, self.valid_ratios, self.image_size, region_map,  # [1, L, 2] broadcasts: reference points fold to constants
            pixels if self.class_weight > 0 else None,
        )
        query = QueryCache(text, token_mask, self_attn_mask, position_ids, concept_mask, region_mask, None, query_region_map, query_box,
                           query_class if self.class_weight > 0 else None)
        query = query.expand(n)
        out = self.model(images, query)
        found = ARDetector.top_regions(out.pred_logits, out, image_sizes, self.top_k, images, query, grids=(self.grid,))
        if self.class_weight > 0:
            found.class_match = class_match(self.model, images, query, [found.boxes], image_sizes)[0]
        boxes, scores = found.pick(self.identity_weight, self.grid, self.class_weight)
        extra = (found.class_match,) if self.class_weight > 0 else ()
        return (boxes, scores, found.boxes, found.prob, found.similarity[self.grid], *extra)
