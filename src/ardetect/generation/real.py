"""The real path (COCO/LVIS exemplars, GroundingDINO, SAM, Break-a-Scene on Stable Diffusion).

PLACEHOLDER: the stages below check their inputs and then raise NotImplementedError;
the real generation path is built by a later issue. The synthetic world goes
through the same stages, record and downstream code.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ardetect.config import Config


def _check_path(field: str, value: str | None) -> None:
    if value is None:
        raise ValueError(f"exemplars.real.{field} is null; the {field} path is required for a real exemplar source")
    if not Path(value).exists():
        raise FileNotFoundError(f"exemplars.real.{field}={value!r} does not exist on this machine")


def make_real_exemplars(cfg: Config) -> pd.DataFrame:
    """Exemplars from COCO/LVIS annotations with GroundingDINO boxes and SAM masks (not built yet)."""
    real = cfg.exemplars.real
    _check_path("annotations", real.annotations)
    _check_path("images", real.images)
    _check_path("sam_checkpoint", real.sam_checkpoint)
    raise NotImplementedError(
        f"exemplars.source={cfg.exemplars.source!r}: the real exemplar path (GroundingDINO + SAM) is not built yet; "
        "use exemplars.source='synthetic' (profile 'default' or 'smoke')"
    )


def generate_real(cfg: Config, exemplars: pd.DataFrame) -> pd.DataFrame:
    """Break-a-Scene customization and generation per exemplar (not built yet)."""
    raise NotImplementedError(
        f"generate.backend={cfg.generate.backend!r}: Break-a-Scene generation is not built yet; "
        "use generate.backend='synthetic' (profile 'default' or 'smoke')"
    )
