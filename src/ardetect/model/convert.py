"""Start from public GroundingDINO weights: convert transformers' checkpoints into our modules.

``from_transformers_state_dict(state_dict, hf_config)`` maps a
``GroundingDinoForObjectDetection`` state dict (backbone included) onto an
``ARDetector`` and returns the matching ``ModelConfig``. Both key layouts are read:
transformers 4.x (``attention.self.query``, ``intermediate.dense``) as published on the
hub (IDEA-Research/grounding-dino-tiny, -base), and transformers 5.x (``q_proj``,
``mlp.fc1``). ARD's own parts (region-token projection, adapters) are not in the
checkpoint and keep their initialisation (adapters at identity).

``from_original_state_dict(state_dict)`` reads the original GroundingDINO ``.pth``
layout (IDEA-Research; ``torch.load(path)["model"]``), inferring the sizes from the
weights. CountGD checkpoints share that layout; their exemplar-specific extras are
reported as unmapped (``strict=False``) rather than guessed.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import torch
from torch import Tensor

from .config import TEXT_BACKBONES, ModelConfig

ARD_ONLY_PREFIXES = ("region_proj.", "adapter_query.", "adapter_text.", "logit_scale", "logit_bias")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def config_from_transformers(hf_config: Any, **overrides: Any) -> ModelConfig:
    """Our ``ModelConfig`` for a transformers ``GroundingDinoConfig`` (object or dict).

    Raises ``ValueError`` for settings our modules do not implement.
    """
    def need(key: str, want: Any, default: Any = None) -> None:
        got = _get(hf_config, key, default)
        if got != want:
            raise ValueError(f"GroundingDINO config {key}={got!r} is not supported (need {want!r})")

    need("two_stage", True, True)
    need("embedding_init_target", True, True)
    need("position_embedding_type", "sine", "sine")
    need("activation_function", "relu", "relu")
    need("query_dim", 4, 4)
    if _get(hf_config, "encoder_attention_heads") != _get(hf_config, "decoder_attention_heads"):
        raise ValueError("encoder_attention_heads and decoder_attention_heads differ: not supported")
    if _get(hf_config, "encoder_ffn_dim") != _get(hf_config, "decoder_ffn_dim"):
        raise ValueError("encoder_ffn_dim and decoder_ffn_dim differ: not supported")
    bb = _get(hf_config, "backbone_config")
    if bb is None or _get(bb, "model_type") != "swin":
        raise ValueError(f"backbone model_type={_get(bb, 'model_type')!r}: only Swin backbones are converted")
    out_features = _get(bb, "out_features") or [f"stage{i}" for i in (_get(bb, "out_indices") or [])]
    if list(out_features) != ["stage2", "stage3", "stage4"]:
        raise ValueError(f"backbone out_features={out_features!r}: need ['stage2', 'stage3', 'stage4']")
    if _get(bb, "patch_size", 4) != 4:
        raise ValueError(f"backbone patch_size={_get(bb, 'patch_size')!r}: need 4")
    image_size = _get(bb, "image_size", 224)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    tc = _get(hf_config, "text_config")
    text_dims = (_get(tc, "hidden_size"), _get(tc, "num_hidden_layers"), _get(tc, "num_attention_heads"), _get(tc, "intermediate_size"))
    named_text = [k for k, v in TEXT_BACKBONES.items() if v == text_dims and k != "minilm-l6"]
    values: dict[str, Any] = dict(
        size="custom",
        image_backbone="swin",
        swin_embed_dim=_get(bb, "embed_dim"),
        swin_depths=tuple(_get(bb, "depths")),
        swin_num_heads=tuple(_get(bb, "num_heads")),
        swin_window_size=_get(bb, "window_size"),
        swin_pretrain_image_size=int(image_size),
        text_backbone=named_text[0] if named_text else "custom",
        text_custom=None if named_text else text_dims,
        text_vocab_size=_get(tc, "vocab_size", 30522),
        text_pretrained=None,
        max_text_len=_get(hf_config, "max_text_len"),
        hidden_dim=_get(hf_config, "d_model"),
        num_heads=_get(hf_config, "encoder_attention_heads"),
        encoder_layers=_get(hf_config, "encoder_layers"),
        decoder_layers=_get(hf_config, "decoder_layers"),
        ffn_dim=_get(hf_config, "encoder_ffn_dim"),
        dropout=0.0,
        fusion_droppath=_get(hf_config, "fusion_droppath", 0.1),
        num_feature_levels=_get(hf_config, "num_feature_levels"),
        encoder_points=_get(hf_config, "encoder_n_points"),
        decoder_points=_get(hf_config, "decoder_n_points"),
        num_queries=_get(hf_config, "num_queries"),
        pos_temperature=_get(hf_config, "positional_embedding_temperature", 20),
        share_bbox_head=_get(hf_config, "decoder_bbox_embed_share", True),
        freeze_backbones=True,  # loaded pretrained
    )
    values.update(overrides)
    return ModelConfig(**values)


# HF Swin key (after the backbone prefix) -> timm Swin key, for both transformers layouts.
_SWIN_RULES: list[tuple[str, str]] = [
    (r"^embeddings\.patch_embeddings\.projection\.", "body.patch_embed.proj."),
    (r"^embeddings\.norm\.", "body.patch_embed.norm."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.", r"body.layers.\1.blocks.\2.norm1."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.", r"body.layers.\1.blocks.\2.norm2."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.(?:self\.|relative_position_bias\.)relative_position_bias_table$", r"body.layers.\1.blocks.\2.attn.relative_position_bias_table"),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"body.layers.\1.blocks.\2.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.", r"body.layers.\1.blocks.\2.mlp.fc1."),
    (r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.(?:output\.dense|mlp\.fc2)\.", r"body.layers.\1.blocks.\2.mlp.fc2."),
]
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.(?:self\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")
_DOWN = re.compile(r"^encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)$")
_NORM = re.compile(r"^hidden_states_norms\.stage(\d)\.(weight|bias)$")
_SKIP = re.compile(r"(relative_position_index|^layernorm\.)")


def _convert_swin(sd: Mapping[str, Tensor], out: dict[str, Tensor]) -> None:
    qkv: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        if _SKIP.search(key):
            continue
        m = _QKV.match(key)
        if m:
            i, j, long_name, short, kind = m.groups()
            part = long_name[0] if long_name else short
            qkv.setdefault((i, j, kind), {})[part] = value
            continue
        m = _DOWN.match(key)
        if m:  # timm downsamples at the start of the next stage
            i, part, kind = m.groups()
            out[f"backbone.body.layers.{int(i) + 1}.downsample.{part}.{kind}"] = value
            continue
        m = _NORM.match(key)
        if m:
            out[f"backbone.norms.{int(m.group(1)) - 2}.{m.group(2)}"] = value
            continue
        for pattern, repl in _SWIN_RULES:
            if re.match(pattern, key):
                out["backbone." + re.sub(pattern, repl, key)] = value
                break
        else:
            raise KeyError(f"unmapped Swin backbone key {key!r}")
    for (i, j, kind), parts in qkv.items():
        out[f"backbone.body.layers.{i}.blocks.{j}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)


_DIRECT = [
    ("model.input_proj_vision.", "input_proj."),
    ("model.text_backbone.", "text_backbone."),
    ("model.text_projection.", "text_projection."),
    ("model.query_position_embeddings.", "query_embed."),
    ("model.enc_output_norm.", "enc_output_norm."),
    ("model.enc_output.", "enc_output."),
    ("model.encoder_output_bbox_embed.", "enc_bbox_head."),
    ("model.encoder.", "encoder."),
    ("model.decoder.layer_norm.", "decoder.layer_norm."),
    ("model.decoder.layers.", "decoder.layers."),
    ("model.decoder.reference_points_head.", "decoder.reference_points_head."),
    ("bbox_embed.", "bbox_heads."),
]


def from_transformers_state_dict(
    state_dict: Mapping[str, Tensor], hf_config: Any, **overrides: Any
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Convert a ``GroundingDinoForObjectDetection`` state dict -> (ModelConfig, our state dict).

    ``overrides`` go to the ``ModelConfig`` (e.g. ``region_tokens=False``). The returned
    state dict lacks only ARD's own parts (``ARD_ONLY_PREFIXES``); load it with
    ``load_converted``.
    """
    cfg = config_from_transformers(hf_config, **overrides)
    out: dict[str, Tensor] = {}
    backbone: dict[str, Tensor] = {}
    bb_prefix = re.compile(r"^model\.backbone\.conv_encoder\.model\.(?:swin\.)?")
    for key, value in state_dict.items():
        if bb_prefix.match(key):
            backbone[bb_prefix.sub("", key)] = value
            continue
        if key == "model.level_embed":
            out["level_embed"] = value
            continue
        if key.startswith("model.decoder.bbox_embed.") or key.startswith("model.decoder.class_embed") or key.startswith("class_embed"):
            continue  # tied copies of the top-level heads / parameter-free heads
        if key.endswith("special_tokens") or "position_ids" in key:
            continue
        for src, dst in _DIRECT:
            if key.startswith(src):
                out[dst + key[len(src):]] = value
                break
        else:
            raise KeyError(f"unmapped GroundingDINO key {key!r}")
    _convert_swin(backbone, out)
    # the box heads: one shared module or one per layer
    n = cfg.decoder_layers
    for i in range(n):
        for k in [k for k in list(out) if k.startswith("bbox_heads.0.")]:
            tgt = f"bbox_heads.{i}." + k[len("bbox_heads.0."):]
            if tgt not in out:
                if not cfg.share_bbox_head:
                    raise KeyError(f"checkpoint lacks {tgt!r} (unshared box heads)")
                out[tgt] = out[k]
    if cfg.share_bbox_head:
        for k in [k for k in out if k.startswith("bbox_heads.") and not k.startswith("bbox_heads.0.")]:
            ref = "bbox_heads.0." + k.split(".", 2)[2]
            if not torch.equal(out[k], out[ref]):
                raise ValueError(f"decoder_bbox_embed_share is set but {k!r} differs from {ref!r}")
    return cfg, out


