"""The Attribution Region Detector (ARD): a GroundingDINO-style detector with query-region
tokens and adapters (paper section 3; DESIGN.md "The detector").

    from ardetect.model import ModelConfig, build, param_groups

    model = build(ModelConfig.named("nano"))                      # or "T-B", "B-B" (paper), "B-L"
    cache = model.encode_query(query_image, query_box, prompts, concept_phrases)   # once per query
    out = model(candidate_images, cache)                          # ARDOutput, cache broadcast over N
    boxes, scores = model.predict_region(candidate_images, cache) # best box (pixel xyxy) and score
    feats = model.encode_images(candidate_images)                 # query-independent side, reusable
    boxes, scores = model.predict_region(feats, cache)            # across queries
    model.set_phase(2)                                            # only the adapters train
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-4, lr_backbone=1e-5), weight_decay=1e-4)

Weights: ``ardetect.model.convert`` reads transformers' and original GroundingDINO checkpoints.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .config import SIZES, ModelConfig

if TYPE_CHECKING:  # what the names below load (and what tests/test_dvc_deps.py's import closure reads)
    from .detector import (
        MASKED_LOGIT, ARDetector, ARDOutput, ImageCache, QueryCache, build, count_parameters, param_groups, predict_region_variants,
    )
    from .text import TokenizedPrompts, tokenize_prompts

# the detector and the text side import torch and transformers (seconds): loaded when first named, so that reading
# a ModelConfig (the `check` stage, `ard pipeline run`'s preflight) does not pay for them
_LAZY = {name: ".detector" for name in ("MASKED_LOGIT", "ARDetector", "ARDOutput", "ImageCache", "QueryCache", "build",
                                        "count_parameters", "param_groups", "predict_region_variants")}
_LAZY.update(TokenizedPrompts=".text", tokenize_prompts=".text")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SIZES",
    "MASKED_LOGIT",
    "ModelConfig",
    "ARDetector",
    "ARDOutput",
    "QueryCache",
    "ImageCache",
    "TokenizedPrompts",
    "build",
    "count_parameters",
    "param_groups",
    "predict_region_variants",
    "tokenize_prompts",
]
