"""The Attribution Region Detector: GroundingDINO with query-region tokens and adapters.

Two calls split the work so that one query is encoded once and scored against many
candidate training images:

    cache = model.encode_query(query_image, query_box, prompts, concept_phrases)   # QueryCache
    out = model(candidate_images, cache)                                            # ARDOutput
    boxes, scores = model.predict_region(candidate_images, cache)

A ``QueryCache`` of batch 1 is broadcast over any number of candidate images; a cache of
batch N pairs with N images.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from . import box_ops
from .backbone import SinePositionEmbedding, build_image_backbone, build_text_backbone, load_tokenizer
from .config import ModelConfig
from .layers import MLP, Decoder, Encoder, sine_embed
from .region_classifier import RegionClassifier
from .text import TokenizedPrompts, delimiter_ids, tokenize_prompts, tokenized_from_ids

MASKED_LOGIT = -1e4
"""Logit given to padding tokens: sigmoid is 0 and losses stay finite (GroundingDINO uses -inf)."""


@dataclass
class QueryCache:
    """The query side, computed once per query and reused for any number of candidates.

    Attributes:
        text: [B, T, D] projected prompt features, region tokens inserted.
        token_mask: [B, T] bool, True for real tokens.
        self_attn_mask: [B, T, T] bool, phrase blocks (True = may attend).
        position_ids: [B, T] long, position ids restarting in each phrase.
        concept_mask: [B, T] bool, the concept's words and region tokens (scored tokens).
        region_mask: [B, T] bool, the region tokens.
        tokens: the ``TokenizedPrompts`` these came from.
        region_map: [B, D, H/8, W/8] the query image's region map and ``region_box`` [B, 4]
            pixel xyxy the query region R_Q in it, for region descriptors finer than the
            region token (``descriptor``); None unless ``encode_query(..., region_map=True)``.
        region_class: [B, C] the region classifier's class probabilities of R_Q; None when the
            model has no region classifier.
    """

    text: Tensor
    token_mask: Tensor
    self_attn_mask: Tensor
    position_ids: Tensor
    concept_mask: Tensor
    region_mask: Tensor
    tokens: TokenizedPrompts | None = None
    region_map: Tensor | None = None
    region_box: Tensor | None = None
    region_class: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

    def _apply(self, fn) -> "QueryCache":
        """A cache with ``fn`` applied to every tensor."""
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return QueryCache(
            fn(self.text), fn(self.token_mask), fn(self.self_attn_mask), fn(self.position_ids),
            fn(self.concept_mask), fn(self.region_mask), self.tokens, opt(self.region_map), opt(self.region_box), opt(self.region_class),
        )

    def expand(self, n: int) -> "QueryCache":
        """Broadcast a batch-1 cache to n candidates (no copy), or check that the batch is n."""
        b = self.batch_size
        if b == n:
            return self
        if b != 1:
            raise ValueError(f"a QueryCache of batch {b} cannot pair with {n} images: use batch 1 or {n}")
        return self._apply(lambda t: t.expand(n, *t.shape[1:]))

    def to(self, device: torch.device | str) -> "QueryCache":
        return self._apply(lambda t: t.to(device))

    def detach(self) -> "QueryCache":
        """A cache cut from the autograd graph (for scoring; training keeps the graph to reach the query side)."""
        return self._apply(lambda t: t.detach())

    def select(self, index: Sequence[int] | Tensor) -> "QueryCache":
        idx = torch.as_tensor(index, dtype=torch.long, device=self.text.device)
        return self._apply(lambda t: t[idx])

    def descriptor(self, grid: int = 1) -> Tensor:
        """[B, D grid^2] the query region's descriptor: grid 1 is its (first) region token;
        a finer grid pools R_Q on grid x grid cells of the kept ``region_map`` (``ARDetector.pool_map``)."""
        if not bool(self.region_mask.any()):
            raise ValueError("this query has no region tokens (cfg.region_tokens): it has no region descriptor")
        if grid == 1:
            return self.text[self.region_mask].view(self.batch_size, -1, self.text.shape[-1])[:, 0]
        if self.region_map is None or self.region_box is None:
            raise ValueError(f"grid={grid}: a region descriptor finer than 1x1 needs encode_query(..., region_map=True)")
        return ARDetector.pool_map(self.region_map, self.region_box[:, None], grid)[:, 0]


@dataclass
class ARDOutput:
    """Detector output for N candidate images, Q queries, T prompt tokens.

    Attributes:
        pred_logits: [N, Q, T] token logits of the last decoder layer (adapters applied);
            padding tokens hold ``MASKED_LOGIT``.
        pred_boxes: [N, Q, 4] boxes, normalised cxcywh.
        aux_outputs: one dict per earlier decoder layer, ``{"pred_logits", "pred_boxes"}``.
        enc_outputs: the encoder's selected proposals, ``{"pred_logits" [N, Q, T], "pred_boxes" [N, Q, 4]}``.
        token_mask: [N, T] bool, real prompt tokens.
        concept_mask: [N, T] bool, the tokens scored by ``predict_region``.
        hidden: [N, Q, D] last decoder layer's query embeddings (before the adapters).
        memory_text: [N, T, D] prompt features out of the encoder (before the adapters).
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    aux_outputs: list[dict[str, Tensor]] = field(default_factory=list)
    enc_outputs: dict[str, Tensor] = field(default_factory=dict)
    token_mask: Tensor | None = None
    concept_mask: Tensor | None = None
    hidden: Tensor | None = None
    memory_text: Tensor | None = None