def load_converted(model: torch.nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a converted state dict; only ARD's own parts may be missing, nothing may be left over."""
    result = model.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(ARD_ONLY_PREFIXES)]
    if missing or result.unexpected_keys:
        raise ValueError(f"converted weights do not fit: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}")


def load_transformers_checkpoint(path_or_id: str, field: str = "model.pretrained", **overrides: Any):
    """An ``ARDetector`` from a local transformers GroundingDINO folder or a cached hub id
    (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``; never downloads)."""
    from ..weights import local_folder
    from .detector import build

    folder = local_folder(path_or_id, field, "config.json")
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{field}={path_or_id!r}: {folder / 'config.json'} is not JSON ({err})") from None
    weights = folder / "model.safetensors" if (folder / "model.safetensors").exists() else folder / "pytorch_model.bin"
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(weights))
        else:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{field}={path_or_id!r}: {folder} has neither model.safetensors nor pytorch_model.bin") from None
    except Exception as err:  # noqa: BLE001 - safetensors, pickle and zip errors of a file cut short or of another format
        raise ValueError(f"{field}={path_or_id!r}: {weights} cannot be read ({type(err).__name__}: {err})") from None
    overrides.setdefault("tokenizer", str(folder) if (folder / "vocab.txt").exists() or (folder / "tokenizer.json").exists() else None)
    cfg, ours = from_transformers_state_dict(sd, hf_config, **overrides)
    model = build(cfg)
    load_converted(model, ours)
    return model


