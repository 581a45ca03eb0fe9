import pytest
import torch

from ardetect.model import ARDOutput, ModelConfig, QueryCache, build, param_groups
from ardetect.model.detector import MASKED_LOGIT

PROMPT = "A charcoal sketch of a V* cat sitting on a rock."
CONCEPT = "V* cat"


def encode(model, query, prompt=PROMPT, concept=CONCEPT):
    image, box = query
    return model.encode_query(image, box, [prompt], [concept])


def test_nano_output_shapes(nano, nano_cfg, query, candidates):
    cache = encode(nano, query)
    assert isinstance(cache, QueryCache) and cache.batch_size == 1
    with torch.no_grad():
        out = nano(candidates, cache)
    n, q, t = 3, nano_cfg.num_queries, cache.text.shape[1]
    assert isinstance(out, ARDOutput)
    assert out.pred_logits.shape == (n, q, t) and out.pred_boxes.shape == (n, q, 4)
    assert len(out.aux_outputs) == nano_cfg.decoder_layers - 1
    for aux in out.aux_outputs:
        assert aux["pred_logits"].shape == (n, q, t) and aux["pred_boxes"].shape == (n, q, 4)
    assert out.enc_outputs["pred_logits"].shape == (n, q, t) and out.enc_outputs["pred_boxes"].shape == (n, q, 4)
    assert out.token_mask.shape == (n, t) and out.concept_mask.shape == (n, t)
    assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()
    assert torch.isfinite(out.pred_logits).all()
    # two prompts of different lengths: the shorter one's padding tokens get the masked logit
    image, box = query
    pair = nano.encode_query(image.repeat(2, 1, 1, 1), box.repeat(2, 1), [PROMPT, "a cat."], [CONCEPT, "cat"])
    with torch.no_grad():
        two = nano(candidates[:2], pair)
    padding = ~two.token_mask[:, None, :].expand(-1, q, -1)
    assert padding.any() and (two.pred_logits[padding] == MASKED_LOGIT).all()
    assert (two.pred_logits[~padding] > MASKED_LOGIT).all()