@dataclass
class ImageCache:
    """The candidate side that does not depend on the query: backbone features after the
    input projections, flattened over the levels. Compute it once per candidate image
    (``encode_images``) and score it against any number of queries.

    Attributes:
        features: [N, S, D] projected features of all levels (S = sum of h*w).
        mask: [N, S] bool, True on real (unpadded) positions.
        pos: [N, S, D] sine position + level embeddings.
        shapes: (h, w) of each level.
        valid_ratios: [N, L, 2] (w, h) share of each level that is not padding.
        image_size: (H, W) of the input images in pixels.
        region_map: [N, D, H/8, W/8] the map region tokens are pooled from (``region_map``),
            for the identity re-ranking of ``region_candidates``; None unless
            ``encode_images(..., region_map=True)`` kept it.
        pixels: [N, 3, H, W] the input images in [0, 1], which the region classifier crops the
            boxes from; kept with ``region_map`` when the model has a region classifier.
    """

    features: Tensor
    mask: Tensor
    pos: Tensor
    shapes: list[tuple[int, int]]
    valid_ratios: Tensor
    image_size: tuple[int, int]
    region_map: Tensor | None = None
    pixels: Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def select(self, index: Sequence[int] | slice | Tensor) -> "ImageCache":
        if isinstance(index, slice):
            pick = lambda t: t[index]  # noqa: E731
        else:
            idx = torch.as_tensor(index, dtype=torch.long, device=self.features.device)
            pick = lambda t: t[idx]  # noqa: E731
        opt = lambda t: None if t is None else pick(t)  # noqa: E731
        return ImageCache(pick(self.features), pick(self.mask), pick(self.pos), self.shapes, pick(self.valid_ratios), self.image_size,
                          opt(self.region_map), opt(self.pixels))

    @staticmethod
    def cat(caches: Sequence["ImageCache"]) -> "ImageCache":
        first = caches[0]
        if any(c.shapes != first.shapes for c in caches):
            raise ValueError("image caches of different input sizes cannot be concatenated")
        maps, pixels = [c.region_map for c in caches], [c.pixels for c in caches]
        return ImageCache(
            torch.cat([c.features for c in caches]), torch.cat([c.mask for c in caches]), torch.cat([c.pos for c in caches]),
            first.shapes, torch.cat([c.valid_ratios for c in caches]), first.image_size,
            None if any(m is None for m in maps) else torch.cat(maps), None if any(p is None for p in pixels) else torch.cat(pixels),
        )