# --- original GroundingDINO (IDEA-Research) .pth layout -------------------------------
_ORIG_ENCODER = {  # transformer.encoder.{layers|text_layers|fusion_layers}.{i}.<key> -> encoder.layers.{i}.<ours>
    "layers": {
        "self_attn.": "deformable_layer.self_attn.", "norm1.": "deformable_layer.self_attn_layer_norm.",
        "linear1.": "deformable_layer.fc1.", "linear2.": "deformable_layer.fc2.", "norm2.": "deformable_layer.final_layer_norm.",
    },
    "text_layers": {
        "self_attn.": "text_enhancer_layer.self_attn.", "linear1.": "text_enhancer_layer.fc1.", "linear2.": "text_enhancer_layer.fc2.",
        "norm1.": "text_enhancer_layer.layer_norm_before.", "norm2.": "text_enhancer_layer.layer_norm_after.",
    },
    "fusion_layers": {
        "gamma_v": "fusion_layer.vision_param", "gamma_l": "fusion_layer.text_param",
        "layer_norm_v.": "fusion_layer.layer_norm_vision.", "layer_norm_l.": "fusion_layer.layer_norm_text.",
        "attn.v_proj.": "fusion_layer.attn.vision_proj.", "attn.l_proj.": "fusion_layer.attn.text_proj.",
        "attn.values_v_proj.": "fusion_layer.attn.values_vision_proj.", "attn.values_l_proj.": "fusion_layer.attn.values_text_proj.",
        "attn.out_v_proj.": "fusion_layer.attn.out_vision_proj.", "attn.out_l_proj.": "fusion_layer.attn.out_text_proj.",
    },
}
_ORIG_DECODER = {
    "cross_attn.": "encoder_attn.", "norm1.": "encoder_attn_layer_norm.", "ca_text.": "encoder_attn_text.",
    "catext_norm.": "encoder_attn_text_layer_norm.", "self_attn.": "self_attn.", "norm2.": "self_attn_layer_norm.",
    "linear1.": "fc1.", "linear2.": "fc2.", "norm3.": "final_layer_norm.",
}
_ORIG_TOP = [
    ("bert.", "text_backbone."), ("feat_map.", "text_projection."), ("input_proj.", "input_proj."),
    ("transformer.tgt_embed.", "query_embed."), ("transformer.enc_output_norm.", "enc_output_norm."),
    ("transformer.enc_output.", "enc_output."), ("transformer.enc_out_bbox_embed.", "enc_bbox_head."),
    ("transformer.decoder.norm.", "decoder.layer_norm."), ("transformer.decoder.ref_point_head.", "decoder.reference_points_head."),
    ("bbox_embed.", "bbox_heads."),
]


