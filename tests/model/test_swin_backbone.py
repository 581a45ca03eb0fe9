"""The Swin image backbone (T-B, B-B, B-L): its blocks pad before the shift, and a model pickled whole loads back."""

from __future__ import annotations

import torch

from ardetect.model.backbone import PadThenShiftSwinBlock, SwinBackbone, _swin_attn_pad_then_shift
from ardetect.model.config import ModelConfig

TINY_SWIN = dict(swin_embed_dim=16, swin_depths=(1, 1, 2, 1), swin_num_heads=(1, 2, 2, 4), swin_window_size=4, swin_pretrain_image_size=64)


def test_swin_blocks_pad_before_the_shift_and_a_pickled_backbone_loads_back(tmp_path):
    """``save_abc`` pickles AbC's base whole; on ARD's backbone (abc_ard) that is this module. Its blocks' padding
    order was once a method bound to each block, which pickled as a lookup of its name and failed to load."""
    torch.manual_seed(0)
    backbone = SwinBackbone(ModelConfig.named("T-B", **TINY_SWIN)).eval()
    blocks = [b for stage in backbone.body.layers for b in stage.blocks]
    assert len(blocks) == 5 and all(type(b) is PadThenShiftSwinBlock for b in blocks)
    assert all(b._attn.__func__ is _swin_attn_pad_then_shift for b in blocks)
    assert any(b.shift_size != (0, 0) for b in blocks)  # a shifted block, where the order matters
    x = torch.rand(2, 3, 72, 88)  # sides that are not multiples of the window at every stage: the padding runs
    with torch.no_grad():
        before = backbone(x)
    torch.save({"base": backbone}, tmp_path / "abc.pt")
    loaded = torch.load(tmp_path / "abc.pt", map_location="cpu", weights_only=False)["base"]
    with torch.no_grad():
        after = loaded(x)
    assert len(before) == len(after) == 3
    for a, b in zip(before, after):
        assert torch.equal(a, b)
