"""Configs of the real-path tests."""

from __future__ import annotations

from ardetect.config import config_from_dict


def gen_config(tiny_models, sample_coco, **generate):
    c = {"base_model": str(tiny_models["stable_diffusion"]), "resolution": 32, "ti_steps": 2, "joint_steps": 2,
         "inference_steps": 2, "prior_images": 1, "device": "cpu"}
    g = {"backend": "break_a_scene", "box_threshold": 0.3, "text_threshold": 0.0, "max_instances": 20, "customization": c}
    g.update(generate)
    return config_from_dict({
        "world": {"queries_per_concept": 2},
        "exemplars": {"source": "coco", "real": {
            "annotations": str(sample_coco["annotations"]), "images": str(sample_coco["images"]),
            "grounding_dino": str(tiny_models["grounding_dino"]), "sam_checkpoint": str(tiny_models["sam"]),
            "sam_model_type": "vit_tiny", "box_threshold": 0.3, "text_threshold": 0.0, "max_exemplars": 2, "device": "cpu"}},
        "generate": g,
    })
