"""Break-a-Scene on the tiny Stable Diffusion folder: token init, the two phases, the losses, seeded sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ardetect.config import CustomizationConfig
from ardetect.generation.customize import add_concept_token, customize, prior_class_images, sample
from ardetect.generation.models import load_stable_diffusion


def _cfg(**kw) -> CustomizationConfig:
    base = dict(resolution=32, ti_steps=2, joint_steps=2, inference_steps=2, attn_res=16, prior_images=1,
                ti_lr=1e-2, joint_lr=1e-3, device="cpu")
    return CustomizationConfig(**{**base, **kw})


@pytest.fixture
def pipe(tiny_models):
    return load_stable_diffusion(str(tiny_models["stable_diffusion"]), device="cpu")


@pytest.fixture(scope="module")
def exemplar(sample_coco):
    with Image.open(sample_coco["images"] / "chelsea.png") as im:
        image = im.convert("RGB")
    mask = np.zeros((image.height, image.width), bool)
    mask[20:70, 30:100] = True
    return image, mask


def test_concept_token_starts_from_the_class_word(pipe):
    emb = pipe.text_encoder.get_input_embeddings().weight
    word_id = pipe.tokenizer("cat", add_special_tokens=False).input_ids[0]
    tid = add_concept_token(pipe.tokenizer, pipe.text_encoder, "<asset0>", "cat")
    emb = pipe.text_encoder.get_input_embeddings().weight
    assert tid == len(pipe.tokenizer) - 1 and torch.equal(emb[tid], emb[word_id])
    assert pipe.tokenizer("a <asset0> cat", add_special_tokens=False).input_ids[1] == tid
    with pytest.raises(ValueError, match=r"token='<asset0>' is already a word"):
        add_concept_token(pipe.tokenizer, pipe.text_encoder, "<asset0>", "cat")


def test_textual_inversion_phase_moves_only_the_new_row(pipe, exemplar):
    unet0 = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    emb0 = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    phrase, rep = customize(pipe, *exemplar, "cat", _cfg(joint_steps=0, prior_preservation=False), seed=0)
    assert phrase == "<asset0> cat" and rep.ti_steps == 2 and rep.joint_steps == 0
    emb = pipe.text_encoder.get_input_embeddings().weight.detach()
    tid = pipe.tokenizer.convert_tokens_to_ids("<asset0>")
    assert torch.equal(emb[: emb0.shape[0]], emb0)  # every old row as it was
    word_id = pipe.tokenizer("cat", add_special_tokens=False).input_ids[0]
    assert not torch.equal(emb[tid], emb0[word_id])  # the new row trained away from its start
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet0.items())
    assert set(rep.losses) == {"ti_masked"}


def test_joint_phase_trains_unet_with_attention_and_prior_losses(pipe, exemplar):
    cfg = _cfg()
    prior = prior_class_images(pipe, "cat", 1, seed=3, cfg=cfg)
    assert len(prior) == 1 and prior[0].size == (32, 32)
    w0 = pipe.unet.conv_in.weight.detach().clone()
    _, rep = customize(pipe, *exemplar, "cat", cfg, seed=0, prior_images=prior)
    assert rep.joint_steps == 2 and not torch.equal(w0, pipe.unet.conv_in.weight)
    assert {"joint_masked", "joint_prior", "joint_attention"} <= set(rep.losses)
    assert all(np.isfinite(v) for v in rep.losses.values())
    assert not pipe.unet.training and not any(p.requires_grad for p in pipe.unet.parameters())


def test_attention_grid_must_exist_and_prior_needs_images(tiny_models, exemplar):
    pipe = load_stable_diffusion(str(tiny_models["stable_diffusion"]), device="cpu")
    with pytest.raises(ValueError, match=r"attn_res=5"):
        customize(pipe, *exemplar, "cat", _cfg(attn_res=5, ti_steps=0, prior_preservation=False), seed=0)
    pipe = load_stable_diffusion(str(tiny_models["stable_diffusion"]), device="cpu")
    with pytest.raises(ValueError, match=r"prior_preservation is on but no prior images"):
        customize(pipe, *exemplar, "cat", _cfg(), seed=0)


def test_sampling_is_seeded(pipe):
    cfg = _cfg()
    a, b, c = (np.asarray(sample(pipe, "A photo of a cat standing in a forest.", s, cfg)) for s in (7, 7, 8))
    assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_lora_method_trains_only_adapters(pipe, exemplar):
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items() if "token_embedding" not in k}
    _, rep = customize(pipe, *exemplar, "cat", _cfg(method="lora", lora_lr=1e-2, prior_preservation=False), seed=0)
    assert rep.joint_steps == 2 and "joint_attention" in rep.losses
    now = pipe.unet.state_dict()
    lora = [k for k in now if "lora_" in k]
    # peft starts each B matrix at zero (A at random): a trained adapter has moved its B off zero
    assert lora and any(now[k].abs().sum() > 0 for k in lora if "lora_B" in k)
    for k, v in base.items():  # every base weight as it was (peft renames wrapped layers' weights to base_layer)
        k2 = k if k in now else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(v, now[k2]), k
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in te.items())
    img = sample(pipe, "A photo of a <asset0> cat standing in a forest.", 1, _cfg())
    assert np.asarray(img).shape == (32, 32, 3)
