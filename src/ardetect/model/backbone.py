"""Image backbones (timm) and the text backbone (transformers).

The image backbone returns three feature maps at strides 8, 16 and 32, each
layer-normalised over channels for Swin (as GroundingDINO's Swin does), so that the
input projections and the region tokens read the same features.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from torch import Tensor, nn

from .config import BUNDLED_MINILM, ModelConfig, bundled_minilm_path


# --- image -----------------------------------------------------------------------
def _swin_attn_pad_then_shift(self, x: Tensor) -> Tensor:
    """Shifted-window attention of one timm Swin block, padding *before* the cyclic shift.

    timm shifts then pads; the original Swin (and so GroundingDINO's weights and
    transformers' port) pads to a multiple of the window first, then shifts, and masks
    with the padded size. The two differ whenever a side is not a multiple of the window
    (e.g. 800x1333 inputs), so our Swin blocks use this order.
    """
    b, h, w, c = x.shape  # [B, H, W, C]
    wh, ww = self.window_size
    pad_h, pad_w = (wh - h % wh) % wh, (ww - w % ww) % ww
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    sh, sw = self.shift_size
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    windows = x.view(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, c)  # [B*nW, wh*ww, C]
    mask = self.get_attn_mask(x) if (sh or sw) else None
    out = self.attn(windows, mask=mask)  # [B*nW, wh*ww, C]
    out = out.view(b, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)  # [B, Hp, Wp, C]
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


class PadThenShiftSwinBlock(SwinTransformerBlock):
    """timm's Swin block whose window attention pads before the shift (``_swin_attn_pad_then_shift``).

    ``SwinBackbone`` sets its blocks' class to it. A class, not a method bound to each block:
    a model pickled whole (AbC on ARD's backbone, ``save_abc``) then loads back, where a bound
    method was pickled as a lookup of its name on the block, which fails."""

    _attn = _swin_attn_pad_then_shift


class SwinBackbone(nn.Module):
    """timm Swin Transformer; stages 2-4 (strides 8/16/32), each with its own LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from timm.models.swin_transformer import SwinTransformer

        self.patch_size = 4
        self.body = SwinTransformer(
            img_size=cfg.swin_pretrain_image_size,
            patch_size=self.patch_size,
            embed_dim=cfg.swin_embed_dim,
            depths=tuple(cfg.swin_depths),
            num_heads=tuple(cfg.swin_num_heads),
            window_size=cfg.swin_window_size,
            always_partition=True,
            strict_img_size=False,
            num_classes=0,
            drop_path_rate=0.0,
        )
        self.body.norm = nn.Identity()  # the classification norm is unused
        for stage in self.body.layers:
            for block in stage.blocks:
                block.__class__ = PadThenShiftSwinBlock
        self.channels = [cfg.swin_embed_dim * 2**i for i in (1, 2, 3)]
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        h, w = x.shape[-2:]
        p = self.patch_size
        x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.body.patch_embed(x)  # [B, H/4, W/4, C]
        feats = []
        for i, stage in enumerate(self.body.layers):
            x = stage(x)  # [B, h, w, C_i] (timm downsamples at the start of stages 1-3)
            if i >= 1:
                feats.append(self.norms[i - 1](x).permute(0, 3, 1, 2).contiguous())  # [B, C_i, h, w]
        return feats


class CNNBackbone(nn.Module):
    """A timm CNN (``features_only``) at strides 8/16/32: the ``nano`` backbone."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.body = timm.create_model(cfg.cnn_name, pretrained=False, features_only=True, out_indices=(2, 3, 4))
        reductions = self.body.feature_info.reduction()
        if list(reductions) != [8, 16, 32]:
            raise ValueError(f"cnn_name={cfg.cnn_name!r} gives feature strides {reductions}, need [8, 16, 32]")
        self.channels = list(self.body.feature_info.channels())

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x))


def build_image_backbone(cfg: ModelConfig) -> nn.Module:
    backbone = SwinBackbone(cfg) if cfg.image_backbone == "swin" else CNNBackbone(cfg)
    if cfg.image_pretrained is not None:
        load_image_weights(backbone, cfg.image_pretrained)
    return backbone


def load_image_weights(backbone: nn.Module, path: str) -> None:
    """Load image-backbone weights from a file: our own backbone state dict (``body.*``,
    ``norms.*``) or a plain timm checkpoint of the same architecture (classifier head and
    final norm ignored; Swin's per-level norms then keep their initialisation).
    Raises ``ValueError`` when a weight of the body is missing or misshapen."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not any(k.startswith(("body.", "norms.")) for k in state):
        state = {"body." + k: v for k, v in state.items()}
    own = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in own}
    bad_shape = [k for k, v in usable.items() if v.shape != own[k].shape]
    if bad_shape:
        raise ValueError(f"image_pretrained={path!r}: shapes differ for {bad_shape[:5]}")
    missing = [k for k, _ in backbone.named_parameters() if k.startswith("body.") and k not in usable]
    if missing:
        raise ValueError(f"image_pretrained={path!r} lacks backbone weights {missing[:5]} ({len(missing)} in all)")
    backbone.load_state_dict(usable, strict=False)


class SinePositionEmbedding(nn.Module):
    """DETR's normalised 2-D sine position embedding of a feature map: [B, H, W] mask -> [B, D, H, W]."""

    def __init__(self, hidden_dim: int, temperature: int):
        super().__init__()
        self.num_feats = hidden_dim // 2
        self.temperature = temperature

    def forward(self, mask: Tensor) -> Tensor:
        y = mask.cumsum(1, dtype=torch.float32)  # [B, H, W]
        x = mask.cumsum(2, dtype=torch.float32)
        y = y / (y[:, -1:, :] + 1e-6) * 2 * torch.pi
        x = x / (x[:, :, -1:] + 1e-6) * 2 * torch.pi
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_feats)
        pos_x = x[..., None] / dim_t  # [B, H, W, D/2]
        pos_y = y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # [B, D, H, W]


# --- text ------------------------------------------------------------------------
def _resolve_text_source(source: str | None) -> str | None:
    if source == BUNDLED_MINILM:
        return str(bundled_minilm_path())
    return source


def load_tokenizer(cfg: ModelConfig):
    """The prompt tokenizer: ``cfg.tokenizer``, else the text encoder's, else the bundled bert-base-uncased vocabulary."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or _resolve_text_source(cfg.text_pretrained) or str(bundled_minilm_path())
    return AutoTokenizer.from_pretrained(source, local_files_only=True)  # never downloads


def build_text_backbone(cfg: ModelConfig) -> nn.Module:
    """A BERT-style encoder from transformers: pretrained from a local path / cached hub id, or random from a config."""
    from transformers import AutoModel, BertConfig

    source = _resolve_text_source(cfg.text_pretrained)
    if source is not None:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the unused pooler weights are reported otherwise
        try:
            model = AutoModel.from_pretrained(source, add_pooling_layer=False, local_files_only=True)
        finally:
            hf_logging.set_verbosity(level)
        if model.config.hidden_size != cfg.text_hidden:
            raise ValueError(
                f"text_pretrained={cfg.text_pretrained!r} has hidden size {model.config.hidden_size}, "
                f"text_backbone={cfg.text_backbone!r} needs {cfg.text_hidden}"
            )
        return model
    hidden, layers, heads, inter = cfg.text_dims
    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
        vocab_size=cfg.text_vocab_size, max_position_embeddings=512,
    )
    return AutoModel.from_config(config, add_pooling_layer=False)

