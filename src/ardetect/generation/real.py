"""The real path's generation entry point (Break-a-Scene on Stable Diffusion).

Real exemplars are made by :mod:`ardetect.generation.exemplars`. The customization and
sampling of generated images below is not built yet: it checks its inputs and then
raises NotImplementedError.
"""

from __future__ import annotations

import pandas as pd

from ardetect.config import Config


def generate_real(cfg: Config, exemplars: pd.DataFrame) -> pd.DataFrame:
    """Break-a-Scene customization and generation per exemplar (not built yet)."""
    raise NotImplementedError(
        f"generate.backend={cfg.generate.backend!r}: Break-a-Scene generation is not built yet; "
        "use generate.backend='synthetic' (profile 'default' or 'smoke')"
    )
