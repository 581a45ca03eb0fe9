"""Fixtures of the real-path tests: tiny random models in the real formats, and a COCO file over sample photos."""

from __future__ import annotations

from pathlib import Path

import pytest

from ardetect.config import Config, config_from_dict


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from ardetect.generation.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def sample_coco(tmp_path_factory) -> dict[str, Path]:
    from ardetect.generation.fixtures import write_sample_coco

    return write_sample_coco(tmp_path_factory.mktemp("sample-coco"))


@pytest.fixture
def real_config(tiny_models, sample_coco):
    """A config of the real path over the tiny models and the sample photos; keyword overrides go to exemplars.real."""

    def make(**real) -> Config:
        base = {
            "annotations": str(sample_coco["annotations"]), "images": str(sample_coco["images"]),
            "grounding_dino": str(tiny_models["grounding_dino"]), "sam_checkpoint": str(tiny_models["sam"]),
            "sam_model_type": "vit_tiny", "box_threshold": 0.3, "text_threshold": 0.0, "device": "cpu",
        }
        return config_from_dict({
            "exemplars": {"source": "coco", "real": {**base, **real}},
            "generate": {"backend": "break_a_scene", "customization": {"base_model": str(tiny_models["stable_diffusion"])}},
        })

    return make


@pytest.fixture(scope="session")
def exemplar_root(tiny_models, sample_coco, tmp_path_factory):
    """Two real exemplars made with the tiny models (data root, exemplars table); shared, treat as read-only."""
    from ardetect.generation.exemplars import make_real_exemplars
    from real_helpers import gen_config

    root = tmp_path_factory.mktemp("data")
    table = make_real_exemplars(gen_config(tiny_models, sample_coco), root / "exemplars", root).table
    return root, table
