"""Loading the real path's models from local paths or the local Hugging Face cache.

Nothing is downloaded: a hub id must already be in the cache. Every failure names the
parameter and the value that led to it.

- GroundingDINO: transformers' ``GroundingDinoForObjectDetection`` and its processor.
- SAM: segment-anything's ``sam_model_registry`` for ``vit_h``/``vit_l``/``vit_b``;
  ``vit_tiny`` (tests, :data:`ardetect.generation.tiny.TINY_SAM`) is built from the
  same modules at a tiny size.
- Stable Diffusion: diffusers' ``StableDiffusionPipeline`` folder.
"""

from __future__ import annotations

import pickle
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ardetect.weights import WeightsError, resolve as _resolve  # noqa: F401 (WeightsError: this module's error too)

SAM_TYPES = ("vit_h", "vit_l", "vit_b", "vit_tiny")

# transformers and diffusers build models under process-wide init contexts (meta device, skipped init):
# two threads loading at once (thread workers of a Dask cluster) break each other, so loads take turns.
# Their top-level modules are lazy too: the first lookup of a name imports its submodule, and two threads
# doing that at once can each find the other's half-imported module ("cannot import name ..."), so the
# generation code imports their names under this lock as well.
LOAD_LOCK = threading.RLock()


def pick_device(device: str | None = None) -> torch.device:
    """``device`` as given, else the first CUDA device when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _from_pretrained(loader, value: str, field: str, **kw):
    name, local = _resolve(value, field)
    try:
        with LOAD_LOCK:
            return loader(name, local_files_only=True, **kw)
    except (OSError, ValueError) as err:
        where = "local folder" if local else "hub id (looked up in the local Hugging Face cache only; nothing is downloaded)"
        raise WeightsError(f"{field}={value!r}: cannot load it as a {where}: {err}") from None


@dataclass
class GroundingDino:
    """transformers' GroundingDINO with its processor, on one device."""

    model: Any
    processor: Any
    device: torch.device


def load_grounding_dino(value: str, field: str = "exemplars.real.grounding_dino", device: str | None = None) -> GroundingDino:
    """GroundingDINO (model + processor) from a local folder or a cached hub id, in eval mode."""
    with LOAD_LOCK:
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

    dev = pick_device(device)
    model = _from_pretrained(GroundingDinoForObjectDetection.from_pretrained, value, field)
    processor = _from_pretrained(AutoProcessor.from_pretrained, value, field)
    return GroundingDino(model=model.to(dev).eval(), processor=processor, device=dev)


def build_sam(model_type: str, checkpoint: str | None = None, field: str = "exemplars.real.sam_model_type"):
    """A segment-anything ``Sam`` of ``model_type``, with the state dict at ``checkpoint`` loaded when given."""
    if model_type not in SAM_TYPES:
        raise ValueError(f"{field}={model_type!r} is not a SAM type; choose one of {SAM_TYPES}")
    if model_type != "vit_tiny":
        from segment_anything import sam_model_registry

        return sam_model_registry[model_type](checkpoint=checkpoint)
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from ardetect.generation.tiny import SAM_PIXEL_MEAN, SAM_PIXEL_STD, TINY_SAM as t

    grid = t["image_size"] // t["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=t["depth"], embed_dim=t["embed_dim"], img_size=t["image_size"], mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=t["num_heads"], patch_size=t["patch_size"],
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=t["global_attn_indexes"], window_size=t["window_size"],
            out_chans=t["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=t["prompt_embed_dim"], image_embedding_size=(grid, grid),
            input_image_size=(t["image_size"], t["image_size"]), mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=t["decoder_depth"], embedding_dim=t["prompt_embed_dim"],
                                          mlp_dim=t["decoder_mlp_dim"], num_heads=t["decoder_heads"]),
            transformer_dim=t["prompt_embed_dim"], iou_head_depth=3, iou_head_hidden_dim=t["prompt_embed_dim"],
        ),
        pixel_mean=SAM_PIXEL_MEAN, pixel_std=SAM_PIXEL_STD,
    )
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam.eval()


def load_sam(checkpoint: str | None, model_type: str, device: str | None = None,
             field: str = "exemplars.real.sam_checkpoint"):
    """segment-anything's ``SamPredictor`` over the checkpoint at ``checkpoint`` (a ``.pth`` state dict)."""
    from segment_anything import SamPredictor

    if checkpoint is None or not str(checkpoint).strip():
        raise WeightsError(f"{field} is not set; give the path of a segment-anything checkpoint (.pth)")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise WeightsError(f"{field}={checkpoint!r} does not exist on this machine (a segment-anything .pth file is needed)")
    try:
        with LOAD_LOCK:
            sam = build_sam(model_type, str(path))
    except (RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise WeightsError(
            f"{field}={checkpoint!r} is not a SAM {model_type!r} checkpoint (exemplars.real.sam_model_type={model_type!r}): "
            f"{str(err).splitlines()[0]}"
        ) from None
    return SamPredictor(sam.to(pick_device(device)).eval())


def load_stable_diffusion(value: str, field: str = "generate.customization.base_model", device: str | None = None,
                          dtype: torch.dtype = torch.float32):
    """diffusers' ``StableDiffusionPipeline`` from a local folder or a cached hub id (no safety checker)."""
    with LOAD_LOCK:
        from diffusers import StableDiffusionPipeline

    pipe = _from_pretrained(StableDiffusionPipeline.from_pretrained, value, field, safety_checker=None,
                            requires_safety_checker=False, dtype=dtype)
    return pipe.to(pick_device(device))
