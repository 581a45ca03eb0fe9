"""COCO / LVIS instance annotations as an exemplar source.

Reads an instances JSON (COCO's or LVIS's layout: ``images``, ``annotations``,
``categories``; LVIS images may carry ``coco_url`` instead of ``file_name``) and
picks exemplar candidates as ARD does (Sec. 4.1): an exemplar image X_i and a base
concept c_b present in it. Each image serves one concept at most, so no training
image can fall in two splits. Classes are drawn in turn (round robin over a seeded
order), each class's images in a seeded order, so the base classes stay balanced.
The candidates come as an ordered stream: the caller takes them until it has
enough exemplars, skipping those whose concept is not found.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """One (image, base class) pair of the annotation file."""

    image_id: int
    file_name: str  # relative to the images folder
    width: int
    height: int
    category: str  # the category name as the annotation file writes it, e.g. "bat_(animal)"
    annotation_id: int  # the largest instance of ``category`` in the image
    annotation_box: tuple[float, float, float, float]  # its box, xyxy pixels


def _file_name(img: dict) -> str:
    if img.get("file_name"):
        return str(img["file_name"])
    if img.get("coco_url"):  # LVIS: ".../val2017/000000397133.jpg"
        return str(img["coco_url"]).rsplit("/", 1)[-1]
    raise ValueError(f"image {img.get('id')!r} of the annotation file has neither file_name nor coco_url")


def read_candidates(annotations: str | Path, field: str = "exemplars.real.annotations") -> list[Candidate]:
    """Every (image, category) pair with at least one non-crowd instance, largest instance first per pair."""
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"{field}={str(annotations)!r} does not exist on this machine")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{field}={str(annotations)!r} is not valid JSON: {err}") from None
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise ValueError(f"{field}={str(annotations)!r} has no {key!r} list; a COCO or LVIS instances file is needed")
    cats = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
    imgs = {int(i["id"]): i for i in doc["images"]}
    best: dict[tuple[int, int], dict] = {}
    for a in doc["annotations"]:
        if a.get("iscrowd", 0):
            continue
        key = (int(a["image_id"]), int(a["category_id"]))
        area = float(a.get("area", a["bbox"][2] * a["bbox"][3]))
        if key not in best or area > best[key]["_area"]:
            best[key] = {**a, "_area": area}
    out = []
    for (image_id, cat_id), a in sorted(best.items()):
        img = imgs.get(image_id)
        if img is None or cat_id not in cats:
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        out.append(Candidate(image_id, _file_name(img), int(img["width"]), int(img["height"]), cats[cat_id],
                             int(a["id"]), (x, y, x + w, y + h)))
    return out


def select_candidates(cands: list[Candidate], classes: list[str] | None, seed: int,
                      field: str = "exemplars.real.classes") -> Iterator[Candidate]:
    """Candidates in selection order: classes in turn, each image used by one class at most."""
    by_class: dict[str, list[Candidate]] = defaultdict(list)
    for c in cands:
        by_class[c.category].append(c)
    if classes is not None:
        unknown = [c for c in classes if c not in by_class]
        if unknown:
            raise ValueError(f"{field} has {unknown}: no instance of them in the annotation file "
                             f"(it has {len(by_class)} classes, e.g. {sorted(by_class)[:5]})")
        names = list(dict.fromkeys(classes))
    else:
        names = sorted(by_class)
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    queues = {n: [by_class[n][i] for i in rng.permutation(len(by_class[n]))] for n in order}
    used: set[int] = set()
    while any(queues.values()):
        for n in order:
            q = queues[n]
            while q and q[0].image_id in used:
                q.pop(0)
            if q:
                c = q.pop(0)
                used.add(c.image_id)
                yield c
