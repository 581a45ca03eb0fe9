"""Figures of the evaluation: Recall@K curves and top-10 retrievals (as the paper's figs. 3 and 13)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ardetect.data.figures import _draw_box, _plt, _save_atomic


def recall_curve(per_query: dict[str, pd.DataFrame], max_k: int = 20) -> pd.DataFrame:
    """Long table (method, k, recall) of Recall@K for K = 1..max_k (IoU gate already in each row's hit)."""
    rows = []
    for method, pq in per_query.items():
        ranks = pq["rank"].to_numpy()
        gate = pq["box_correct"].fillna(1.0).to_numpy() > 0.5  # image-level methods: no gate
        for k in range(1, max_k + 1):
            rows.append({"method": method, "k": k, "recall": float(np.mean((ranks <= k) & gate))})
    return pd.DataFrame(rows)


def recall_plot(curve: pd.DataFrame, out: Path, title: str, references: tuple[str, ...] = ()) -> Path:
    """Recall@K of each method of ``curve``; ``references`` (chance, the oracles: no methods) are drawn dashed,
    without markers. The legend sits beside the axes, where it hides no curve."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 3.6))
    for method, g in curve.groupby("method", sort=False):
        if method in references:
            ax.plot(g["k"], g["recall"], ls="--", lw=1.2, label=method)
        else:
            ax.plot(g["k"], g["recall"], marker="o", ms=3, label=method)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    try:
        return _save_atomic(fig, out)
    finally:
        plt.close(fig)


def retrieval_figure(query: pd.Series, data_root: Path, retrievals: dict[str, list], out: Path) -> Path:
    """One query (Q with R_Q and its prompt) and each method's top-10 training images with boxes and scores.

    The ground-truth training image is framed in green; predicted regions are dashed.
    """
    plt = _plt()
    methods = list(retrievals)
    fig, axes = plt.subplots(len(methods), 11, figsize=(22, 2.7 * len(methods)), squeeze=False)
    for r, method in enumerate(methods):
        ax = axes[r, 0]
        ax.imshow(np.asarray(Image.open(data_root / query["query_image"]).convert("RGB")))
        _draw_box(ax, query["query_box"], "red")
        ax.set_title(f"{method}: query", fontsize=8)
        ax.axis("off")
        for c, (path, score, box) in enumerate(retrievals[method][:10]):
            ax = axes[r, c + 1]
            ax.imshow(np.asarray(Image.open(data_root / path).convert("RGB")))
            if box is not None:
                from matplotlib.patches import Rectangle

                x0, y0, x1, y1 = box
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linestyle="--", linewidth=1.5))
            hit = path == query["train_image"]
            if hit:
                for s in ax.spines.values():
                    s.set_edgecolor("lime")
                    s.set_linewidth(4)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"#{c + 1} {score:.3f}" + (" (GT)" if hit else ""), fontsize=8, color="green" if hit else "black")
        for c in range(len(retrievals[method][:10]) + 1, 11):
            axes[r, c].axis("off")
    fig.suptitle(f"{query['tuple_id']}: \"{query['prompt']}\"", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()), h_pad=1.2)  # row titles clear of the images above
    try:
        return _save_atomic(fig, out, dpi=80)
    finally:
        plt.close(fig)