def _split_in_proj(key: str, value: Tensor, out: dict[str, Tensor]) -> None:
    """nn.MultiheadAttention's packed in_proj -> our query/key/value linears."""
    base, kind = key.rsplit(".in_proj_", 1)  # kind: "weight" | "bias"
    for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
        out[f"{base}.{name}.{kind}"] = part


def _original_key(key: str) -> str | None:
    """Our key for an original GroundingDINO key (None: no parameter of ours)."""
    if key.startswith("backbone.0."):
        k = key[len("backbone.0."):]
        if "relative_position_index" in k or k.endswith("attn_mask"):
            return None
        m = re.match(r"^norm(\d)\.(weight|bias)$", k)
        if m:
            return f"backbone.norms.{int(m.group(1)) - 1}.{m.group(2)}"
        m = re.match(r"^layers\.(\d+)\.downsample\.(.+)$", k)
        if m:
            return f"backbone.body.layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        return "backbone.body." + k  # timm keeps the original Swin names
    if key.startswith(("class_embed.", "transformer.enc_out_class_embed", "transformer.decoder.bbox_embed.", "transformer.decoder.class_embed")):
        return None  # parameter-free heads / the decoder's copy of the shared box head
    if key.endswith("position_ids") or key.startswith("bert.pooler."):
        return None
    if key == "transformer.level_embed":
        return "level_embed"
    m = re.match(r"^transformer\.encoder\.(layers|text_layers|fusion_layers)\.(\d+)\.(.+)$", key)
    if m:
        group, i, rest = m.groups()
        for src, dst in _ORIG_ENCODER[group].items():
            if rest.startswith(src):
                return f"encoder.layers.{i}.{dst}{rest[len(src):]}"
        raise KeyError(f"unmapped GroundingDINO encoder key {key!r}")
    m = re.match(r"^transformer\.decoder\.layers\.(\d+)\.(.+)$", key)
    if m:
        i, rest = m.groups()
        for src, dst in _ORIG_DECODER.items():
            if rest.startswith(src):
                return f"decoder.layers.{i}.{dst}{rest[len(src):]}"
        raise KeyError(f"unmapped GroundingDINO decoder key {key!r}")
    for src, dst in _ORIG_TOP:
        if key.startswith(src):
            return dst + key[len(src):]
    raise KeyError(f"unmapped GroundingDINO key {key!r}")


