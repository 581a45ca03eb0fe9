import math

import pytest
from pydantic import ValidationError

from ardetect.model import SIZES, ModelConfig


def test_named_sizes_match_the_paper():
    bb = ModelConfig.named("B-B")
    assert (bb.hidden_dim, bb.num_heads, bb.encoder_layers, bb.decoder_layers, bb.ffn_dim) == (256, 8, 6, 6, 2048)
    assert (bb.num_feature_levels, bb.encoder_points, bb.decoder_points, bb.num_queries) == (4, 4, 4, 900)
    assert (bb.pos_temperature, bb.max_text_len, bb.dropout) == (20, 256, 0.0)
    assert bb.swin_embed_dim == 128 and bb.swin_depths == (2, 2, 18, 2) and bb.text_backbone == "bert-base"
    assert ModelConfig.named("T-B").swin_embed_dim == 96
    assert ModelConfig.named("B-L").text_backbone == "bert-large"
    nano = ModelConfig.named("nano")
    assert nano.image_size == (160, 160) and 64 <= nano.hidden_dim <= 128 and nano.encoder_layers <= 2
    assert nano.text_backbone == "minilm-l6" and nano.text_pretrained is not None
    assert set(SIZES) == {"nano", "T-B", "B-B", "B-L"}


@pytest.mark.parametrize("size", ["nano", "T-B", "B-B", "B-L"])
def test_named_sizes_start_the_contrastive_head_unsaturated(size):
    """A named size is trained from scratch: its head starts at 1/sqrt(hidden) and the prior bias
    (sigmoid 0.01), not GroundingDINO's scale 1 and bias 0, which saturate random weights."""
    cfg = ModelConfig.named(size)
    assert cfg.logit_scale == pytest.approx(cfg.hidden_dim ** -0.5)
    assert cfg.logit_bias == pytest.approx(-math.log(99.0))
    assert 1 / (1 + math.exp(-cfg.logit_bias)) == pytest.approx(0.01)
    wider = ModelConfig.named(size, hidden_dim=128, num_heads=8, ffn_dim=512)
    assert wider.logit_scale == pytest.approx(128 ** -0.5)
    given = ModelConfig.named(size, logit_scale=1.0, logit_bias=0.0)
    assert (given.logit_scale, given.logit_bias) == (1.0, 0.0)


def test_overrides_apply():
    cfg = ModelConfig.named("nano", num_queries=50, separate_query_backbone=True)
    assert cfg.num_queries == 50 and cfg.separate_query_backbone and cfg.size == "nano"


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_dim=100), "hidden_dim"),
        (dict(hidden_dim=32, num_heads=2, ffn_dim=64, image_size=(64, 64), num_queries=16), "coarsest feature level"),
        (dict(num_heads=3), "num_heads"),
        (dict(num_queries=100000), "num_queries"),
        (dict(max_text_len=1000), "max_text_len"),
        (dict(text_backbone="custom"), "text_custom"),
        (dict(text_backbone="bert-base"), "text_pretrained"),
    ],
)
def test_incompatible_settings_raise_naming_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.named("nano", **overrides)


def test_a_coarsest_level_of_one_value_per_group_is_refused_only_there():
    """GroupNorm(32) of a 1 x 1 level with 32 channels sees one value a group: the level is a constant."""
    small = dict(num_heads=2, ffn_dim=64, num_queries=16)
    assert ModelConfig.named("nano", hidden_dim=64, image_size=(64, 64), **small)  # two channels a group
    assert ModelConfig.named("nano", hidden_dim=32, image_size=(96, 96), **small)  # a 2 x 2 coarsest level
    assert ModelConfig.named("nano", hidden_dim=32, image_size=(64, 64), num_feature_levels=3, **small)  # stride 32: 2 x 2
    with pytest.raises(ValueError, match=r"image_size=\[64, 64\] with hidden_dim=32: the coarsest feature level \(stride 64\)"):
        ModelConfig.named("T-B", hidden_dim=32, image_size=(64, 64), **small)


def test_unknown_key_and_size_rejected():
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.named("nano", hidden_size=64)
    with pytest.raises(ValidationError):
        ModelConfig(hiden_dim=64)
    with pytest.raises(ValueError, match="size"):
        ModelConfig.named("huge")


def test_config_is_frozen():
    cfg = ModelConfig.named("nano")
    with pytest.raises(ValidationError):
        cfg.hidden_dim = 128
