"""Our detector reproduces transformers' GroundingDINO after weight conversion."""

import json
import os

import pytest
import torch
from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

from ardetect.model import build
from ardetect.model.convert import config_from_transformers, from_original_state_dict, from_transformers_state_dict, load_converted

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def tiny_hf_config(**kw) -> GroundingDinoConfig:
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4, image_size=64, out_indices=[2, 3, 4])
    text = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    args = dict(
        backbone_config=backbone, text_config=text, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        num_queries=20, max_text_len=32,
    )
    args.update(kw)
    return GroundingDinoConfig(**args)


def randomize(model: torch.nn.Module) -> None:
    """Move the parameters GroundingDINO initialises to constants (layer scale, zero heads) off them."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("vision_param", "text_param")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            elif ("bbox_embed" in name and "layers.2" in name) or "sampling_offsets.weight" in name or "attention_weights.weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("share_heads", [True, False])
def test_parity_with_transformers_groundingdino(share_heads):
    torch.manual_seed(0)
    hf_cfg = tiny_hf_config(decoder_bbox_embed_share=share_heads)
    hf = GroundingDinoForObjectDetection(hf_cfg).eval()
    randomize(hf)
    cfg, state = from_transformers_state_dict(hf.state_dict(), hf_cfg, region_tokens=False)
    ours = build(cfg).eval()
    load_converted(ours, state)
    assert cfg.share_bbox_head == share_heads and cfg.text_backbone == "custom"

    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 70, 60, generator=g)  # not a multiple of the window: exercises Swin padding
    ids = torch.tensor([[101, 2000, 2001, 1012, 2002, 2003, 2004, 1012, 102], [101, 2005, 1012, 2006, 1029, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        want = hf(pixel_values=(images - MEAN) / STD, input_ids=ids, attention_mask=mask)
        got = ours(images, ours.encode_text_ids(ids, mask))
    t = ids.shape[1]
    valid = mask.bool()[:, None, :].expand(-1, hf_cfg.num_queries, -1)
    assert (want.logits[..., :t][valid] - got.pred_logits[valid]).abs().max() <= 1e-4
    assert (want.pred_boxes - got.pred_boxes).abs().max() <= 1e-4
    assert want.logits[..., :t][valid].std() > 0.1  # a non-trivial comparison


def test_converted_model_runs_with_region_tokens():
    hf_cfg = tiny_hf_config()
    hf = GroundingDinoForObjectDetection(hf_cfg).eval()
    cfg, state = from_transformers_state_dict(hf.state_dict(), hf_cfg, image_size=(64, 64))
    model = build(cfg).eval()
    load_converted(model, state)
    assert cfg.region_tokens and cfg.freeze_backbones
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.text_backbone.parameters())
    cache = model.encode_query(torch.rand(1, 3, 64, 64), torch.tensor([[2.0, 2.0, 30.0, 40.0]]), ["a V* cat."], ["V* cat"])
    boxes, scores = model.predict_region(torch.rand(2, 3, 64, 64), cache)
    assert boxes.shape == (2, 4) and scores.shape == (2,)


def test_legacy_swin_key_layout_is_read():
    """transformers 4.x checkpoints (as on the hub) name Swin weights attention.self.query etc."""
    hf_cfg = tiny_hf_config()
    hf = GroundingDinoForObjectDetection(hf_cfg).eval()
    sd = hf.state_dict()
    legacy = {}
    for k, v in sd.items():
        k2 = k.replace(".model.swin.", ".model.")
        k2 = k2.replace("attention.q_proj", "attention.self.query").replace("attention.k_proj", "attention.self.key")
        k2 = k2.replace("attention.v_proj", "attention.self.value").replace("attention.o_proj", "attention.output.dense")
        k2 = k2.replace("attention.relative_position_bias.relative_position_bias_table", "attention.self.relative_position_bias_table")
        k2 = k2.replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense") if "backbone" in k2 else k2
        legacy[k2] = v
    _, a = from_transformers_state_dict(sd, hf_cfg)
    _, b = from_transformers_state_dict(legacy, hf_cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_converted_config_keeps_groundingdinos_head_start():
    """GroundingDINO's checkpoints hold no logit scale or bias: a converted model starts them at its
    scale 1 and bias 0, unlike a named size from scratch."""
    cfg = config_from_transformers(tiny_hf_config())
    assert (cfg.logit_scale, cfg.logit_bias) == (1.0, 0.0)


def test_unsupported_configs_raise():
    with pytest.raises(ValueError, match="two_stage"):
        config_from_transformers(tiny_hf_config(two_stage=False))
    with pytest.raises(ValueError, match="decoder_attention_heads"):
        config_from_transformers(tiny_hf_config(decoder_attention_heads=8))


def to_original_layout(state: dict) -> dict:
    """Our state dict written in the original GroundingDINO .pth layout (inverse of the converter's tables)."""
    import re

    from ardetect.model.convert import _ORIG_DECODER, _ORIG_ENCODER, _ORIG_TOP

    out, packed = {}, {}
    for key, value in state.items():
        if key.startswith(("region_proj.", "adapter_")):
            continue
        if key.startswith("backbone."):
            m = re.match(r"^backbone\.norms\.(\d)\.(.+)$", key)
            if m:
                out[f"backbone.0.norm{int(m.group(1)) + 1}.{m.group(2)}"] = value
                continue
            m = re.match(r"^backbone\.body\.layers\.(\d+)\.downsample\.(.+)$", key)
            if m:
                out[f"backbone.0.layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = value
                continue
            out[key.replace("backbone.body.", "backbone.0.")] = value
            continue
        if key == "level_embed":
            out["transformer.level_embed"] = value
            continue
        m = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$", key)
        if m:
            part, i, rest = m.groups()
            tables = _ORIG_ENCODER.items() if part == "encoder" else [("layers", _ORIG_DECODER)]
            for group, table in tables:
                for src, dst in table.items():
                    if rest.startswith(dst):
                        prefix = f"transformer.{part}.{group}.{i}.{src}"
                        tail = rest[len(dst):]
                        q = re.match(r"^(query|key|value)\.(weight|bias)$", tail)
                        if q and src.endswith(("self_attn.", "ca_text.")) and group != "layers" or (q and part == "decoder"):
                            packed.setdefault(f"{prefix}in_proj_{q.group(2)}", {})[q.group(1)] = value
                        else:
                            out[prefix + tail] = value
                        break
                else:
                    continue
                break
            else:
                raise KeyError(key)
            continue
        for src, dst in _ORIG_TOP:
            if key.startswith(dst):
                out[src + key[len(dst):]] = value
                break
        else:
            raise KeyError(key)
    for k, parts in packed.items():
        out[k] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return {"module." + k: v for k, v in out.items()}


def test_original_pth_layout_converts_to_the_same_model():
    hf_cfg = tiny_hf_config()
    hf = GroundingDinoForObjectDetection(hf_cfg).eval()
    randomize(hf)
    cfg, state = from_transformers_state_dict(hf.state_dict(), hf_cfg, region_tokens=False)
    original = to_original_layout(state)
    assert any(k.endswith("in_proj_weight") for k in original) and "module.backbone.0.norm1.weight" in original
    cfg2, state2, unmapped = from_original_state_dict(original, region_tokens=False, num_heads=4, text_backbone="custom", text_custom=cfg.text_custom)
    assert not unmapped
    for field in ("swin_embed_dim", "swin_depths", "swin_num_heads", "swin_window_size", "hidden_dim", "encoder_layers",
                  "decoder_layers", "ffn_dim", "num_feature_levels", "encoder_points", "decoder_points", "num_queries"):
        assert getattr(cfg2, field) == getattr(cfg, field), field
    assert state2.keys() == state.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    with pytest.raises(KeyError):
        from_original_state_dict({**original, "module.exemplar_proj.weight": torch.zeros(1)}, num_heads=4,
                                 text_backbone="custom", text_custom=cfg.text_custom)
    _, _, unmapped = from_original_state_dict({**original, "module.exemplar_proj.weight": torch.zeros(1)}, strict=False,
                                              num_heads=4, text_backbone="custom", text_custom=cfg.text_custom)
    assert unmapped == ["exemplar_proj.weight"]


def test_an_unreadable_transformers_checkpoint_is_named_with_its_field(tmp_path):
    from ardetect.model.convert import load_transformers_checkpoint

    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config().to_dict()))
    (tmp_path / "model.safetensors").write_bytes(os.urandom(100))
    with pytest.raises(ValueError, match=rf"model.pretrained='{tmp_path}': {tmp_path / 'model.safetensors'} cannot be read"):
        load_transformers_checkpoint(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has neither model.safetensors nor pytorch_model.bin"):
        load_transformers_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_bytes(b"\x1f\x8b not json")
    with pytest.raises(ValueError, match="config.json is not JSON"):
        load_transformers_checkpoint(str(tmp_path))


def test_load_transformers_checkpoint_from_a_saved_folder(tmp_path):
    from ardetect.model.convert import load_transformers_checkpoint

    hf_cfg = tiny_hf_config()
    hf = GroundingDinoForObjectDetection(hf_cfg).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    model = load_transformers_checkpoint(str(tmp_path), region_tokens=False).eval()
    ids = torch.tensor([[101, 2000, 2001, 1012, 102]])
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = hf(pixel_values=(images - MEAN) / STD, input_ids=ids)
        got = model(images, model.encode_text_ids(ids))
    assert (want.logits[..., :5] - got.pred_logits).abs().max() <= 1e-4
    assert (want.pred_boxes - got.pred_boxes).abs().max() <= 1e-4


def test_a_missing_checkpoint_is_named_by_its_setting(tmp_path, monkeypatch):
    from ardetect.model.convert import load_transformers_checkpoint
    from ardetect.weights import WeightsError, local_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"model\.pretrained='.*no-such-folder' does not exist on this machine"):
        load_transformers_checkpoint(str(tmp_path / "no-such-folder"))
    with pytest.raises(WeightsError, match=r"model\.pretrained='IDEA-Research/not-a-cached-model' is not in the local Hugging Face cache"):
        load_transformers_checkpoint("IDEA-Research/not-a-cached-model")  # a hub id, not in the cache: nothing downloaded
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"generate\.customization\.base_model=.*has no model_index\.json"):
        local_folder(str(tmp_path / "empty"), "generate.customization.base_model", "model_index.json")
    (tmp_path / "empty" / "model_index.json").write_text("{}")
    assert local_folder(str(tmp_path / "empty"), "generate.customization.base_model", "model_index.json") == tmp_path / "empty"