def config_from_original(state_dict: Mapping[str, Tensor], **overrides: Any) -> ModelConfig:
    """Infer a ``ModelConfig`` from the shapes of an original GroundingDINO state dict."""
    sd = state_dict
    embed = sd["backbone.0.patch_embed.proj.weight"].shape[0]
    depths, heads, window = [], [], None
    for i in range(4):
        blocks = {int(k.split(".")[5]) for k in sd if k.startswith(f"backbone.0.layers.{i}.blocks.")}
        depths.append(len(blocks))
        table = sd[f"backbone.0.layers.{i}.blocks.0.attn.relative_position_bias_table"]
        heads.append(table.shape[1])
        window = int(round((table.shape[0] ** 0.5 + 1) / 2))
    d = sd["transformer.level_embed"].shape[1]
    bert_layers = len({int(k.split(".")[3]) for k in sd if k.startswith("bert.encoder.layer.")})
    text_hidden = sd["bert.embeddings.word_embeddings.weight"].shape[1]
    text_inter = sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
    text_dims = (text_hidden, bert_layers, max(1, text_hidden // 64), text_inter)
    named_text = [k for k, v in TEXT_BACKBONES.items() if v == text_dims and k != "minilm-l6"]
    n_enc = len({int(k.split(".")[3]) for k in sd if k.startswith("transformer.encoder.layers.")})
    n_dec = len({int(k.split(".")[3]) for k in sd if k.startswith("transformer.decoder.layers.")})
    offsets = sd["transformer.encoder.layers.0.self_attn.sampling_offsets.weight"].shape[0]
    attn_w = sd["transformer.encoder.layers.0.self_attn.attention_weights.weight"].shape[0]
    dec_attn_w = sd["transformer.decoder.layers.0.cross_attn.attention_weights.weight"].shape[0]
    levels = len({int(k.split(".")[1]) for k in sd if k.startswith("input_proj.")})
    num_heads = overrides.pop("num_heads", 8)
    values: dict[str, Any] = dict(
        size="custom", image_backbone="swin", swin_embed_dim=embed, swin_depths=tuple(depths), swin_num_heads=tuple(heads),
        swin_window_size=window, swin_pretrain_image_size=224 if window == 7 else 384,
        text_backbone=named_text[0] if named_text else "custom", text_custom=None if named_text else text_dims,
        text_vocab_size=sd["bert.embeddings.word_embeddings.weight"].shape[0], text_pretrained=None,
        hidden_dim=d, num_heads=num_heads, encoder_layers=n_enc, decoder_layers=n_dec,
        ffn_dim=sd["transformer.encoder.layers.0.linear1.weight"].shape[0], num_feature_levels=levels,
        encoder_points=attn_w // (num_heads * levels), decoder_points=dec_attn_w // (num_heads * levels),
        num_queries=sd["transformer.tgt_embed.weight"].shape[0], share_bbox_head=True, freeze_backbones=True,
    )
    if offsets != 2 * attn_w:
        raise ValueError(f"sampling_offsets ({offsets}) is not twice attention_weights ({attn_w}): unknown layout")
    values.update(overrides)
    return ModelConfig(**values)


def from_original_state_dict(
    state_dict: Mapping[str, Tensor], strict: bool = True, **overrides: Any
) -> tuple[ModelConfig, dict[str, Tensor], list[str]]:
    """Convert an original GroundingDINO ``.pth`` state dict (``torch.load(p)["model"]``).

    Returns (config, our state dict, unmapped keys). ``strict=False`` collects keys of
    unknown layout (e.g. CountGD's exemplar-specific parameters, whose layout is not
    public in a form checked here) instead of raising; our region-token projection and
    adapters keep their initialisation either way. The number of attention heads is
    not stored in the weights: pass ``num_heads`` when it is not GroundingDINO's 8.
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    cfg = config_from_original(sd, **overrides)
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in sd.items():
        try:
            ours = _original_key(key)
        except KeyError:
            if strict:
                raise
            unmapped.append(key)
            continue
        if ours is None:
            continue
        if ".in_proj_" in ours:
            _split_in_proj(ours, value, out)
        else:
            out[ours] = value
    for i in range(1, cfg.decoder_layers):  # one shared box head
        for k in [k for k in out if k.startswith("bbox_heads.0.")]:
            out.setdefault(f"bbox_heads.{i}." + k[len("bbox_heads.0."):], out[k])
    return cfg, out, unmapped
