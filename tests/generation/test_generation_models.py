"""The real loaders read the tiny models in the real formats, and name the param and path when weights are wrong."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ardetect.generation.detect import detect, label_map, mask_box, segment
from ardetect.generation.models import WeightsError, build_sam, load_grounding_dino, load_sam, load_stable_diffusion


@pytest.fixture(scope="module")
def photo(sample_coco) -> Image.Image:
    with Image.open(sample_coco["images"] / "chelsea.png") as im:
        return im.convert("RGB")


def test_grounding_dino_and_sam_from_their_folders(tiny_models, photo):
    gd = load_grounding_dino(str(tiny_models["grounding_dino"]), device="cpu")
    assert type(gd.model).__name__ == "GroundingDinoForObjectDetection" and not gd.model.training
    dets = detect(gd, photo, "cat", box_threshold=0.3, text_threshold=0.0)
    assert dets, "the tiny model with a low threshold finds boxes"
    scores = [d.score for d in dets]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0.3
    for d in dets:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 < x1 <= photo.width and 0 <= y0 < y1 <= photo.height
        assert "cat" in d.label
    assert detect(gd, photo, "cat", box_threshold=1.0, text_threshold=0.0) == []

    predictor = load_sam(str(tiny_models["sam"]), "vit_tiny", device="cpu")
    arr = np.asarray(photo)
    masks = segment(predictor, arr, [d.box for d in dets[:2]])
    assert len(masks) == 2 and all(m.shape == arr.shape[:2] and m.dtype == bool for m in masks)
    for m, d in zip(masks, dets):
        box = mask_box(m)
        if box is not None:  # cut to the prompting box
            assert box[0] >= np.floor(d.box[0]) and box[2] <= np.ceil(d.box[2])
    labels = label_map(masks)
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert ((labels == 1) == masks[0]).all()


def test_stable_diffusion_folder_runs(tiny_models):
    pipe = load_stable_diffusion(str(tiny_models["stable_diffusion"]), device="cpu")
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(pipe.components)
    assert pipe.unet.config.use_linear_projection and pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    out = pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_tiny_tokenizer_spells_every_prompt(tiny_models):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tiny_models["stable_diffusion"] / "tokenizer"))
    text = "a charcoal sketch of a v* bulldog sitting on a rock."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")
    assert tok.unk_token_id not in ids[1:-1]  # CLIP's unknown token is its end token
    assert len(tok) < 6000


def test_weights_errors_name_param_and_path(tmp_path, tiny_models):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match=r"exemplars\.real\.grounding_dino=.*nowhere.*does not exist"):
        load_grounding_dino(missing)
    with pytest.raises(WeightsError, match=r"exemplars\.real\.grounding_dino='nobody/no-such-model'.*local Hugging Face cache"):
        load_grounding_dino("nobody/no-such-model")
    with pytest.raises(WeightsError, match=r"generate\.customization\.base_model=.*nowhere"):
        load_stable_diffusion(missing)
    with pytest.raises(WeightsError, match=r"generate\.customization\.base_model=.*tiny-grounding-dino.*local folder"):
        load_stable_diffusion(str(tiny_models["grounding_dino"]))  # a folder, but not a diffusers pipeline
    with pytest.raises(WeightsError, match=r"exemplars\.real\.sam_checkpoint is not set"):
        load_sam(None, "vit_tiny")
    with pytest.raises(WeightsError, match=r"exemplars\.real\.sam_checkpoint=.*nowhere.*does not exist"):
        load_sam(missing + ".pth", "vit_tiny")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"exemplars\.real\.sam_checkpoint=.*junk\.pth.*not a SAM 'vit_tiny' checkpoint"):
        load_sam(str(junk), "vit_tiny")
    with pytest.raises(ValueError, match=r"sam_model_type='vit_x'"):
        build_sam("vit_x")