def test_query_cache_broadcast_equals_per_image(nano, query, candidates):
    cache = encode(nano, query)
    with torch.no_grad():
        batched = nano(candidates, cache)
        for i in range(len(candidates)):
            single = nano(candidates[i : i + 1], cache)
            torch.testing.assert_close(single.pred_logits[0], batched.pred_logits[i], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(single.pred_boxes[0], batched.pred_boxes[i], atol=1e-5, rtol=1e-5)


def test_cached_query_equals_recomputed(nano, query, candidates):
    cache = encode(nano, query)
    with torch.no_grad():
        a = nano(candidates, cache)
        b = nano(candidates, encode(nano, query))
        c = nano(candidates, cache)  # reuse again
    assert torch.equal(a.pred_logits, b.pred_logits) and torch.equal(a.pred_logits, c.pred_logits)


def test_cache_of_batch_n_pairs_with_n_images(nano, query, candidates):
    image, box = query
    cache = nano.encode_query(image.expand(3, -1, -1, -1), box.expand(3, 4), [PROMPT] * 3, [CONCEPT] * 3)
    with torch.no_grad():
        paired = nano(candidates, cache)
        broadcast = nano(candidates, encode(nano, query))
    torch.testing.assert_close(paired.pred_logits, broadcast.pred_logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="batch 3"):
        nano(candidates[:2], cache)


def test_region_token_depends_on_the_box(nano, query):
    image, box = query
    a = nano.encode_query(image, box, [PROMPT], [CONCEPT])
    b = nano.encode_query(image, torch.tensor([[0.0, 0.0, 30.0, 30.0]]), [PROMPT], [CONCEPT])
    r = a.region_mask[0]
    assert not torch.allclose(a.text[0, r], b.text[0, r])
    torch.testing.assert_close(a.text[0, ~r], b.text[0, ~r])


def test_adapters_at_identity_leave_logits_unchanged(nano, query, candidates):
    cache = encode(nano, query)
    with torch.no_grad():
        on = nano(candidates, cache)
        nano.adapters_enabled = False
        try:
            off = nano(candidates, cache)
        finally:
            nano.adapters_enabled = True
    torch.testing.assert_close(on.pred_logits, off.pred_logits, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(on.pred_boxes, off.pred_boxes)


def test_adapters_rescore_without_moving_boxes(nano_cfg, query, candidates):
    torch.manual_seed(0)
    model = build(nano_cfg).eval()
    cache = encode(model, query)
    with torch.no_grad():
        before = model(candidates, cache)
        model.adapter_query.weight.add_(0.1 * torch.randn_like(model.adapter_query.weight))
        model.adapter_text.bias.add_(0.1)
        after = model(candidates, cache)
    assert not torch.allclose(before.pred_logits, after.pred_logits)
    torch.testing.assert_close(before.pred_boxes, after.pred_boxes)
    torch.testing.assert_close(before.enc_outputs["pred_logits"], after.enc_outputs["pred_logits"])
    # switched off, the moved adapters are not applied: the logits are the identity adapters' (ARD-)
    model.adapters_enabled = False
    with torch.no_grad():
        off = model(candidates, cache)
    torch.testing.assert_close(off.pred_logits, before.pred_logits, atol=1e-4, rtol=1e-5)


def test_predict_region_is_best_concept_box(nano, query, candidates):
    cache = encode(nano, query)
    boxes, scores = nano.predict_region(candidates, cache)
    assert boxes.shape == (3, 4) and scores.shape == (3,)
    with torch.no_grad():
        out = nano(candidates, cache)
    prob = out.pred_logits.sigmoid()[:, :, cache.concept_mask[0]]  # [N, Q, concept tokens]
    want = prob.flatten(1).max(1).values
    torch.testing.assert_close(scores, want)
    q_best = prob.max(-1).values.argmax(1)
    cx, cy, w, h = out.pred_boxes[torch.arange(3), q_best].unbind(-1)
    want_boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * candidates.shape[-1]
    torch.testing.assert_close(boxes, want_boxes)
    assert (boxes[:, 2:] >= boxes[:, :2]).all()
    # scaled to given image sizes, and chunked scoring gives the same
    sizes = torch.tensor([[320, 640]] * 3)
    boxes2, scores2 = nano.predict_region(candidates, cache, image_sizes=sizes, chunk_size=2)
    torch.testing.assert_close(scores2, scores, atol=1e-5, rtol=1e-5)
    side = candidates.shape[-1]
    torch.testing.assert_close(boxes2, boxes * torch.tensor([640 / side, 320 / side] * 2), atol=1e-3, rtol=1e-4)


def _grads_after_backward(model, query, candidates):
    model.zero_grad(set_to_none=True)
    model.train()
    cache = encode(model, query)
    out = model(candidates[:2], cache)
    loss = out.pred_logits.float().sigmoid().mean() + out.pred_boxes.mean()
    loss = loss + sum(a["pred_logits"].sigmoid().mean() + a["pred_boxes"].mean() for a in out.aux_outputs)
    loss = loss + out.enc_outputs["pred_logits"].sigmoid().mean() + out.enc_outputs["pred_boxes"].mean()
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return with_grad, trainable


def test_phase1_gradients_reach_exactly_the_trainable_parameters(nano_cfg, query, candidates):
    torch.manual_seed(0)
    model = build(nano_cfg)
    model.set_phase(1)
    with_grad, trainable = _grads_after_backward(model, query, candidates)
    assert with_grad == trainable
    # nano: MiniLM pretrained -> frozen; CNN random -> trains; adapters wait for phase 2
    assert not any(n.startswith("text_backbone.") for n in trainable)
    assert any(n.startswith("backbone.") for n in trainable)
    assert not any(n.startswith("adapter_") for n in trainable)
    assert any(n.startswith("region_proj.") for n in with_grad)
    assert any("sampling_offsets" in n for n in with_grad)
    assert not model.text_backbone.training  # frozen encoder stays in eval mode


def test_phase2_trains_only_adapters(nano_cfg, query, candidates):
    torch.manual_seed(0)
    model = build(nano_cfg)
    model.set_phase(2)
    with_grad, trainable = _grads_after_backward(model, query, candidates)
    assert trainable == {"adapter_query.weight", "adapter_query.bias", "adapter_text.weight", "adapter_text.bias"}
    assert with_grad == trainable


def test_freeze_flag_overrides_default(nano_cfg):
    model = build(nano_cfg.model_copy(update={"freeze_backbones": True}))
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model = build(nano_cfg.model_copy(update={"freeze_backbones": False}))
    assert all(p.requires_grad for p in model.text_backbone.parameters())
    model.set_phase(1, freeze_backbones=True)
    assert not any(p.requires_grad for p in model.text_backbone.parameters())


def test_param_groups(nano_cfg):
    model = build(nano_cfg)
    # three distinct rates: the offsets' lr is lr x mult, not the backbone's
    groups = param_groups(model, lr=1e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1, weight_decay=3e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["rest"]["lr"] == 1e-4 and by_name["backbone"]["lr"] == 2e-5
    assert by_name["linear_proj"]["lr"] == pytest.approx(1e-5)
    assert all(g["weight_decay"] == 3e-4 for g in groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)] for p in by_name["linear_proj"]["params"])
    assert any("reference_points_head" in names[id(p)] for p in by_name["linear_proj"]["params"])
    n_group = sum(len(g["params"]) for g in groups)
    n_train = len({id(p) for p in model.parameters() if p.requires_grad})
    assert n_group == n_train
    torch.optim.AdamW(groups)  # accepted as is
    model.set_phase(2)
    assert [g["name"] for g in param_groups(model, 1e-4, 1e-5)] == ["rest"]


def test_determinism_under_seed(nano_cfg, query, candidates):
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build(nano_cfg).eval()
        with torch.no_grad():
            outs.append(model(candidates, encode(model, query)))
    assert torch.equal(outs[0].pred_logits, outs[1].pred_logits)
    assert torch.equal(outs[0].pred_boxes, outs[1].pred_boxes)


def test_separate_query_backbone(nano_cfg, query, candidates):
    torch.manual_seed(0)
    shared = build(nano_cfg).eval()
    torch.manual_seed(0)
    separate = build(nano_cfg.model_copy(update={"separate_query_backbone": True})).eval()
    assert shared.query_backbone is None and separate.query_backbone is not separate.backbone
    assert separate.query_backbone.state_dict().keys() == separate.backbone.state_dict().keys()
    with torch.no_grad():
        a = shared(candidates, encode(shared, query))
        b = separate(candidates, encode(separate, query))
        torch.testing.assert_close(a.pred_logits, b.pred_logits)  # same weights at start
        next(separate.query_backbone.parameters()).add_(1.0)
        c = separate(candidates, encode(separate, query))
    assert not torch.allclose(a.pred_logits, c.pred_logits)


def test_region_tokens_off(nano_cfg, candidates):
    model = build(nano_cfg.model_copy(update={"region_tokens": False})).eval()
    assert model.region_proj is None
    cache = model.encode_query(None, None, [PROMPT], [CONCEPT])
    assert not cache.region_mask.any() and cache.concept_mask.sum() == 3  # "v", "*", "cat"
    with torch.no_grad():
        assert model(candidates, cache).pred_logits.shape[-1] == cache.text.shape[1]


@pytest.mark.parametrize(
    "box, match",
    [
        ([[30.0, 40.0, 200.0, 80.0]], "outside"),
        ([[-10.0, 40.0, 60.0, 80.0]], "outside"),
        ([[50.0, 40.0, 50.0, 80.0]], "degenerate"),
        ([[60.0, 40.0, 50.0, 80.0]], "degenerate"),
        ([[float("nan"), 40.0, 50.0, 80.0]], "non-finite"),
        ([[1.0, 2.0, 3.0]], r"\[N, 4\]"),
    ],
)
def test_bad_query_box_raises(nano, query, box, match):
    image, _ = query
    with pytest.raises(ValueError, match=match):
        nano.encode_query(image, torch.tensor(box), [PROMPT], [CONCEPT])


def test_bad_prompts_raise(nano, query):
    image, box = query
    with pytest.raises(ValueError, match="empty"):
        nano.encode_query(image, box, [""], [CONCEPT])
    with pytest.raises(ValueError, match="does not contain"):
        nano.encode_query(image, box, ["a photo of a dog."], [CONCEPT])
    with pytest.raises(ValueError, match="max_text_len"):
        nano.encode_query(image, box, ["a V* cat " + "on a big rock " * 20], [CONCEPT])
    with pytest.raises(ValueError, match="required"):
        nano.encode_query(None, None, [PROMPT], [CONCEPT])


@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((3, 160, 160), torch.float32, "rank 4"),
        ((1, 1, 3, 160, 160), torch.float32, "rank 4"),
        ((1, 1, 160, 160), torch.float32, "3 \\(RGB\\) channels"),
        ((1, 4, 160, 160), torch.float32, "3 \\(RGB\\) channels"),
        ((1, 3, 160, 160), torch.uint8, "floating point"),
    ],
)
def test_bad_images_raise(nano, query, shape, dtype, match):
    cache = encode(nano, query)
    bad = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        nano(bad, cache)
    with pytest.raises(ValueError, match=match):
        nano.encode_query(bad, query[1], [PROMPT], [CONCEPT])


