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


class _entry:
    """Turns a malformed entry of the annotation file into an error naming the file, the list and the entry."""

    def __init__(self, where: str, key: str):
        self.where, self.key, self.entry = where, key, "?"

    def __enter__(self) -> _entry:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if kind in (KeyError, TypeError, ValueError) and not str(err).startswith(self.where):
            what = f"has no {err} key" if kind is KeyError else f"is malformed: {err}"
            raise ValueError(f"{self.where}: {self.entry} of {self.key!r} {what}") from None
        return False


def read_candidates(annotations: str | Path, field: str = "exemplars.real.annotations") -> list[Candidate]:
    """Every (image, category) pair with at least one non-crowd instance, largest instance first per pair."""
    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"{field}={str(annotations)!r} does not exist on this machine")
    try:
        doc = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # a gzipped or other binary file is no JSON text either
        raise ValueError(f"{field}={str(annotations)!r} is not valid JSON (a gzipped file must be unpacked first): {err}") from None
    where = f"{field}={str(annotations)!r}"
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc, dict) or key not in doc:
            raise ValueError(f"{where} has no {key!r} list; a COCO or LVIS instances file is needed")
        if not isinstance(doc[key], list):
            raise ValueError(f"{where}: {key!r} is a {type(doc[key]).__name__}, not a list")
    cats: dict[int, str] = {}
    with _entry(where, "categories") as at:
        for k, c in enumerate(doc["categories"]):
            at.entry = f"entry {k}"
            if not isinstance(c, dict):
                raise ValueError(f"{where}: entry {k} of 'categories' is a {type(c).__name__}, not an object")
            cats[int(c["id"])] = str(c["name"])
    imgs: dict[int, dict] = {}
    with _entry(where, "images") as at:
        for k, i in enumerate(doc["images"]):
            at.entry = f"entry {k}"
            if not isinstance(i, dict):
                raise ValueError(f"{where}: entry {k} of 'images' is a {type(i).__name__}, not an object")
            imgs[int(i["id"])] = i
    best: dict[tuple[int, int], dict] = {}
    with _entry(where, "annotations") as at:
        for k, a in enumerate(doc["annotations"]):
            at.entry = f"entry {k}"
            if not isinstance(a, dict):
                raise ValueError(f"{where}: entry {k} of 'annotations' is a {type(a).__name__}, not an object")
            if a.get("iscrowd", 0):
                continue
            key = (int(a["image_id"]), int(a["category_id"]))
            x, y, w, h = (float(v) for v in a["bbox"])
            if not (np.isfinite([x, y, w, h]).all() and w > 0 and h > 0):
                continue  # a degenerate box names no instance to crop (COCO files hold a few)
            area = float(a.get("area", w * h))
            if key not in best or area > best[key]["_area"]:
                best[key] = {**a, "_area": area, "_box": (x, y, x + w, y + h)}
    out = []
    with _entry(where, "images") as at:
        for (image_id, cat_id), a in sorted(best.items()):
            img = imgs.get(image_id)
            if img is None or cat_id not in cats:
                continue
            at.entry = f"the entry of image id {image_id}"
            out.append(Candidate(image_id, _file_name(img), int(img["width"]), int(img["height"]), cats[cat_id],
                                 int(a["id"]), a["_box"]))
    return out


def select_candidates(cands: list[Candidate], classes: list[str] | None, seed: int,
                      field: str = "exemplars.real.classes") -> Iterator[Candidate]:
    """Candidates in selection order: classes in turn, each image used by one class at most. An unknown class is
    refused here, at the call (before the detectors load), not at the first candidate drawn."""
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
    return _deal(by_class, names, seed)


def _deal(by_class: dict[str, list[Candidate]], names: list[str], seed: int) -> Iterator[Candidate]:
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