def check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [N, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have rank 4 [N, 3, H, W], got shape {list(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"{name} must have 3 (RGB) channels in dim 1, got shape {list(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [0, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")


def fuse_region_map(proj: nn.Module, feats: list[Tensor]) -> Tensor:
    """Backbone maps ``feats`` (strides 8/16/32) -> ``proj`` of all levels at the finest size, concatenated."""
    size = feats[0].shape[-2:]
    return proj(torch.cat([feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]], 1))


class ARDetector(nn.Module):
    """GroundingDINO-style detector with ARD's region tokens and adapters. Build with ``build(cfg)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        # image side
        self.backbone = build_image_backbone(cfg)
        self.query_backbone = copy.deepcopy(self.backbone) if cfg.separate_query_backbone else None
        self.position_embedding = SinePositionEmbedding(d, cfg.pos_temperature)
        chans = self.backbone.channels
        proj = [nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(32, d)) for c in chans]
        in_c = chans[-1]
        for _ in range(cfg.num_feature_levels - len(chans)):
            proj.append(nn.Sequential(nn.Conv2d(in_c, d, 3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_c = d
        self.input_proj = nn.ModuleList(proj)
        self.level_embed = nn.Parameter(torch.randn(cfg.num_feature_levels, d))
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)
        # text side
        self.text_backbone = build_text_backbone(cfg)
        self.text_projection = nn.Linear(cfg.text_hidden, d)
        self.tokenizer = load_tokenizer(cfg)
        self.delimiters = delimiter_ids(self.tokenizer)
        # region tokens: all backbone levels at the finest size, concatenated, 1x1 conv to D
        self.region_proj = nn.Conv2d(sum(chans), d, 1) if cfg.region_tokens else None
        self.region_classifier: RegionClassifier | None = None
        if cfg.region_classes is not None:
            self._build_region_classifier(cfg)
        # transformer
        common = dict(ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads, num_levels=cfg.num_feature_levels, dropout=cfg.dropout)
        self.encoder = Encoder(cfg.encoder_layers, dim=d, num_points=cfg.encoder_points, droppath=cfg.fusion_droppath, **common)
        self.decoder = Decoder(cfg.decoder_layers, dim=d, num_points=cfg.decoder_points, **common)
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_bbox_head = MLP(d, d, 4, 3)
        if cfg.share_bbox_head:
            head = MLP(d, d, 4, 3)
            self.bbox_heads = nn.ModuleList([head] * cfg.decoder_layers)
        else:
            self.bbox_heads = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(cfg.decoder_layers))
        for head in list(self.bbox_heads) + [self.enc_bbox_head]:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        # ARD adapters F (decoder queries) and F~ (prompt tokens): identity, zero bias
        self.adapter_query = nn.Linear(d, d)
        self.adapter_text = nn.Linear(d, d)
        self.reset_adapters()
        # contrastive head's scale and bias (scalars; 1 and 0 reproduce GroundingDINO)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.logit_bias)))
        self.adapters_enabled = cfg.adapters
        self.phase = 1
        self.set_phase(1)

    def _build_region_classifier(self, cfg: ModelConfig) -> None:
        if not cfg.region_tokens:
            raise ValueError("region_classes: the region classifier re-ranks by region, it needs cfg.region_tokens")
        backbone = build_image_backbone(cfg.model_copy(update={"image_pretrained": None}))
        classifier = RegionClassifier(backbone, len(cfg.region_classes), cfg.region_crop, cfg.pixel_mean, cfg.pixel_std)
        self.region_classifier = classifier.to(self.pixel_mean.device)

    def add_region_classifier(self, classes: Sequence[str], crop: int | None = None) -> RegionClassifier:
        """Give the model a (frozen) region classifier of ``classes``, recorded in its config; returns it."""
        classes = tuple(str(c) for c in classes)
        if len(set(classes)) != len(classes):
            raise ValueError(f"region classes must be distinct, got {list(classes)[:8]}")
        self.cfg = self.cfg.model_copy(update={"region_classes": classes, "region_crop": int(crop or self.cfg.region_crop)})
        self._build_region_classifier(ModelConfig.model_validate(self.cfg.model_dump()))
        return self.region_classifier

    # --- freezing --------------------------------------------------------------------
    @torch.no_grad()
    def reset_adapters(self) -> None:
        for a in (self.adapter_query, self.adapter_text):
            a.weight.copy_(torch.eye(a.weight.shape[0]))
            a.bias.zero_()

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [*self.adapter_query.parameters(), *self.adapter_text.parameters()]

    def adapter_regularizer(self) -> Tensor:
        """½(‖FᵀF − I‖_F + ‖F̃ᵀF̃ − I‖_F) over the adapter weights (biases excluded; Frobenius,
        not squared; equal to the paper's ‖FFᵀ − I‖ form for square matrices)."""
        eye = torch.eye(self.cfg.hidden_dim, device=self.adapter_query.weight.device, dtype=self.adapter_query.weight.dtype)
        f, ft = self.adapter_query.weight, self.adapter_text.weight
        return 0.5 * (torch.linalg.matrix_norm(f.T @ f - eye) + torch.linalg.matrix_norm(ft.T @ ft - eye))

    def backbone_modules(self) -> dict[str, nn.Module]:
        mods = {"image": self.backbone, "text": self.text_backbone}
        if self.query_backbone is not None:
            mods["query_image"] = self.query_backbone
        return mods

    def set_phase(self, phase: int, freeze_backbones: bool | None = None) -> "ARDetector":
        """Set ``requires_grad`` for a training phase.

        Phase 1: everything trains except the adapters and the frozen backbones (frozen
        when loaded pretrained, trainable when random; ``freeze_backbones`` or
        ``cfg.freeze_backbones`` overrides). Phase 2: only the adapters F and F~ train.
        """
        if phase not in (1, 2):
            raise ValueError(f"phase={phase!r} must be 1 or 2")
        self.phase = phase
        self.freeze_override = freeze_backbones
        for p in self.parameters():
            p.requires_grad_(phase == 1)
        if self.region_classifier is not None:  # trained once, by the pre-training's crop classification
            self.region_classifier.requires_grad_(False)
        if phase == 1:
            img_frozen = freeze_backbones if freeze_backbones is not None else self.cfg.image_frozen()
            txt_frozen = freeze_backbones if freeze_backbones is not None else self.cfg.text_frozen()
            for m in (self.backbone, self.query_backbone):
                if m is not None:
                    m.requires_grad_(not img_frozen)
            self.text_backbone.requires_grad_(not txt_frozen)
            for p in self.adapter_parameters():
                p.requires_grad_(False)
        else:
            for p in self.adapter_parameters():
                p.requires_grad_(True)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "ARDetector":
        """Like ``nn.Module.train``, but modules without trainable parameters stay in eval
        mode (frozen batch norm statistics, no dropout in frozen encoders)."""
        super().train(mode)
        if mode:
            for m in self.backbone_modules().values():
                if not any(p.requires_grad for p in m.parameters()):
                    m.eval()
            if self.phase == 2:  # only the adapters train: keep everything deterministic
                for m in self.children():
                    m.eval()
        return self

    def _frozen(self, module: nn.Module) -> bool:
        return not any(p.requires_grad for p in module.parameters())

    # --- query side ------------------------------------------------------------------
    def normalize(self, images: Tensor) -> Tensor:
        images = images.to(self.pixel_mean.dtype)  # the model's dtype (bf16 when the model was cast)
        return (images - self.pixel_mean) / self.pixel_std

    def tokenize(self, prompts: Sequence[str], concept_phrases: Sequence[str] | None) -> TokenizedPrompts:
        """Token ids, masks and concept positions of prompts (see ``ardetect.model.text``)."""
        r = 1 if self.cfg.region_tokens else 0
        return tokenize_prompts(self.tokenizer, prompts, concept_phrases, r if concept_phrases is not None else 0, self.cfg.max_text_len)

    def _run_text_backbone(self, tok: TokenizedPrompts) -> Tensor:
        frozen = self._frozen(self.text_backbone)
        positions = tok.text_position_ids
        if self.cfg.phrase_position_start:
            positions = positions + self.cfg.phrase_position_start
            positions[:, 0] = 0  # [CLS]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = self.text_backbone(
                input_ids=tok.input_ids,
                attention_mask=tok.text_self_mask[:, None],  # [B, 1, L, L] phrase blocks
                token_type_ids=torch.zeros_like(tok.input_ids),
                position_ids=positions,
            )
        return self.text_projection(out.last_hidden_state)  # [B, L, D]

    def image_features(self, images: Tensor, query: bool = False) -> list[Tensor]:
        """Backbone feature maps (strides 8/16/32) of [B, 3, H, W] images in [0, 1]."""
        backbone = self.query_backbone if (query and self.query_backbone is not None) else self.backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._frozen(backbone)):
            return backbone(self.normalize(images))

    def region_tokens(self, query_image: Tensor, query_box: Tensor) -> Tensor:
        """[B, 3, H, W] query images and [B, 4] pixel xyxy boxes -> [B, 1, D] region tokens."""
        return self.pool_regions(self.image_features(query_image, query=True), query_box)

    def region_map(self, feats: list[Tensor]) -> Tensor:
        """Backbone maps ``feats`` (strides 8/16/32) -> [B, D, H/8, W/8]: all levels at the finest size, 1x1 conv."""
        if self.region_proj is None:
            raise ValueError("region tokens are off (cfg.region_tokens=False): there is no region projection")
        return fuse_region_map(self.region_proj, feats)

    def pool_regions(self, feats: list[Tensor], boxes: Tensor) -> Tensor:
        """Region tokens of [B, 4] pixel xyxy boxes read from backbone maps ``feats`` (strides 8/16/32) -> [B, 1, D]."""
        return self.pool_map(self.region_map(feats), boxes[:, None])

    @staticmethod
    def pool_map(region_map: Tensor, boxes: Tensor, grid: int = 1) -> Tensor:
        """[B, D, h, w] region maps (stride 8) and [B, K, 4] pixel xyxy boxes -> [B, K, D grid^2]
        pooled regions (RoIAlign on grid x grid cells, flattened channel-major; grid 1 = the region token)."""
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid={grid!r} must be an integer >= 1")
        b, k = boxes.shape[:2]
        index = torch.arange(b, device=region_map.device, dtype=torch.float32).repeat_interleave(k)[:, None]
        rois = torch.cat([index, boxes.reshape(b * k, 4).float().to(region_map.device)], 1)
        tokens = roi_align(region_map.float(), rois, output_size=grid, spatial_scale=1 / 8, sampling_ratio=-1, aligned=True)  # [B*K, D, g, g]
        return tokens.to(region_map.dtype).view(b, k, -1)

    def encode_query(
        self,
        query_image: Tensor | None,
        query_box: Tensor | None,
        prompts: Sequence[str],
        concept_phrases: Sequence[str] | None,
        region_map: bool = False,
    ) -> QueryCache:
        """Encode B queries once: prompt tokens, text features and region tokens.

        Args:
            query_image: [B, 3, H, W] generated images in [0, 1] (may be None when region tokens are off).
            query_box: [B, 4] the query region R_Q, pixel xyxy in ``query_image``.
            prompts: B prompts, each containing its concept phrase.
            concept_phrases: B concept phrases (e.g. "V* cat").
            region_map: also keep the query image's region map and box (``QueryCache.descriptor``
                of a grid finer than 1x1, for the identity re-ranking).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(concept_phrases, str):
            concept_phrases = [concept_phrases]
        tok = self.tokenize(prompts, concept_phrases)
        device = self.text_projection.weight.device
        tok = tok.to(device)
        b = tok.input_ids.shape[0]
        text = self._run_text_backbone(tok)  # [B, L, D]
        region_class = None
        if tok.num_region_tokens:
            if query_image is None or query_box is None:
                raise ValueError("region tokens are on (cfg.region_tokens): query_image and query_box are required")
            check_images(query_image, "query_image")
            if query_image.shape[0] != b:
                raise ValueError(f"query_image has batch {query_image.shape[0]} but there are {b} prompts")
            query_box = torch.as_tensor(query_box, dtype=torch.float32, device=device)
            if query_box.dim() == 1:
                query_box = query_box[None]
            if query_box.shape[0] != b:
                raise ValueError(f"query_box has {query_box.shape[0]} boxes but there are {b} prompts")
            box_ops.check_boxes_in_image(query_box, query_image.shape[-2], query_image.shape[-1], "query_box")
            rmap = self.region_map(self.image_features(query_image.to(device), query=True))  # [B, D, h, w]
            region = self.pool_map(rmap, query_box[:, None])  # [B, R, D] (= region_tokens)
            if self.region_classifier is not None:
                region_class = self.region_classifier(query_image.to(device), query_box[:, None])[:, 0]  # [B, C]
            source = torch.cat([text, region.to(text.dtype)], 1)  # [B, L + R, D]
        elif region_map:
            raise ValueError("region_map=True: this model has no region tokens (cfg.region_tokens), so no region map")
        else:
            source = text
        idx = tok.gather_index[..., None].expand(-1, -1, source.shape[-1])  # [B, T, D]
        features = torch.gather(source, 1, idx)  # [B, T, D]
        kept = (rmap, query_box) if region_map else (None, None)
        return QueryCache(features, tok.token_mask, tok.self_attn_mask, tok.position_ids, tok.concept_mask, tok.region_mask, tok, *kept,
                          region_class)

    def encode_text_ids(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> QueryCache:
        """Encode ready token ids without concept or region tokens: GroundingDINO's own input."""
        device = self.text_projection.weight.device
        input_ids = input_ids.to(device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        if input_ids.shape[1] > self.cfg.max_text_len:
            raise ValueError(f"input_ids are {input_ids.shape[1]} tokens, longer than max_text_len={self.cfg.max_text_len}")
        tok = tokenized_from_ids(input_ids, attention_mask, self.delimiters)
        text = self._run_text_backbone(tok)
        return QueryCache(text, tok.token_mask, tok.self_attn_mask, tok.position_ids, tok.concept_mask, tok.region_mask, tok)

    # --- candidate side --------------------------------------------------------------
    def _flatten_levels(self, images: Tensor, pixel_mask: Tensor | None, features: list[Tensor] | None = None):
        feats = self.image_features(images) if features is None else features
        n, _, h, w = images.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((n, h, w), dtype=torch.bool, device=images.device)
        pixel_mask = pixel_mask.bool()
        sources, masks = [], []
        for lvl, f in enumerate(feats):
            sources.append(self.input_proj[lvl](f))
        for lvl in range(len(feats), self.cfg.num_feature_levels):
            prev = feats[-1] if lvl == len(feats) else sources[-1]
            sources.append(self.input_proj[lvl](prev))
        for s in sources:
            masks.append(F.interpolate(pixel_mask[None].float(), size=s.shape[-2:]).to(torch.bool)[0])  # [N, h, w]
        shapes = [tuple(s.shape[-2:]) for s in sources]
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(sources, masks)]
        flat = torch.cat([s.flatten(2).transpose(1, 2) for s in sources], 1)  # [N, S, D]
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)  # [N, S]
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1) for i, p in enumerate(pos)], 1)
        valid_ratios = torch.stack([self._valid_ratio(m, flat.dtype) for m in masks], 1)  # [N, L, 2]
        return flat, mask_flat, pos_flat, shapes, valid_ratios

    @staticmethod
    def _valid_ratio(mask: Tensor, dtype: torch.dtype) -> Tensor:
        _, h, w = mask.shape
        vh = mask[:, :, 0].sum(1, dtype=dtype) / h
        vw = mask[:, 0, :].sum(1, dtype=dtype) / w
        return torch.stack([vw, vh], -1)  # [N, 2] (w, h)

    def _proposals(self, memory: Tensor, mask_flat: Tensor, shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """One anchor box per encoder token -> (object queries [N, S, D], proposal logits [N, S, 4])."""
        n = memory.shape[0]
        props, start = [], 0
        for lvl, (h, w) in enumerate(shapes):
            m = mask_flat[:, start : start + h * w].view(n, h, w)
            vh, vw = m[:, :, 0].sum(1), m[:, 0, :].sum(1)
            gy, gx = torch.meshgrid(
                torch.linspace(0, h - 1, h, dtype=memory.dtype, device=memory.device),
                torch.linspace(0, w - 1, w, dtype=memory.dtype, device=memory.device),
                indexing="ij",
            )
            grid = torch.stack([gx, gy], -1)  # [h, w, 2]
            scale = torch.stack([vw, vh], -1).view(n, 1, 1, 2).to(memory.dtype)
            grid = (grid[None] + 0.5) / scale  # [N, h, w, 2]
            wh = torch.full_like(grid, 0.05 * 2.0**lvl)
            props.append(torch.cat([grid, wh], -1).view(n, -1, 4))
            start += h * w
        props = torch.cat(props, 1)  # [N, S, 4]
        ok = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
        props = torch.log(props / (1 - props))
        props = props.masked_fill(~mask_flat[..., None], float("inf")).masked_fill(~ok, float("inf"))
        q = memory.masked_fill(~mask_flat[..., None], 0.0).masked_fill(~ok, 0.0)
        return self.enc_output_norm(self.enc_output(q)), props

    def _similarity(self, x: Tensor, text: Tensor, token_mask: Tensor) -> Tensor:
        """[N, Q, D] x [N, T, D] -> [N, Q, T] logits (scaled, biased), padding tokens at ``MASKED_LOGIT``."""
        logits = (x @ text.transpose(-1, -2)) * self.logit_scale.to(x.dtype) + self.logit_bias.to(x.dtype)
        return logits.masked_fill(~token_mask[:, None, :], MASKED_LOGIT)

    def class_logits(self, hidden: Tensor, text: Tensor, token_mask: Tensor, adapters: tuple[nn.Module, nn.Module] | None = None) -> Tensor:
        """Decoder class head: F(queries) . F~(tokens)^T, or the plain product with adapters off.

        ``adapters`` = (F, F~) scores with another pair than the model's own (see ``predict_region_variants``).
        """
        if adapters is not None:
            hidden, text = adapters[0](hidden), adapters[1](text)
        elif self.adapters_enabled:
            hidden, text = self.adapter_query(hidden), self.adapter_text(text)
        return self._similarity(hidden, text, token_mask)

    def encode_images(
        self, images: Tensor, pixel_mask: Tensor | None = None, features: list[Tensor] | None = None, region_map: bool = False
    ) -> ImageCache:
        """The query-independent candidate side of N images [N, 3, H, W] in [0, 1] -> ``ImageCache``.

        ``features``: the images' backbone maps (``image_features``) when the caller already has them.
        ``region_map``: also keep the map region tokens are pooled from (the identity re-ranking needs it),
        and the images themselves when the model has a region classifier.
        """
        check_images(images)
        n = images.shape[0]
        if pixel_mask is not None and tuple(pixel_mask.shape) != (n, *images.shape[-2:]):
            raise ValueError(f"pixel_mask must have shape [N, H, W] = {[n, *images.shape[-2:]]}, got {list(pixel_mask.shape)}")
        feats = self.image_features(images) if features is None else features
        flat, mask_flat, pos_flat, shapes, valid_ratios = self._flatten_levels(images, pixel_mask, feats)
        if flat.shape[1] < self.cfg.num_queries:
            raise ValueError(
                f"images of {images.shape[-2]}x{images.shape[-1]} give {flat.shape[1]} encoder tokens, "
                f"fewer than num_queries={self.cfg.num_queries}: use larger images"
            )
        rmap = self.region_map(feats) if region_map else None
        pixels = images if region_map and self.region_classifier is not None else None
        return ImageCache(flat, mask_flat, pos_flat, shapes, valid_ratios, (images.shape[-2], images.shape[-1]), rmap, pixels)

    def forward(self, images: Tensor | ImageCache, query: QueryCache, pixel_mask: Tensor | None = None) -> ARDOutput:
        """Detect the query's concept in N candidate images.

        Args:
            images: [N, 3, H, W] candidate images, RGB in [0, 1], or their ``ImageCache``
                (``encode_images``), which skips the image backbone.
            query: a ``QueryCache`` of batch 1 (broadcast) or N.
            pixel_mask: optional [N, H, W] bool, True on real pixels (for padded batches).
        """
        cache = images if isinstance(images, ImageCache) else self.encode_images(images, pixel_mask)
        n = cache.features.shape[0]  # (not len(): a traced export keeps N dynamic)
        query = query.expand(n)
        cfg = self.cfg
        flat, mask_flat, pos_flat, shapes, valid_ratios = cache.features, cache.mask, cache.pos, cache.shapes, cache.valid_ratios
        text, token_mask = query.text, query.token_mask
        text_pos = sine_embed(query.position_ids[..., None].to(text.dtype), cfg.hidden_dim)  # [N, T, D]
        memory, memory_text = self.encoder(
            flat, pos_flat, mask_flat, shapes, valid_ratios, text, token_mask, query.self_attn_mask, text_pos
        )
        # language-guided query selection ("standard" two-stage)
        obj, props = self._proposals(memory, mask_flat, shapes)
        enc_logits = self._similarity(obj, memory_text, token_mask)  # [N, S, T]
        enc_coords = self.enc_bbox_head(obj) + props  # [N, S, 4] logits
        topk = torch.topk(enc_logits.max(-1).values, cfg.num_queries, dim=1).indices  # [N, Q]
        topk_coords = torch.gather(enc_coords, 1, topk[..., None].expand(-1, -1, 4))  # [N, Q, 4]
        reference = topk_coords.detach().sigmoid()
        target = self.query_embed.weight[None].expand(n, -1, -1)  # [N, Q, D]
        enc_outputs = {
            "pred_logits": torch.gather(enc_logits, 1, topk[..., None].expand(-1, -1, enc_logits.shape[-1])),
            "pred_boxes": topk_coords.sigmoid(),
        }
        hidden, refs = self.decoder(
            target, reference, memory, mask_flat, shapes, valid_ratios, memory_text, token_mask, self.bbox_heads
        )  # [n_layers, N, Q, D], [n_layers, N, Q, 4]
        outputs = []
        for lvl in range(hidden.shape[0]):
            ref = reference if lvl == 0 else refs[lvl - 1]
            boxes = (self.bbox_heads[lvl](hidden[lvl]) + torch.special.logit(ref, eps=1e-5)).sigmoid()
            outputs.append({"pred_logits": self.class_logits(hidden[lvl], memory_text, token_mask), "pred_boxes": boxes})
        return ARDOutput(
            pred_logits=outputs[-1]["pred_logits"],
            pred_boxes=outputs[-1]["pred_boxes"],
            aux_outputs=outputs[:-1],
            enc_outputs=enc_outputs,
            token_mask=token_mask,
            concept_mask=query.concept_mask,
            hidden=hidden[-1],
            memory_text=memory_text,
        )

    @staticmethod
    def top_regions(
        logits: Tensor, out: ARDOutput, image_sizes: Tensor, top_k: int, images: ImageCache | None = None, query: QueryCache | None = None,
        grids: Sequence[int] = (1,),
    ) -> "RegionCandidates":
        """The ``top_k`` boxes of each image by detector probability (max over concept tokens of the
        sigmoid of ``logits`` [N, Q, T]); with ``images`` (holding ``region_map``) and ``query``, also
        the cosine similarity between the query region's descriptor and the same pooling of the
        candidate's region map at each box, for each pooling grid of ``grids`` (1 = the region token)."""
        prob = logits.float().sigmoid().masked_fill(~out.concept_mask[:, None, :], 0.0).max(-1).values  # [N, Q]
        prob, top = prob.topk(min(top_k, prob.shape[1]), dim=-1)  # [N, K], descending
        boxes = torch.gather(out.pred_boxes, 1, top[..., None].expand(-1, -1, 4))  # [N, K, 4] normalised cxcywh
        similarity = None
        if images is not None:
            if images.region_map is None:
                raise ValueError("identity re-ranking needs the candidates' region maps: encode_images(..., region_map=True)")
            if query is None or not bool(query.region_mask.any()):
                raise ValueError("identity re-ranking needs a query with region tokens (cfg.region_tokens)")
            query.expand(images.features.shape[0])  # checks the batch
            h, w = images.image_size
            inside = box_ops.cxcywh_norm_to_xyxy_pixels(boxes, torch.tensor([[h, w]], device=boxes.device).expand(boxes.shape[0], 2))
            similarity = {}
            for g in dict.fromkeys(grids):
                pooled = ARDetector.pool_map(images.region_map, inside, g).float()  # [N, K, D g^2]
                similarity[g] = F.cosine_similarity(pooled, query.descriptor(g).float()[:, None], dim=-1)  # [N, K]
        return RegionCandidates(box_ops.cxcywh_norm_to_xyxy_pixels(boxes, image_sizes), prob, similarity)

    @torch.no_grad()
    def predict_region(
        self, images: Tensor | ImageCache, query: QueryCache, image_sizes: Tensor | None = None, chunk_size: int | None = None,
        identity_weight: float = 0.0, top_k: int = 5, grid: int = 1, class_weight: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """Best region and attribution score of each of N candidate images.

        Args:
            images: [N, 3, H, W] in [0, 1], or their ``ImageCache`` (with ``region_map`` when
                ``identity_weight`` > 0).
            query: ``QueryCache`` of batch 1 (broadcast) or N.
            image_sizes: [N, 2] (height, width) to scale the boxes to; default the input size.
            chunk_size: score at most this many candidates per forward pass.
            identity_weight: 0 = the paper's score (the best box's probability); above 0, the
                identity re-ranking of ``RegionCandidates.pick`` over the ``top_k`` boxes.
            grid: the re-ranking's region descriptor, pooled on grid x grid cells (1 = the region
                token; above 1 the query needs ``encode_query(..., region_map=True)``).
            class_weight: above 0, the re-ranking also weighs each box's class match to the query
                region (a model with a region classifier; ``RegionCandidates.pick``).
        Returns:
            (boxes [N, 4] pixel xyxy, scores [N] in [0, 1]).
        """
        found = region_candidates(self, None, images, query, image_sizes, chunk_size, top_k, identity_weight > 0 or class_weight > 0, grids=(grid,),
                                  classes=class_weight > 0)
        return found[""].pick(identity_weight, grid, class_weight)


def candidate_chunks(images: Tensor | ImageCache, query: QueryCache, image_sizes: Tensor | None, chunk_size: int | None):
    """Yield (images or ImageCache, QueryCache, image sizes [n, 2]) for chunks of at most ``chunk_size`` candidates."""
    if isinstance(images, ImageCache):
        n, (h, w), device = len(images), images.image_size, images.features.device
    else:
        check_images(images)
        n, _, h, w = images.shape
        device = images.device
    if image_sizes is None:
        image_sizes = torch.tensor([[h, w]], device=device).expand(n, 2)
    chunk = chunk_size or n
    for s in range(0, n, chunk):
        part = images.select(slice(s, s + chunk)) if isinstance(images, ImageCache) else images[s : s + chunk]
        q = query if query.batch_size == 1 else query.select(range(s, min(s + chunk, n)))
        yield part, q, image_sizes[s : s + chunk]


def check_variants(model: "ARDetector", variants: dict[str, "ARDetector"]) -> None:
    """Raise ``ValueError`` unless every variant equals ``model`` outside the adapters F and F~."""
    own = model.state_dict()
    for name, other in variants.items():
        theirs = other.state_dict()
        unmatched = sorted(set(own) ^ set(theirs))
        if unmatched:
            raise ValueError(f"variant {name!r} has other parameters than the shared model (a region classifier on one "
                             f"only?): {unmatched[:3]}")
        differ = [k for k, v in theirs.items() if not k.startswith(("adapter_query.", "adapter_text.")) and not torch.equal(v, own[k])]
        if differ:
            raise ValueError(f"variant {name!r} differs from the shared model outside the adapters: {differ[:3]}")


@dataclass
class RegionCandidates:
    """The ``top_k`` boxes of each of N candidate images, from which the attribution score is picked.

    Attributes:
        boxes: [N, K, 4] pixel xyxy.
        prob: [N, K] detector probability of each box (max over concept tokens), descending.
        similarity: {grid: [N, K]} cosine between the query region's descriptor and the
            candidate's region at each box, both pooled on grid x grid cells of their region
            maps (``ARDetector.pool_map``; grid 1 = the region token); None when not computed.
        class_match: [N, K] probability that the box and the query region are the same class
            (the region classifier's distributions, dotted); None without a region classifier.
    """

    boxes: Tensor
    prob: Tensor
    similarity: dict[int, Tensor] | None = None
    class_match: Tensor | None = None

    def pick(self, identity_weight: float = 0.0, grid: int = 1, class_weight: float = 0.0) -> tuple[Tensor, Tensor]:
        """(boxes [N, 4], scores [N]) of the best box of each image.

        ``identity_weight`` w = 0 and ``class_weight`` a = 0 is the paper's score: the most
        probable box and its probability. Otherwise (ours, README "Identity re-ranking") each
        box scores ``prob * exp(w * (similarity - 1)) * class_match ** a``, with the similarity
        of descriptors pooled on ``grid`` x ``grid`` cells: the probability, discounted by how
        far the region at the box is from the query region and by how unlikely the two are
        the same class; the best of the K boxes wins.
        """
        for name, value in (("identity_weight", identity_weight), ("class_weight", class_weight)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a finite number >= 0")
        if identity_weight == 0 and class_weight == 0:
            return self.boxes[:, 0], self.prob[:, 0]
        score = self.prob
        if identity_weight > 0:
            if self.similarity is None:
                raise ValueError(f"identity_weight={identity_weight}: these candidates carry no region similarity")
            if grid not in self.similarity:
                raise ValueError(f"grid={grid!r}: these candidates carry region similarities of grids {sorted(self.similarity)} only")
            score = score * torch.exp(identity_weight * (self.similarity[grid] - 1.0))
        if class_weight > 0:
            if self.class_match is None:
                raise ValueError(f"class_weight={class_weight}: these candidates carry no class match (the model has no region classifier)")
            score = score * self.class_match.clamp_min(CLASS_MATCH_FLOOR) ** class_weight
        best, j = score.max(-1)
        return self.boxes.gather(1, j[:, None, None].expand(-1, 1, 4))[:, 0], best  # (gather: exports with a dynamic N)

    def select(self, index: Tensor) -> "RegionCandidates":
        """The candidates of images ``index`` [C] (long), in that order."""
        sims = None if self.similarity is None else {g: s[index] for g, s in self.similarity.items()}
        return RegionCandidates(self.boxes[index], self.prob[index], sims, None if self.class_match is None else self.class_match[index])

    @staticmethod
    def cat(parts: Sequence["RegionCandidates"]) -> "RegionCandidates":
        sims, matches = [p.similarity for p in parts], [p.class_match for p in parts]
        return RegionCandidates(
            torch.cat([p.boxes for p in parts]), torch.cat([p.prob for p in parts]),
            None if any(s is None for s in sims) else {g: torch.cat([s[g] for s in sims]) for g in sims[0]},
            None if any(m is None for m in matches) else torch.cat(matches),
        )


@torch.no_grad()
def region_candidates(
    model: "ARDetector", variants: dict[str, "ARDetector"] | None, images: Tensor | ImageCache, query: QueryCache,
    image_sizes: Tensor | None = None, chunk_size: int | None = None, top_k: int = 5, identity: bool = False,
    grids: Sequence[int] = (1,), classes: bool = False,
) -> dict[str, RegionCandidates]:
    """The top-k boxes of N candidate images for ``model`` (key "") or for each of ``variants``.

    ``identity``: also their region similarity to the query (``ARDetector.top_regions``) for
    each pooling grid of ``grids``; raw images are then encoded with their region maps.
    ``classes`` (with ``identity``): also their class match to the query region (``class_match``).
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1")
    heads_of = {"": None} if variants is None else {
        name: (other.adapter_query, other.adapter_text) if other.adapters_enabled else (nn.Identity(), nn.Identity())
        for name, other in variants.items()
    }
    parts: dict[str, list[RegionCandidates]] = {name: [] for name in heads_of}
    for part, q, sizes in candidate_chunks(images, query, image_sizes, chunk_size):
        if identity and not isinstance(part, ImageCache):
            part = model.encode_images(part, region_map=True)
        out = model(part, q)
        found = {}
        for name, heads in heads_of.items():
            logits = out.pred_logits if heads is None else model.class_logits(out.hidden, out.memory_text, out.token_mask, adapters=heads)
            found[name] = model.top_regions(logits, out, sizes, top_k, part if identity else None, q, grids)
        if identity and classes:  # the variants' boxes are mostly the same decoder boxes: each distinct box is classified once
            matches = class_match(model, part, q, [f.boxes for f in found.values()], sizes)
            for f, m in zip(found.values(), matches or [None] * len(found)):
                f.class_match = m
        for name, f in found.items():
            parts[name].append(f)
    return {name: RegionCandidates.cat(p) for name, p in parts.items()}


CLASS_MATCH_FLOOR = 1e-6  # a class match below it counts as it (a zero would tie every such box at 0)


def class_match(model: "ARDetector", images: ImageCache, query: QueryCache, boxes: Sequence[Tensor], image_sizes: Tensor) -> list[Tensor] | None:
    """For each of ``boxes`` ([N, K, 4] pixel xyxy in the images' original ``image_sizes`` [N, 2] (h, w)),
    [N, K] the probability that the region classifier puts the box and the query region in the
    same class (its two distributions, dotted). None when the model has no region classifier or
    the inputs lack the images or the query's class (``encode_images(..., region_map=True)``).
    Boxes that repeat across ``boxes`` (the same image, the same coordinates) are classified once.
    """
    if model.region_classifier is None or images.pixels is None or query.region_class is None:
        return None
    n, k = boxes[0].shape[:2]
    h, w = images.image_size
    sizes = image_sizes.to(boxes[0].dtype)
    scale = torch.stack([w / sizes[:, 1], h / sizes[:, 0]], -1).repeat(1, 2)[:, None]  # [N, 1, 4] original -> input pixels
    index = torch.arange(n, device=boxes[0].device)[:, None].expand(n, k).reshape(-1)  # [N*K] each box's image
    flat = torch.cat([(b * scale).reshape(-1, 4) for b in boxes])  # [V*N*K, 4]
    owner = index.repeat(len(boxes))
    if len(boxes) > 1:
        distinct, inverse = torch.unique(torch.cat([owner[:, None].to(flat.dtype), flat], 1), dim=0, return_inverse=True)
        probs = model.region_classifier(images.pixels, distinct[:, 1:], distinct[:, 0].long())[inverse]  # [V*N*K, C]
    else:
        probs = model.region_classifier(images.pixels, flat, owner)
    target = query.expand(n).region_class  # [N, C]
    match = (probs * target.to(probs.dtype)[owner]).sum(-1)
    return list(match.view(len(boxes), n, k).unbind(0))


@torch.no_grad()
def predict_region_variants(
    model: "ARDetector", variants: dict[str, "ARDetector"], images: Tensor | ImageCache, query: QueryCache,
    image_sizes: Tensor | None = None, chunk_size: int | None = None, check: bool = True, top_k: int = 5,
    identity: bool = False, grids: Sequence[int] = (1,), classes: bool = False,
) -> dict[str, RegionCandidates]:
    """The ``RegionCandidates`` of several detectors that differ only in their adapters, in one pass.

    Phase 2 trains nothing but the adapters, so ARD and ARD− share every other weight:
    the backbone, encoder and decoder run once and each variant's class head re-scores
    the same decoder output. Raises ``ValueError`` when a variant differs elsewhere
    (``check=False`` skips that comparison of every weight, for callers that made it once).
    ``.pick(w)`` of a variant's candidates is its ``predict_region(..., identity_weight=w)``.
    """
    if check:
        check_variants(model, variants)
    return region_candidates(model, variants, images, query, image_sizes, chunk_size, top_k, identity, grids, classes)


def build(cfg: ModelConfig) -> ARDetector:
    """Build the detector of ``cfg`` (backbones pretrained where the config names weights)."""
    return ARDetector(cfg)


def param_groups(
    model: ARDetector, lr: float, lr_backbone: float, lr_linear_proj_mult: float = 0.1, weight_decay: float | None = None
) -> list[dict]:
    """AdamW parameter groups over the trainable parameters.

    Backbones (image, query image, text) get ``lr_backbone``; the deformable attention's
    sampling offsets and the decoder's reference-point head get ``lr * lr_linear_proj_mult``
    (REFERENCE.md: 1e-5 against 1e-4); everything else ``lr``. Empty groups are left out.
    """
    backbone_ids = {id(p) for m in model.backbone_modules().values() for p in m.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "linear_proj": [], "rest": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in backbone_ids:
            groups["backbone"].append(p)
        elif "sampling_offsets" in name or "reference_points" in name:
            groups["linear_proj"].append(p)
        else:
            groups["rest"].append(p)
    lrs = {"backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult, "rest": lr}
    out = []
    for key, params in groups.items():
        if params:
            g = {"params": params, "lr": lrs[key], "name": key}
            if weight_decay is not None:
                g["weight_decay"] = weight_decay
            out.append(g)
    return out


def count_parameters(model: ARDetector) -> dict[str, int]:
    """Total parameters and the trainable count in each phase (the model's phase is restored)."""
    phase, training, override = model.phase, model.training, model.freeze_override
    uniq = lambda ps: sum(p.numel() for p in {id(p): p for p in ps}.values())  # noqa: E731
    total = uniq(model.parameters())
    counts = {"total": total}
    for ph in (1, 2):
        model.set_phase(ph, freeze_backbones=override)
        counts[f"trainable_phase{ph}"] = uniq(p for p in model.parameters() if p.requires_grad)
    model.set_phase(phase, freeze_backbones=override)
    model.train(training)
    parts = {"image_backbone": model.backbone, "text_backbone": model.text_backbone}
    for k, m in parts.items():
        counts[k] = uniq(m.parameters())
    return counts
