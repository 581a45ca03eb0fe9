"""Where the detector runs: the ``model.device`` setting, a module's device, batches moved to it."""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor


def resolve_device(spec: str | None, field: str = "model.device") -> torch.device:
    """The torch device of a ``model.device`` setting: null = cuda when present, else cpu. Under
    torchrun (``LOCAL_RANK``) a bare "cuda" or null means this process's own GPU."""
    if spec is None:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field}={spec!r}: this machine has no CUDA device (torch {torch.__version__}); set it to cpu or null")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{field}={spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def device_of(module) -> torch.device:
    """Where a module's parameters are (the CPU for one without parameters)."""
    params = getattr(module, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def to_device(batch, device: torch.device | str | None):
    """A batch dataclass with its tensors, and its lists of tensors, on ``device`` (the rest as it is)."""
    if device is None:
        return batch
    moved = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            moved[f.name] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and all(isinstance(v, Tensor) for v in value):
            moved[f.name] = [v.to(device, non_blocking=True) for v in value]
    return dataclasses.replace(batch, **moved)
