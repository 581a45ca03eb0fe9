"""A query and its ranked training images as one PNG: the query's box (blue), each result's predicted
region (red) and, for the query's true training image when it is known, that image's concept box (green)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from ardetect.images import draw_boxes, open_image
from ardetect.tmpdirs import replaced_atomically

TILE = 192
CAPTION = 30


def _tile(img: Image.Image, boxes, caption: str) -> Image.Image:
    drawn = draw_boxes(img, boxes)
    scale = TILE / max(drawn.size)
    drawn = drawn.resize((max(1, round(drawn.width * scale)), max(1, round(drawn.height * scale))), Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    tile.paste(drawn, ((TILE - drawn.width) // 2, (TILE - drawn.height) // 2))
    ImageDraw.Draw(tile).text((4, TILE + 4), caption, fill="black")
    return tile


def result_grid(query: Image.Image, box, results: list[dict], index, out: Path, columns: int = 6, truth: str | None = None) -> Path:
    """``truth``: the id of the query's true training image (the pipeline's tuples know it), marked in green."""
    tiles = [_tile(query, [(box, "#1f6feb")], "query")]
    for r in results:
        boxes = [(r["box"], "#e4003a")]
        if truth is not None and r["id"] == truth and r.get("concept_box"):
            boxes.append((r["concept_box"], "#00b050"))
        tiles.append(_tile(open_image(index.path_of(r["id"])), boxes, f"#{r['rank']} {r['id'][:14]} {r['score']:.3f}"))
    cols = min(columns, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (TILE + 6), rows * (TILE + CAPTION + 6)), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * (TILE + 6), (i // cols) * (TILE + CAPTION + 6)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(out, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")
    return out