@pytest.mark.slow
@pytest.mark.parametrize("size", ["T-B", "B-B", "B-L"])
def test_big_sizes_output_shapes_at_tiny_resolution(size):
    cfg = ModelConfig.named(size, image_size=(64, 64), num_queries=16)
    torch.manual_seed(0)
    model = build(cfg).eval()
    image = torch.rand(1, 3, 64, 64)
    cache = model.encode_query(image, torch.tensor([[4.0, 4.0, 40.0, 50.0]]), ["a V* cat on a rock."], [CONCEPT])
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64), cache)
    t = cache.text.shape[1]
    assert out.pred_logits.shape == (2, 16, t) and out.pred_boxes.shape == (2, 16, 4)
    assert len(out.aux_outputs) == 5 and torch.isfinite(out.pred_logits).all()
    assert cache.text.shape[-1] == 256


def test_image_pretrained_loads_timm_checkpoint_and_freezes(nano_cfg, tmp_path):
    import timm

    from ardetect.model.backbone import CNNBackbone

    donor = timm.create_model(nano_cfg.cnn_name, pretrained=False, num_classes=10)  # a classification checkpoint
    path = tmp_path / "cnn.pth"
    torch.save(donor.state_dict(), path)
    model = build(nano_cfg.model_copy(update={"image_pretrained": str(path)}))
    body = model.backbone.body.state_dict()
    for k, v in body.items():
        if k in donor.state_dict():
            assert torch.equal(v, donor.state_dict()[k])
    assert not any(p.requires_grad for p in model.backbone.parameters())  # pretrained -> frozen
    torch.save({"stem.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="image_pretrained"):
        CNNBackbone(nano_cfg)  # builds
        build(nano_cfg.model_copy(update={"image_pretrained": str(path)}))


def test_adapter_regularizer_is_zero_at_identity(nano_cfg):
    model = build(nano_cfg)
    assert model.adapter_regularizer().item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.adapter_query.weight.mul_(2.0)  # F^T F - I = 3 I
    d = nano_cfg.hidden_dim
    assert model.adapter_regularizer().item() == pytest.approx(0.5 * 3.0 * d**0.5, rel=1e-5)
    model.set_phase(2)
    model.adapter_regularizer().backward()
    assert model.adapter_query.weight.grad is not None and model.adapter_query.bias.grad is None


def test_too_small_images_and_bad_pixel_mask_raise(nano, query):
    cache = encode(nano, query)
    with pytest.raises(ValueError, match="num_queries"):
        nano(torch.rand(1, 3, 32, 32), cache)
    with pytest.raises(ValueError, match="pixel_mask"):
        nano(torch.rand(1, 3, 96, 96), cache, pixel_mask=torch.ones(1, 96, 90, dtype=torch.bool))


def test_pixel_mask_of_padded_batch(nano, query):
    """A padded image in a batch leaves its neighbours' results alone, and its mask is used."""
    cache = encode(nano, query)
    images = torch.rand(2, 3, 96, 96)
    mask = torch.ones(2, 96, 96, dtype=torch.bool)
    mask[1, :, 64:] = False
    images[1, :, :, 64:] = 0
    with torch.no_grad():
        out = nano(images, cache, pixel_mask=mask)
        alone = nano(images[:1], cache)
        unmasked = nano(images[1:], cache)
    assert torch.isfinite(out.pred_logits).all() and torch.isfinite(out.pred_boxes).all()
    torch.testing.assert_close(out.pred_logits[0], alone.pred_logits[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out.pred_logits[1], unmasked.pred_logits[0], atol=1e-3)


def test_image_cache_equals_images_and_is_reusable_across_queries(nano, query, candidates):
    feats = nano.encode_images(candidates)
    assert len(feats) == 3 and feats.features.shape[0] == 3
    other_query = (query[0].flip(-1), torch.tensor([[5.0, 5.0, 50.0, 60.0]]))
    for q in (query, other_query):
        cache = encode(nano, q)
        with torch.no_grad():
            want = nano(candidates, cache)
            got = nano(feats, cache)
        assert torch.equal(want.pred_logits, got.pred_logits) and torch.equal(want.pred_boxes, got.pred_boxes)
        b1, s1 = nano.predict_region(candidates, cache)
        b2, s2 = nano.predict_region(feats, cache, chunk_size=2)
        torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b1, b2, atol=1e-3, rtol=1e-4)
    from ardetect.model import ImageCache

    joined = ImageCache.cat([feats.select([0]), feats.select(slice(1, 3))])
    assert torch.equal(joined.features, feats.features)


def test_identity_reranking_scores_probability_times_region_similarity(nano, query, candidates):
    from ardetect.model.detector import RegionCandidates, region_candidates

    cache = encode(nano, query)
    feats = nano.encode_images(candidates, region_map=True)
    found = region_candidates(nano, None, feats, cache, top_k=4, identity=True)[""]
    assert found.boxes.shape == (3, 4, 4) and found.prob.shape == found.similarity[1].shape == (3, 4)
    assert (found.prob[:, :-1] >= found.prob[:, 1:]).all()  # descending
    paper_boxes, paper_scores = nano.predict_region(candidates, cache)
    torch.testing.assert_close(found.prob[:, 0], paper_scores)
    torch.testing.assert_close(found.boxes[:, 0], paper_boxes)
    # each similarity is the cosine between the query's region token and the region pooled at that box
    with torch.no_grad():
        token = nano.region_tokens(*query)[0, 0]
        for i in range(3):
            pooled = nano.pool_regions(nano.image_features(candidates[i : i + 1]), found.boxes[i][:1])[0, 0]
            want = torch.nn.functional.cosine_similarity(pooled, token, dim=0)
            torch.testing.assert_close(found.similarity[1][i, 0], want, atol=1e-5, rtol=1e-5)
    # w > 0: prob * exp(w (sim - 1)), best of the K boxes; raw images are encoded with their region maps
    w = 2.0
    score = found.prob * torch.exp(w * (found.similarity[1] - 1))
    want_scores, j = score.max(-1)
    boxes, scores = nano.predict_region(candidates, cache, identity_weight=w, top_k=4, chunk_size=2)
    torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(boxes, found.boxes[torch.arange(3), j], atol=1e-3, rtol=1e-4)
    assert (scores <= found.prob.max(-1).values + 1e-6).all()  # never above the best probability
    with pytest.raises(ValueError, match="identity_weight=-1"):
        found.pick(-1.0)
    with pytest.raises(ValueError, match="no region similarity"):
        RegionCandidates(found.boxes, found.prob).pick(1.0)
    with pytest.raises(ValueError, match="region maps"):
        nano.predict_region(nano.encode_images(candidates), cache, identity_weight=1.0)
    with pytest.raises(ValueError, match="top_k=0"):
        nano.predict_region(candidates, cache, top_k=0)
    with pytest.raises(ValueError, match="grid=2.*grids \\[1\\]"):
        found.pick(1.0, grid=2)


def test_identity_reranking_on_a_2x2_pooling_grid(nano, query, candidates):
    from torchvision.ops import roi_align

    from ardetect.model.detector import region_candidates

    images, boxes = query
    with torch.no_grad():
        plain = encode(nano, query)
        cache = nano.encode_query(images, boxes, [PROMPT], [CONCEPT], region_map=True)
        # keeping the map changes nothing else, and its 1x1 descriptor is the region token
        torch.testing.assert_close(cache.text, plain.text)
        torch.testing.assert_close(cache.descriptor(1), nano.region_tokens(images, boxes)[:, 0])
        rmap = nano.region_map(nano.image_features(images))
        # a 2x2 descriptor: RoIAlign on 2x2 cells of the stride-8 map, flattened channel-major
        roi = torch.cat([torch.zeros(1, 1), boxes.float()], 1)
        want_q = roi_align(rmap, roi, output_size=2, spatial_scale=1 / 8, sampling_ratio=-1, aligned=True).reshape(1, -1)
        torch.testing.assert_close(cache.descriptor(2), want_q)
        assert cache.descriptor(2).shape[-1] == 4 * cache.descriptor(1).shape[-1]
        feats = nano.encode_images(candidates, region_map=True)
        found = region_candidates(nano, None, feats, cache, top_k=3, identity=True, grids=(1, 2))[""]
        assert set(found.similarity) == {1, 2}
        for i in range(3):
            cand_map = nano.region_map(nano.image_features(candidates[i : i + 1]))
            roi = torch.cat([torch.zeros(3, 1), found.boxes[i]], 1)  # no image_sizes: the boxes are in the input's pixels
            pooled = roi_align(cand_map, roi, output_size=2, spatial_scale=1 / 8, sampling_ratio=-1, aligned=True).reshape(3, -1)
            want = torch.nn.functional.cosine_similarity(pooled, want_q, dim=-1)
            torch.testing.assert_close(found.similarity[2][i], want, atol=1e-5, rtol=1e-5)
        # the 2x2 score: prob * exp(w (sim_2x2 - 1)); predict_region(grid=2) gives the same
        want_scores, j = (found.prob * torch.exp(3.0 * (found.similarity[2] - 1))).max(-1)
        boxes2, scores2 = nano.predict_region(candidates, cache, identity_weight=3.0, top_k=3, grid=2)
        torch.testing.assert_close(scores2, want_scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(boxes2, found.boxes[torch.arange(3), j], atol=1e-3, rtol=1e-4)
        # a batch-1 query broadcasts its kept map with the rest of it
        assert cache.expand(3).region_map.shape[0] == 3 and cache.select([0]).region_box.shape == (1, 4)
    with pytest.raises(ValueError, match="grid=2.*region_map=True"):
        plain.descriptor(2)
    with pytest.raises(ValueError, match="grid=0"):
        nano.pool_map(rmap, boxes[:, None], 0)


def test_class_names_at_a_phrase_start_keep_their_own_features(nano):
    """Positions restart in every phrase; at position 0 MiniLM reads any word as [CLS], so a
    detection prompt's class names would all get the same features (cosine 0.9998 measured)."""
    from ardetect.model.text import tokenized_from_ids

    tok = nano.tokenizer
    ids = torch.tensor([tok("cat . dog . umbrella .")["input_ids"]])
    with torch.no_grad():
        text = nano.encode_text_ids(ids).text[0]  # [L, D]
    words = [i for i, t in enumerate(ids[0].tolist()) if t in tok.convert_tokens_to_ids(["cat", "dog", "umbrella"])]
    feats = torch.nn.functional.normalize(text[words], dim=-1)
    cos = feats @ feats.T
    assert len(words) == 3 and float(cos[~torch.eye(3, dtype=torch.bool)].max()) < 0.95
    assert tokenized_from_ids(ids, torch.ones_like(ids), nano.delimiters).text_position_ids[0, words].tolist() == [0, 0, 0]


def _with_classifier(nano_cfg, classes=("cat", "dog", "cup"), crop=32):
    torch.manual_seed(3)
    model = build(nano_cfg).eval()
    model.add_region_classifier(classes, crop)
    with torch.no_grad():  # a head that tells crops apart (the built one starts near uniform)
        model.region_classifier.head.weight.mul_(40.0)
    return model


def test_a_model_cast_to_bf16_encodes_a_query_through_its_region_classifier(nano_cfg, query):
    """``crop_regions`` gives fp32 crops: the classifier's bf16 convolutions refused them ("expected scalar type")."""
    model = _with_classifier(nano_cfg).to(torch.bfloat16)
    image, box = query
    cache = model.encode_query(image, box, [PROMPT], [CONCEPT])
    probs = cache.region_class
    assert probs.dtype == torch.bfloat16 and torch.isfinite(probs.float()).all()
    assert abs(float(probs.float().sum()) - 1.0) < 0.02


def test_region_classifier_crops_each_box_and_scores_its_class_match(nano_cfg, query, candidates):
    """The class match of a box is the dot product of the region classifier's distributions of the box's crop
    and of the query region's crop; the re-ranking multiplies it in as class_match ** a."""
    from ardetect.model.detector import RegionCandidates, region_candidates
    from ardetect.model.region_classifier import MARGIN, crop_regions

    model = _with_classifier(nano_cfg)
    clf = model.region_classifier
    cache = model.encode_query(*query, [PROMPT], [CONCEPT], region_map=True)
    with torch.no_grad():  # the query's class: the classifier on R_Q cut out with its margin, resized to the crop side
        x0, y0, x1, y1 = query[1][0].tolist()
        m = MARGIN * max(x1 - x0, y1 - y0)
        crop = crop_regions(query[0], torch.tensor([[[x0, y0, x1, y1]]]), clf.crop)
        assert crop.shape == (1, 3, 32, 32)
        # on a ramp (pixel i holds i / 128) bilinear sampling is exact: column j of the crop reads the centre of
        # the j-th of 32 equal bins of the box widened by MARGIN of its longer side (pixel centres at i + 0.5)
        ramp = (torch.arange(128.0) / 128).expand(1, 3, 128, 128)
        x_crop = crop_regions(ramp, torch.tensor([[[x0, y0, x1, y1]]]), 32)[0, 0, 0]
        start, step = x0 - m - 0.5, (x1 - x0 + 2 * m) / 32
        torch.testing.assert_close(x_crop, (start + (torch.arange(32) + 0.5) * step) / 128, atol=1e-5, rtol=0)
        want_q = clf.logits(crop).softmax(-1)
    torch.testing.assert_close(cache.region_class, want_q)
    assert cache.region_class.shape == (1, 3) and abs(float(cache.region_class.sum()) - 1) < 1e-5
    images = model.encode_images(candidates, region_map=True)
    assert images.pixels is candidates  # kept for the crops
    found = region_candidates(model, None, images, cache, top_k=4, identity=True, classes=True)[""]
    with torch.no_grad():
        probs = clf(candidates, found.boxes)  # [3, 4, C]
    torch.testing.assert_close(found.class_match, (probs * want_q[:, None]).sum(-1), atol=1e-5, rtol=1e-4)
    assert float(found.class_match.std()) > 1e-3  # boxes differ in class
    # a = 2 with w = 0: the probability times the class match squared, best of the K boxes
    score = found.prob * found.class_match.clamp_min(1e-6) ** 2
    boxes, scores = model.predict_region(images, cache, top_k=4, class_weight=2.0)
    torch.testing.assert_close(scores, score.max(-1).values, atol=1e-5, rtol=1e-4)
    # with w: both factors
    w_score = found.prob * torch.exp(3.0 * (found.similarity[1] - 1)) * found.class_match.clamp_min(1e-6)
    torch.testing.assert_close(found.pick(3.0, 1, 1.0)[1], w_score.max(-1).values)
    with pytest.raises(ValueError, match="class_weight=-1"):
        found.pick(0.0, 1, -1.0)
    with pytest.raises(ValueError, match="no class match"):
        RegionCandidates(found.boxes, found.prob, found.similarity).pick(0.0, 1, 1.0)
    # ARD and ARD- share the decoder's boxes: each distinct box is classified once, and each variant gets its own match
    calls = []
    forward = clf.forward
    clf.forward = lambda *a, **k: calls.append(len(a[1])) or forward(*a, **k)
    try:
        both = region_candidates(model, {"A": model, "B": model}, images, cache, top_k=4, identity=True, classes=True)
    finally:
        del clf.forward
    assert calls == [12]  # 3 images x 4 boxes, not 24
    torch.testing.assert_close(both["A"].class_match, found.class_match)
    torch.testing.assert_close(both["B"].class_match, found.class_match)
    # without the classifier there is no class match to weigh
    plain = region_candidates(build(nano_cfg).eval(), None, candidates, cache, top_k=2, identity=True, classes=True)[""]
    assert plain.class_match is None


def test_region_classifier_is_frozen_recorded_and_reloaded(nano_cfg, query, candidates, tmp_path):
    from ardetect.train.engine import model_file_state, save_atomic
    from ardetect.train.phases import load_model

    model = _with_classifier(nano_cfg)
    assert model.cfg.region_classes == ("cat", "dog", "cup") and model.cfg.region_crop == 32
    model.set_phase(1)
    model.train()
    assert not any(p.requires_grad for p in model.region_classifier.parameters())
    assert not model.region_classifier.training and not model.region_classifier.backbone.training  # batch norm statistics stay
    assert all(id(p) not in {id(q) for g in param_groups(model, 1e-3, 1e-3) for q in g["params"]} for p in model.region_classifier.parameters())
    model.eval()
    path = save_atomic({**model_file_state(model), "model_config": model.cfg.model_dump(mode="json")}, tmp_path / "m.pt")
    again = load_model(path).eval()
    cache = model.encode_query(*query, [PROMPT], [CONCEPT])
    torch.testing.assert_close(again.encode_query(*query, [PROMPT], [CONCEPT]).region_class, cache.region_class)
    with pytest.raises(ValueError, match="distinct"):
        build(nano_cfg).add_region_classifier(["cat", "cat"])
    with pytest.raises(ValueError, match="region_tokens"):
        build(ModelConfig.named("nano", region_tokens=False, region_classes=("a", "b")))
