"""Fixtures of the model tests: a nano detector (real MiniLM weights, random CNN) and a query."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from ardetect.model import ModelConfig, build  # noqa: E402

PROMPT = "A charcoal sketch of a V* cat sitting on a rock."
CONCEPT = "V* cat"
SIZE = 96  # small candidates keep the tests fast; the nano model takes any size


@pytest.fixture(scope="session")
def nano_cfg() -> ModelConfig:
    return ModelConfig.named("nano")


@pytest.fixture(scope="session")
def nano(nano_cfg):
    torch.manual_seed(0)
    return build(nano_cfg).eval()


@pytest.fixture()
def query():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, SIZE, SIZE, generator=g)
    box = torch.tensor([[10.0, 12.0, 70.0, 80.0]])
    return image, box


@pytest.fixture()
def candidates():
    g = torch.Generator().manual_seed(2)
    return torch.rand(3, 3, SIZE, SIZE, generator=g)
