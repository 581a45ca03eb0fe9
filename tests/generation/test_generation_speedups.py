"""Issue 16's customization speed-ups on the tiny Stable Diffusion folder: fused attention, cached text encodings,
batched sampling and the compile flag each keep the results of the plain recipe (up to float rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ardetect.config import CustomizationConfig
from ardetect.generation.customize import (
    _StoringCrossAttnProcessor,
    customize,
    install_attention_store,
    prior_class_images,
    sample,
    sample_many,
)
from ardetect.generation.models import load_stable_diffusion


def _cfg(**kw) -> CustomizationConfig:
    base = dict(resolution=32, ti_steps=2, joint_steps=2, inference_steps=2, attn_res=16, prior_images=1,
                ti_lr=1e-2, joint_lr=1e-3, lora_lr=1e-2, device="cpu")
    return CustomizationConfig(**{**base, **kw})


@pytest.fixture
def load(tiny_models):
    return lambda: load_stable_diffusion(str(tiny_models["stable_diffusion"]), device="cpu")


@pytest.fixture(scope="module")
def exemplar():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = np.zeros((48, 64), bool)
    mask[10:40, 20:50] = True
    prior = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    return image, mask, prior


def test_fused_attention_gives_the_explicit_output_and_maps(load, monkeypatch):
    from diffusers.models.attention_processor import Attention

    unet = load().unet
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500])
    explicit_calls = []
    scores = Attention.get_attention_scores
    monkeypatch.setattr(Attention, "get_attention_scores",
                        lambda self, *a, **k: explicit_calls.append(1) or scores(self, *a, **k))
    originals = unet.attn_processors
    n_cross = sum(name.endswith("attn2.processor") for name in originals)
    at_res = {16: 3, 8: 1, 4: 0}  # the tiny UNet's cross-attention layers per grid: down and up blocks, mid block
    assert n_cross == sum(at_res.values())
    with torch.no_grad():
        reference = unet(x, t, ctx).sample  # diffusers' own processors
        runs = {}
        for fused in (True, False):
            for res, active in ((16, False), (16, True), (8, True), (4, True)):
                unet.set_attn_processor(dict(originals))  # it empties the dict it is given
                store = install_attention_store(unet, res, fused=fused)
                store.active = active
                explicit_calls.clear()
                out = unet(x, t, ctx).sample
                runs[fused, res, active] = (out, list(store.maps), len(explicit_calls))
    unet.set_attn_processor(dict(originals))
    for (fused, res, active), (out, maps, n_explicit) in runs.items():
        assert torch.allclose(out, reference, atol=1e-5), (fused, res, active)
        reads = at_res[res] if active else 0
        assert len(maps) == reads, (fused, res, active)
        # the fused path forms probabilities only in the layers an active store reads; the plain path everywhere
        assert n_explicit == (reads if fused else n_cross), (fused, res, active)
    for a, b in zip(runs[True, 16, True][1], runs[False, 16, True][1]):
        assert a.shape == (2, 256, 77) and torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("method", ["break_a_scene", "lora"])
def test_customize_sets_the_original_processors_back(load, exemplar, method):
    pipe = load()
    originals = pipe.unet.attn_processors
    customize(pipe, exemplar[0], exemplar[1], "cat", _cfg(method=method, ti_steps=1, joint_steps=1,
                                                         prior_preservation=False), seed=0)
    after = pipe.unet.attn_processors
    assert after.keys() == originals.keys() and all(after[k] is originals[k] for k in originals)
    pipe = load()  # and when it raises: no layer works at attn_res=5
    originals = pipe.unet.attn_processors
    with pytest.raises(ValueError, match=r"attn_res=5"):
        customize(pipe, exemplar[0], exemplar[1], "cat", _cfg(attn_res=5, ti_steps=0, prior_preservation=False), seed=0)
    after = pipe.unet.attn_processors
    assert all(after[k] is originals[k] for k in originals)
    assert not any(isinstance(p, _StoringCrossAttnProcessor) for p in after.values())


@pytest.mark.parametrize("method, cached_prior_rows", [("break_a_scene", 1 + 2), ("lora", 1 + 1)])
def test_cached_text_encodings_give_the_same_losses(load, exemplar, method, cached_prior_rows):
    """2 + 2 steps with prior preservation: uncached, every step encodes the prior prompt (4 times); cached, the
    textual-inversion phase encodes it once, the joint phase every step (break_a_scene trains the text encoder) or
    once (lora freezes it)."""
    image, mask, prior = exemplar
    cfg = _cfg(method=method)
    results = {}
    for cache in (False, True):
        pipe = load()
        prior_ids = pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
        rows = []
        hook = pipe.text_encoder.register_forward_pre_hook(lambda mod, args: rows.extend(args[0]))
        torch.manual_seed(0)  # peft draws the LoRA adapters' start from torch's global generator
        _, rep = customize(pipe, image, mask, "cat", cfg, seed=0, prior_images=[prior], cache_text=cache)
        hook.remove()
        tid = pipe.tokenizer.convert_tokens_to_ids(cfg.token)
        results[cache] = (rep.losses, pipe.text_encoder.get_input_embeddings().weight[tid].detach().clone(),
                          sum(torch.equal(r, prior_ids) for r in rows), pipe.unet.conv_in.weight.detach().clone())
    (l0, row0, n0, w0), (l1, row1, n1, w1) = results[False], results[True]
    assert n0 == 4 and n1 == cached_prior_rows
    assert l0.keys() == l1.keys() and {"ti_prior", "joint_prior", "joint_attention"} <= l0.keys()
    for k in l0:
        assert np.isclose(l0[k], l1[k], rtol=1e-4, atol=1e-7), (k, l0[k], l1[k])
    assert torch.allclose(row0, row1, atol=1e-6) and torch.allclose(w0, w1, atol=1e-6)


def test_batched_sampling_gives_each_image_of_its_own_seed(load):
    pipe = load()
    cfg = _cfg(sample_batch=2)
    prompts = ["A photo of a cat standing in a forest.", "A charcoal sketch of a cat.",
               "A photo of a cat standing in a forest."]
    seeds = [7, 8, 9]
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    together = [np.asarray(im, dtype=np.int16) for im in sample_many(pipe, prompts, seeds, cfg)]
    hook.remove()
    assert sorted(set(batches)) == [2, 4]  # 2 + 1 images, doubled by classifier-free guidance
    alone = [np.asarray(sample(pipe, p, s, cfg), dtype=np.int16) for p, s in zip(prompts, seeds)]
    for a, b in zip(together, alone):
        assert a.shape == (32, 32, 3) and np.abs(a - b).max() <= 1  # float rounding may move a grey level
    assert np.abs(together[0] - together[2]).max() > 10  # same prompt, another seed: another image
    priors = prior_class_images(pipe, "cat", 2, seed=3, cfg=cfg)
    for i, im in enumerate(priors):  # seeds 3, 4 in one call
        alone = np.asarray(sample(pipe, "a photo of a cat", 3 + i, cfg), dtype=np.int16)
        assert np.abs(np.asarray(im, dtype=np.int16) - alone).max() <= 1
    with pytest.raises(ValueError, match=r"2 prompts but 1 seeds"):
        sample_many(pipe, prompts[:2], seeds[:1], cfg)
    with pytest.raises(ValueError, match=r"sample_batch"):
        CustomizationConfig(sample_batch=0)


def test_compile_flag_wraps_the_unet_for_the_steps(load, exemplar, monkeypatch):
    """torch.compile runs here with the "eager" backend: dynamo traces the UNet as it would for inductor (the default)
    but generates no code. Inductor's C++ code generation is too slow for a test on this 2-core CPU: on a loaded
    machine it had not finished the tiny UNet's first compiled step after 4.5 minutes."""
    calls, used = [], []
    real_compile = torch.compile

    def eager_compile(model, **kw):
        calls.append(model)
        compiled = real_compile(model, backend="eager")
        forward = compiled.forward

        def counted(*args, **kwargs):  # the compiled module is what the steps call
            used.append(1)
            return forward(*args, **kwargs)

        compiled.forward = counted
        return compiled

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    pipe = load()
    originals = pipe.unet.attn_processors
    assert not _cfg().compile
    _, rep = customize(pipe, exemplar[0], exemplar[1], "cat", _cfg(compile=True, ti_steps=1, joint_steps=1,
                                                                   prior_preservation=False, attn_loss_in_ti=True), seed=0)
    assert calls == [pipe.unet] and len(used) == 2  # one textual-inversion step, one joint step
    assert rep.ti_steps == rep.joint_steps == 1 and {"ti_attention", "joint_attention"} <= rep.losses.keys()
    assert all(np.isfinite(v) for v in rep.losses.values())
    assert all(pipe.unet.attn_processors[k] is originals[k] for k in originals)
    torch._dynamo.reset()
