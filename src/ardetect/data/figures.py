"""Figures of the data side: tuple gallery and box-size histograms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ardetect.tmpdirs import replaced_atomically


def _save_atomic(fig, path: Path, dpi: int = 110) -> Path:
    with replaced_atomically(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_box(ax, box, color: str) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=2))


def tuple_gallery(tuples: pd.DataFrame, data_root: Path, out_path: Path, n: int = 8, seed: int = 0) -> Path:
    """Sample ``n`` tuples: each row shows Q with R_Q, X with R_X, and the prompt."""
    plt = _plt()
    n = min(n, len(tuples))
    if n == 0:
        raise ValueError("tuple_gallery: the tuples table is empty")
    rows = tuples.sample(n=n, random_state=seed).sort_values("tuple_id")
    fig, axes = plt.subplots(n, 2, figsize=(6.4, 3.3 * n), squeeze=False)
    for i, (_, t) in enumerate(rows.iterrows()):
        for j, (img_col, box_col, title, color) in enumerate(
            (("query_image", "query_box", "Q (generated) + R_Q", "red"), ("train_image", "train_box", "X (training) + R_X", "lime"))
        ):
            ax = axes[i, j]
            ax.imshow(np.asarray(Image.open(data_root / t[img_col]).convert("RGB")))
            _draw_box(ax, t[box_col], color)
            ax.set_title(f"{title}\n{t['tuple_id']} [{t['split']}]", fontsize=8)
            ax.axis("off")
        axes[i, 0].text(
            0, -0.08, f"p: {t['prompt']}", transform=axes[i, 0].transAxes, fontsize=7, va="top", wrap=True
        )
    fig.suptitle("Sample attribution tuples (Q, R_Q, p, X, R_X)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the suptitle
    try:
        return _save_atomic(fig, out_path)
    finally:
        plt.close(fig)


def box_size_histograms(tuples: pd.DataFrame, out_path: Path) -> Path:
    """Histograms of box side (sqrt area) and relative area for R_Q and R_X."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for col, label, color in (("query_box", "R_Q (generated)", "tab:red"), ("train_box", "R_X (training)", "tab:green")):
        b = np.asarray(tuples[col].tolist(), dtype=float).reshape(-1, 4)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        size_col = "query_width" if col == "query_box" else "train_width"
        side = np.sqrt(np.clip(w * h, 0, None))
        rel = np.clip(w * h, 0, None) / (tuples[size_col].to_numpy(float) ** 2)
        if col == "train_box":  # one exemplar box per concept
            keep = ~tuples["concept_id"].duplicated().to_numpy()
            side, rel = side[keep], rel[keep]
        axes[0].hist(side, bins=30, alpha=0.6, label=label, color=color)
        axes[1].hist(rel, bins=30, alpha=0.6, label=label, color=color)
    axes[0].set_xlabel("box side, sqrt(area) [px]")
    axes[1].set_xlabel("box area / image area")
    for ax in axes:
        ax.set_ylabel("count")
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return _save_atomic(fig, out_path)
    finally:
        plt.close(fig)
