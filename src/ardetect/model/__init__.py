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

from .config import SIZES, ModelConfig
from .detector import (
    MASKED_LOGIT, ARDetector, ARDOutput, ImageCache, QueryCache, build, count_parameters, param_groups, predict_region_variants,
)
from .text import TokenizedPrompts, tokenize_prompts

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
