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


class ImageEncoderGraph(nn.Module):
    """images [N, 3, S, S] in [0, 1] -> features [N, L, D] (projected, all levels), region_map [N, D, S/8, S/8]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        cache = self.model.encode_images(images, region_map=True)
        return cache.features, cache.region_map


class QueryEncoderGraph(nn.Module):
    """query image [B, 3, S, S], query box [B, 4] (pixel xyxy in it) and the tokenized prompt
    (``TOKEN_INPUTS``) -> prompt features [B, T, D] and the query image's region map [B, D, S/8, S/8]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, query_image: Tensor, query_box: Tensor, input_ids: Tensor, text_self_mask: Tensor, text_position_ids: Tensor,
                gather_index: Tensor, token_mask: Tensor, self_attn_mask: Tensor, position_ids: Tensor, concept_mask: Tensor,
                region_mask: Tensor) -> tuple[Tensor, Tensor]:
        from ardetect.model.text import TokenizedPrompts

        m = self.model
        tok = TokenizedPrompts(input_ids, torch.ones_like(input_ids), text_self_mask, text_position_ids, gather_index, token_mask,
                               self_attn_mask, position_ids, concept_mask, region_mask, 1)
        text = m._run_text_backbone(tok)  # [B, L, D]
        rmap = m.region_map(m.image_features(query_image, query=True))  # [B, D, h, w]
        region = m.pool_map(rmap, query_box[:, None])  # [B, 1, D]
        source = torch.cat([text, region.to(text.dtype)], 1)
        features = torch.gather(source, 1, gather_index[..., None].expand(-1, -1, source.shape[-1]))  # [B, T, D]
        return features, rmap


class ScorerGraph(nn.Module):
    """Candidates' features and region maps (``ImageEncoderGraph``), their original sizes [N, 2]
    (h, w), and one query (batch 1: ``QueryEncoderGraph``'s outputs, its box and prompt arrays) ->
    boxes [N, 4] pixel xyxy, scores [N], top_boxes [N, K, 4], top_probs [N, K], top_similarity [N, K].

    ``identity_weight`` 0 is the paper's score (the most probable box); above 0 the identity
    re-ranking over the ``top_k`` boxes with descriptors pooled on ``grid`` x ``grid`` cells.
    """

    def __init__(self, model, identity_weight: float, grid: int, top_k: int, image_size: int):
        super().__init__()
        self.model = model
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
                region_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        from ardetect.model.detector import ARDetector

        n = features.shape[0]
        images = ImageCache(
            features, torch.ones(features.shape[:2], dtype=torch.bool, device=features.device), self.pos.expand(n, -1, -1),
            self.shapes, self.valid_ratios, self.image_size, region_map,  # [1, L, 2] broadcasts: reference points fold to constants
        )
        query = QueryCache(text, token_mask, self_attn_mask, position_ids, concept_mask, region_mask, None, query_region_map, query_box)
        query = query.expand(n)
        out = self.model(images, query)
        found = ARDetector.top_regions(out.pred_logits, out, image_sizes, self.top_k, images, query, grids=(self.grid,))
        boxes, scores = found.pick(self.identity_weight, self.grid)
        return boxes, scores, found.boxes, found.prob, found.similarity[self.grid]
