"""Transformer layers of the detector: deformable attention, image<->text fusion, text
enhancer, encoder and decoder layers, and the small heads.

The computation follows GroundingDINO (and its transformers port) step by step so that
converted weights reproduce it; the code is our own. Masks use one convention
throughout: ``True`` = a real token / may attend, ``False`` = padding / blocked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# --- embeddings and small heads ----------------------------------------------------
def sine_embed(coords: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of each coordinate in [..., K] -> [..., K * num_feats].

    Coordinates are multiplied by 2*pi (so normalised boxes and integer position ids
    both work); for K >= 2 the first two coordinates' embeddings swap places
    (DETR's (y, x, w, h) order).
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    emb = coords.float()[..., None] * (2 * math.pi) / dim_t  # [..., K, F]
    emb = torch.stack((emb[..., 0::2].sin(), emb[..., 1::2].cos()), dim=-1).flatten(-2)  # [..., K, F]
    if coords.shape[-1] >= 2:
        emb = torch.cat([emb[..., 1:2, :], emb[..., 0:1, :], emb[..., 2:, :]], dim=-2)
    return emb.flatten(-2).to(coords.dtype)  # [..., K*F]


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query/key/value projections and a boolean mask."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """q [B, Nq, D], k/v [B, Nk, D], mask [B, Nq, Nk] or [B, 1, Nk] bool (True = attend) -> [B, Nq, D]."""
        b, nq, d = q.shape
        h = self.num_heads
        q = self.query(q).view(b, nq, h, d // h).transpose(1, 2)  # [B, h, Nq, d/h]
        k = self.key(k).view(b, -1, h, d // h).transpose(1, 2)  # [B, h, Nk, d/h]
        v = self.value(v).view(b, -1, h, d // h).transpose(1, 2)
        attn_mask = mask[:, None] if mask is not None else None  # [B, 1, Nq|1, Nk]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, nq, d)  # [B, Nq, D]
        return self.out_proj(out)


# --- deformable attention ----------------------------------------------------------
def multi_scale_deformable_attention(value: Tensor, shapes: list[tuple[int, int]], grids: Tensor, weights: Tensor) -> Tensor:
    """Sample each level's values at the given points and sum them, weighted.

    Plain PyTorch (``grid_sample``): runs on any device and exports to ONNX. The points
    come level-major with the queries last, so each level's samples come out of
    ``grid_sample`` as [B*H, Dh, P, Q] and their weighted sum over the P points runs
    along a contiguous axis, level by level, without stacking all levels' samples.

    Args:
        value: [B, S, H, Dh], the S = sum(h*w) flattened tokens of all levels, per head.
        shapes: the (h, w) of each level, in order.
        grids: [L, B, H, P, Q, 2] sampling points, (x, y) in grid_sample's [-1, 1].
        weights: [L, B, H, P, Q] attention weights (softmaxed over L*P).
    Returns:
        [B, Q, H*Dh]
    """
    b, _, nh, dh = value.shape
    _, _, _, npt, nq, _ = grids.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = grids.to(value.dtype)
    weights = weights.to(value.dtype)
    out = None
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(b * nh, dh, h, w)  # [B*H, Dh, h, w]
        sampled = F.grid_sample(v, grids[lvl].reshape(b * nh, npt, nq, 2), mode="bilinear", padding_mode="zeros", align_corners=False)  # [B*H, Dh, P, Q]
        wl = weights[lvl].reshape(b * nh, 1, npt, nq)
        if torch.jit.is_tracing():  # an exported graph: one product and sum per level, not npt unrolled slices
            part = (sampled * wl).sum(2)
            out = part if out is None else out + part
            continue
        # accumulate in place: no [B*H, Dh, P, Q] product is ever materialised (6x faster on CPU). The points come
        # from unbind, not one slice each: a slice's backward fills a zero tensor of the whole [B*H, Dh, P, Q] and the
        # P of them are added up, where unbind's stacks the P gradients once (the same values, bit for bit)
        for s, wp in zip(sampled.unbind(2), wl.unbind(2)):  # [B*H, Dh, Q], [B*H, 1, Q]
            if out is None:
                out = s * wp
            else:
                out.addcmul_(s, wp)
    return out.view(b, nh * dh, nq).transpose(1, 2).contiguous()  # [B, Q, H*Dh]


class DeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR)."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True).values).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self, query: Tensor, reference_points: Tensor, value: Tensor, value_mask: Tensor | None, shapes: list[tuple[int, int]]
    ) -> Tensor:
        """query [B, Q, D]; reference_points [B, Q, L, 2] points or [B, Q, L, 4] boxes (cxcywh, normalised);
        value [B, S, D]; value_mask [B, S] bool (True = real) -> [B, Q, D]."""
        b, nq, d = query.shape
        nh, nl, npt = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value)
        if value_mask is not None:
            v = v.masked_fill(~value_mask[..., None], 0.0)
        v = v.view(b, -1, nh, d // nh)  # [B, S, H, Dh]
        if torch.jit.is_tracing():
            return self.output_proj(self._traced(query, reference_points, v, shapes))
        # level-major, queries last: [L, B, H, P, Q, ...] (see multi_scale_deformable_attention)
        offsets = self.sampling_offsets(query).view(b, nq, nh, nl, npt, 2).permute(3, 0, 2, 4, 1, 5).contiguous()  # [L, B, H, P, Q, 2]
        weights = self.attention_weights(query).view(b, nq, nh, nl * npt).softmax(-1).view(b, nq, nh, nl, npt).permute(3, 0, 2, 4, 1)
        ref = reference_points.permute(2, 0, 1, 3)[:, :, None, None]  # [L, B, 1, 1, Q, 2 or 4]
        # sampling points in grid_sample's [-1, 1]: 2 * (reference + offset scaled) - 1
        if reference_points.shape[-1] == 2:
            scale = torch.tensor([[2.0 / w, 2.0 / h] for h, w in shapes], dtype=query.dtype, device=query.device)  # [L, 2]
            grids = torch.addcmul(2 * ref - 1, offsets, scale[:, None, None, None, None, :])
        else:
            grids = torch.addcmul(2 * ref[..., :2] - 1, offsets, ref[..., 2:] / npt)  # [L, B, H, P, Q, 2]
        out = multi_scale_deformable_attention(v, shapes, grids, weights.contiguous())
        return self.output_proj(out)

    def _traced(self, query: Tensor, reference_points: Tensor, v: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """``forward``'s sampling as an exported graph runs it fastest (same values).

        Sampling points stay in the linear layer's channel order [B, Q, H*L*P*2] until one
        transpose puts them in ``grid_sample``'s [B*H, Q, P, 2] per level: every broadcast
        is over a leading or the innermost axis, the per-level scale of point offsets is
        folded into the linear layer's weights (a constant the runtime folds), and the
        weighted sum over points runs along the innermost axis.
        """
        b, nq, _ = query.shape
        nh, nl, npt = self.num_heads, self.num_levels, self.num_points
        dh = v.shape[-1]
        # channel c = ((head * L + level) * P + point) * 2 + xy of the offsets, level*2 + xy of the references
        level_xy = torch.arange(nh * nl * npt * 2, device=query.device).view(nh, nl, npt, 2)
        level_xy = (level_xy // 2 // npt % nl * 2 + level_xy % 2).flatten()  # [C] -> index into [L*2]
        if reference_points.shape[-1] == 2:
            per_level = torch.tensor([[2.0 / w, 2.0 / h] for h, w in shapes], dtype=query.dtype, device=query.device).flatten()[level_xy]  # [C]
            offsets = F.linear(query, self.sampling_offsets.weight * per_level[:, None], self.sampling_offsets.bias * per_level)
            centre = (2 * reference_points - 1).flatten(-2)[..., level_xy]  # [B or 1, Q, C]
            grids = offsets + centre
        else:
            centre = (2 * reference_points[..., :2] - 1).reshape(b, nq, nl * 2)[..., level_xy]
            size = (reference_points[..., 2:] / npt).reshape(b, nq, nl * 2)[..., level_xy]
            grids = torch.addcmul(centre, self.sampling_offsets(query), size)
        grids = grids.to(v.dtype).view(b, nq, nh, nl, npt * 2).permute(3, 0, 2, 1, 4)  # [L, B, H, Q, P*2]; traced shapes can make refs double
        weights = self.attention_weights(query).view(b, nq, nh, nl * npt).softmax(-1).view(b, nq, nh, nl, npt).permute(3, 0, 2, 1, 4)
        out = None
        for lvl, (value, (h, w)) in enumerate(zip(v.split([h * w for h, w in shapes], dim=1), shapes)):
            value = value.permute(0, 2, 3, 1).reshape(b * nh, dh, h, w)
            sampled = F.grid_sample(value, grids[lvl].reshape(b * nh, nq, npt, 2), mode="bilinear", padding_mode="zeros", align_corners=False)
            part = (sampled * weights[lvl].reshape(b * nh, 1, nq, npt)).sum(-1)  # [B*H, Dh, Q]
            out = part if out is None else out + part
        return out.view(b, nh * dh, nq).transpose(1, 2)  # [B, Q, H*Dh]


# --- encoder ---------------------------------------------------------------------
class BiAttention(nn.Module):
    """Image<->text cross-attention sharing one similarity matrix (GroundingDINO's fusion)."""

    def __init__(self, dim: int, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.embed_dim = num_heads, embed_dim
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.vision_proj = nn.Linear(dim, embed_dim)
        self.text_proj = nn.Linear(dim, embed_dim)
        self.values_vision_proj = nn.Linear(dim, embed_dim)
        self.values_text_proj = nn.Linear(dim, embed_dim)
        self.out_vision_proj = nn.Linear(embed_dim, dim)
        self.out_text_proj = nn.Linear(embed_dim, dim)
        self.dropout = dropout
        for lin in (self.vision_proj, self.text_proj, self.values_vision_proj, self.values_text_proj, self.out_vision_proj, self.out_text_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, N, dh]

    def forward(self, vision: Tensor, text: Tensor, vision_mask: Tensor | None, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """vision [B, V, D], text [B, T, D], masks [B, V] / [B, T] bool (True = real) -> (delta_vision, delta_text)."""
        b, nv, _ = vision.shape
        nt = text.shape[1]
        q = self._heads(self.vision_proj(vision) * self.scale)  # [B, h, V, dh]
        k = self._heads(self.text_proj(text))  # [B, h, T, dh]
        vv = self._heads(self.values_vision_proj(vision))  # [B, h, V, dh]
        vt = self._heads(self.values_text_proj(text))  # [B, h, T, dh]
        logits = q @ k.transpose(-1, -2)  # [B, h, V, T]
        logits_t = logits.transpose(-1, -2)  # [B, h, T, V]
        if vision_mask is not None:
            logits_t = logits_t.masked_fill(~vision_mask[:, None, None, :], float("-inf"))
        if text_mask is not None:
            logits = logits.masked_fill(~text_mask[:, None, None, :], float("-inf"))
        attn_v = F.dropout(logits.softmax(-1), self.dropout, self.training)  # vision attends to text
        attn_t = F.dropout(logits_t.softmax(-1), self.dropout, self.training)  # text attends to vision
        out_v = (attn_v @ vt).transpose(1, 2).reshape(b, nv, self.embed_dim)  # [B, V, E]
        out_t = (attn_t @ vv).transpose(1, 2).reshape(b, nt, self.embed_dim)  # [B, T, E]
        return self.out_vision_proj(out_v), self.out_text_proj(out_t)


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class FusionLayer(nn.Module):
    """Pre-norm bi-directional fusion with layer scale (initialised to 1e-4)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, droppath: float, dropout: float = 0.0):
        super().__init__()
        self.layer_norm_vision = nn.LayerNorm(dim)
        self.layer_norm_text = nn.LayerNorm(dim)
        self.attn = BiAttention(dim, ffn_dim // 2, num_heads // 2, dropout)
        self.drop_path = DropPath(droppath)
        self.vision_param = nn.Parameter(torch.full((dim,), 1e-4))
        self.text_param = nn.Parameter(torch.full((dim,), 1e-4))

    def forward(self, vision: Tensor, text: Tensor, vision_mask: Tensor | None, text_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        vision = self.layer_norm_vision(vision)
        text = self.layer_norm_text(text)
        dv, dt = self.attn(vision, text, vision_mask, text_mask)
        return vision + self.drop_path(self.vision_param * dv), text + self.drop_path(self.text_param * dt)


class TextEnhancerLayer(nn.Module):
    """Post-norm self-attention + FFN over the prompt tokens, masked to phrases."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, num_heads)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.layer_norm_before = nn.LayerNorm(dim)
        self.layer_norm_after = nn.LayerNorm(dim)
        self.dropout = dropout

    def forward(self, text: Tensor, self_mask: Tensor, pos: Tensor) -> Tensor:
        """text [B, T, D], self_mask [B, T, T] bool, pos [B, T, D] -> [B, T, D]."""
        q = text + pos
        text = self.layer_norm_before(text + F.dropout(self.self_attn(q, q, text, self_mask), self.dropout, self.training))
        ffn = self.fc2(F.dropout(F.relu(self.fc1(text)), self.dropout, self.training))
        return self.layer_norm_after(text + F.dropout(ffn, self.dropout, self.training))


class DeformableEncoderLayer(nn.Module):
    """Post-norm deformable self-attention + FFN over the image tokens."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, num_levels: int, num_points: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = DeformableAttention(dim, num_heads, num_levels, num_points)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = dropout

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, mask: Tensor | None, shapes: list[tuple[int, int]]) -> Tensor:
        attn = self.self_attn(x + pos, reference_points, x, mask, shapes)
        x = self.self_attn_layer_norm(x + F.dropout(attn, self.dropout, self.training))
        ffn = self.fc2(F.dropout(F.relu(self.fc1(x)), self.dropout, self.training))
        return self.final_layer_norm(x + F.dropout(ffn, self.dropout, self.training))


class EncoderLayer(nn.Module):
    """Fusion, then text enhancer, then deformable image self-attention (GroundingDINO's order)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, num_levels: int, num_points: int, droppath: float, dropout: float):
        super().__init__()
        self.fusion_layer = FusionLayer(dim, ffn_dim, num_heads, droppath)
        self.text_enhancer_layer = TextEnhancerLayer(dim, ffn_dim // 2, num_heads // 2, dropout=0.0)
        self.deformable_layer = DeformableEncoderLayer(dim, ffn_dim, num_heads, num_levels, num_points, dropout)


class Encoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_kwargs) for _ in range(num_layers))

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Centre of every token of every level, [B, S, L, 2] (x, y), scaled by each level's valid ratio."""
        refs = []
        for lvl, (h, w) in enumerate(shapes):
            ry, rx = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=valid_ratios.dtype, device=valid_ratios.device),
                torch.linspace(0.5, w - 0.5, w, dtype=valid_ratios.dtype, device=valid_ratios.device),
                indexing="ij",
            )
            ry = ry.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # [B, h*w]
            rx = rx.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((rx, ry), -1))  # [B, h*w, 2]
        ref = torch.cat(refs, 1)  # [B, S, 2]
        return ref[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]

    def forward(
        self, vision: Tensor, vision_pos: Tensor, vision_mask: Tensor, shapes: list[tuple[int, int]], valid_ratios: Tensor,
        text: Tensor, text_mask: Tensor, text_self_mask: Tensor, text_pos: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """vision [B, S, D] (+ pos, mask [B, S] True = real), text [B, T, D] (mask [B, T], self mask [B, T, T], pos [B, T, D])."""
        ref = self.reference_points(shapes, valid_ratios)
        for layer in self.layers:
            vision, text = layer.fusion_layer(vision, text, vision_mask, text_mask)
            text = layer.text_enhancer_layer(text, text_self_mask, text_pos)
            vision = layer.deformable_layer(vision, vision_pos, ref, vision_mask, shapes)
        return vision, text


# --- decoder ---------------------------------------------------------------------
class DecoderLayer(nn.Module):
    """Self-attention, text cross-attention, deformable image cross-attention, FFN (all post-norm)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, num_levels: int, num_points: int, dropout: float):
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, num_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn_text = MultiHeadAttention(dim, num_heads)
        self.encoder_attn_text_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = DeformableAttention(dim, num_heads, num_levels, num_points)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = dropout

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training)

    def forward(
        self, x: Tensor, pos: Tensor, reference_points: Tensor, memory: Tensor, memory_mask: Tensor | None,
        shapes: list[tuple[int, int]], text: Tensor, text_mask: Tensor,
    ) -> Tensor:
        q = x + pos
        x = self.self_attn_layer_norm(x + self._drop(self.self_attn(q, q, x)))
        x = self.encoder_attn_text_layer_norm(x + self._drop(self.encoder_attn_text(x + pos, text, text, text_mask[:, None, :])))
        x = self.encoder_attn_layer_norm(x + self._drop(self.encoder_attn(x + pos, reference_points, memory, memory_mask, shapes)))
        ffn = self.fc2(self._drop(F.relu(self.fc1(x))))
        return self.final_layer_norm(x + self._drop(ffn))


class Decoder(nn.Module):
    """Decoder with iterative box refinement: each layer moves the reference boxes."""

    def __init__(self, num_layers: int, dim: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim=dim, **layer_kwargs) for _ in range(num_layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.reference_points_head = MLP(2 * dim, dim, dim, 2)
        self.dim = dim

    def forward(
        self, target: Tensor, reference_points: Tensor, memory: Tensor, memory_mask: Tensor | None,
        shapes: list[tuple[int, int]], valid_ratios: Tensor, text: Tensor, text_mask: Tensor, bbox_heads: nn.ModuleList,
    ) -> tuple[Tensor, Tensor]:
        """``bbox_heads`` are the detector's box heads (one per layer, maybe the same module).
        target [B, Q, D], reference_points [B, Q, 4] (cxcywh, normalised) ->
        (hidden [n_layers, B, Q, D] layer-normed, refined references [n_layers, B, Q, 4])."""
        x = target
        hidden, refs = [], []
        scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        for i, layer in enumerate(self.layers):
            ref_in = reference_points[:, :, None] * scale  # [B, Q, L, 4]
            pos = self.reference_points_head(sine_embed(ref_in[:, :, 0, :], self.dim // 2))  # [B, Q, D]
            x = layer(x, pos, ref_in, memory, memory_mask, shapes, text, text_mask)
            delta = bbox_heads[i](x)  # [B, Q, 4]
            reference_points = (delta + torch.special.logit(reference_points, eps=1e-5)).sigmoid().detach()
            hidden.append(self.layer_norm(x))
            refs.append(reference_points)
        return torch.stack(hidden), torch.stack(refs)
