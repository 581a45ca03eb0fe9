"""A small COCO-format data set over the real photographs scikit-image ships in its wheel.

Used with the tiny models of :mod:`ardetect.generation.tiny` to run the real path with
nothing downloaded. The boxes are hand-drawn around the main object of each photograph
(in the photograph's own pixels) and scaled with it; the real path only takes the class
from an annotation and finds the box itself with GroundingDINO.
"""

from __future__ import annotations

import json
from pathlib import Path

from ardetect.tmpdirs import replaced_atomically

# (scikit-image data file, COCO category, xyxy box in the file's pixels)
SAMPLE_PHOTOS: tuple[tuple[str, str, tuple[float, float, float, float]], ...] = (
    ("chelsea.png", "cat", (30.0, 10.0, 420.0, 300.0)),
    ("coffee.png", "cup", (90.0, 20.0, 520.0, 340.0)),
    ("astronaut.png", "person", (100.0, 0.0, 470.0, 512.0)),
    ("camera.png", "person", (120.0, 30.0, 400.0, 512.0)),
    ("motorcycle_left.png", "motorcycle", (60.0, 40.0, 700.0, 470.0)),
    ("motorcycle_right.png", "motorcycle", (40.0, 40.0, 680.0, 470.0)),
    ("rocket.jpg", "rocket", (230.0, 0.0, 400.0, 427.0)),
    ("horse.png", "horse", (20.0, 30.0, 380.0, 310.0)),
)


def skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def write_sample_coco(out: str | Path, max_side: int = 128, photos=SAMPLE_PHOTOS) -> dict[str, Path]:
    """Write ``out/images/*.png`` (RGB, longest side ``max_side``) and ``out/annotations.json`` (COCO instances).

    Returns ``{"annotations": ..., "images": ...}``. The JSON is written through a temp file and renamed.
    """
    from PIL import Image

    out = Path(out)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    src = skimage_data_dir()
    names = sorted({c for _, c, _ in photos})
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    images, annotations = [], []
    for i, (fname, category, box) in enumerate(photos):
        path = src / fname
        if not path.is_file():
            raise FileNotFoundError(f"scikit-image sample photograph {path} is not installed")
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = min(1.0, max_side / max(im.size))
            w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
            im = im.resize((w, h), Image.Resampling.BICUBIC)
            stem = Path(fname).stem + ".png"
            im.save(img_dir / stem)
        x0, y0, x1, y1 = (min(v * scale, lim) for v, lim in zip(box, (w, h, w, h)))
        images.append({"id": i + 1, "file_name": stem, "width": w, "height": h})
        annotations.append({
            "id": i + 1, "image_id": i + 1, "category_id": cat_id[category], "iscrowd": 0,
            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
            "area": round((x1 - x0) * (y1 - y0), 2),
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        })
    doc = {
        "info": {"description": "scikit-image sample photographs, hand-drawn boxes"},
        "images": images, "annotations": annotations,
        "categories": [{"id": cat_id[n], "name": n, "supercategory": "object"} for n in names],
    }
    ann = out / "annotations.json"
    with replaced_atomically(ann) as tmp, open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    return {"annotations": ann, "images": img_dir}


def ensure_fixtures(root: str | Path) -> dict[str, Path]:
    """Fill ``root`` with the sample COCO set and the tiny models unless a finished copy is there; return their paths.

    ``root/coco/{annotations.json,images/}``, ``root/tiny-sd``, ``root/tiny-grounding-dino``, ``root/tiny-sam.pth``;
    ``root/READY`` is written last and marks a finished copy.
    """
    from ardetect.generation.tiny import write_tiny_models

    root = Path(root)
    paths = {"annotations": root / "coco" / "annotations.json", "images": root / "coco" / "images",
             "stable_diffusion": root / "tiny-sd", "grounding_dino": root / "tiny-grounding-dino", "sam": root / "tiny-sam.pth"}
    if (root / "READY").is_file():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    write_sample_coco(root / "coco")
    write_tiny_models(root)
    (root / "READY").write_text("sample photographs and tiny random models\n")
    return paths
