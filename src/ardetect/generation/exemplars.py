"""Real exemplars: COCO/LVIS images, concept boxes by GroundingDINO, masks by SAM, in the synthetic world's record.

For each candidate (image, base class) of :mod:`ardetect.data.coco`, GroundingDINO looks
for the class's words in the image. The highest-scoring box is the concept; the other
boxes of the class (after NMS) are distractors of the same class, as in the synthetic
world. SAM turns each box into a mask (cut to its box); the label map holds the concept
as object 1 and the distractors after it where they are not covered. The concept box
R_X is the box of the concept's visible mask, so the record's box and the objects table
agree exactly. A candidate whose concept is not found is skipped and its reason counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ardetect.config import Config, RealSourceConfig
from ardetect.data.classes import class_word, group_of
from ardetect.data.coco import Candidate, read_candidates, select_candidates
from ardetect.data.schema import EXEMPLAR_COLUMNS, OBJECT_COLUMNS
from ardetect.generation.detect import detect, label_map, mask_box, segment
from ardetect.generation.models import load_grounding_dino, load_sam
from ardetect.images import to_rgb

log = logging.getLogger("ardetect.generation")

SKIP_REASONS = ("image_missing", "image_unreadable", "no_detection", "empty_mask", "box_too_small")


@dataclass
class Skipped:
    reason: str
    detail: str


@dataclass
class ExemplarResult:
    table: pd.DataFrame
    objects: pd.DataFrame
    skipped: list[dict] = field(default_factory=list)

    @property
    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(s["reason"] for s in self.skipped))


def exemplar_seed(seed: int, index: int) -> int:
    """The generation seed of the ``index``-th accepted exemplar (a 31-bit int from a seed sequence)."""
    return int(np.random.SeedSequence([seed, 17, index]).generate_state(1)[0] >> 1)


def _rel(path: Path, data_root: Path) -> str:
    return Path(path).relative_to(data_root).as_posix()


def _save_png(arr: np.ndarray | Image.Image, path: Path, mode: str | None = None) -> None:
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)
    im.save(path, format="PNG")


def object_rows(labels: np.ndarray, roles: list[tuple[str, str | None]], base_class: str, image: str, mask: str) -> list[dict]:
    """One objects-table row per visible object of a label map; ``roles[k-1]`` is object k's (role, concept_id)."""
    rows = []
    for k, (role, cid) in enumerate(roles, start=1):
        m = labels == k
        box = mask_box(m)
        if box is None:
            continue
        rows.append({"image": image, "object": k, "role": role, "base_class": base_class, "concept_id": cid,
                     "box": list(box), "mask": mask, "area": int(m.sum())})
    return rows


def make_exemplar(cand: Candidate, cid: str, seed: int, gd, sam, real: RealSourceConfig, images_root: Path,
                  out_dir: Path, data_root: Path) -> tuple[dict, list[dict]] | Skipped:
    """The record of one exemplar, or why it is skipped; writes its image, mask and label map under ``out_dir``."""
    src = images_root / cand.file_name
    if not src.is_file():
        return Skipped("image_missing", f"{src} does not exist")
    try:  # a truncated download or a corrupt file is one image passed over, not the whole stage's work lost
        with Image.open(src) as im:  # 16-bit scaled, not clipped to white; the stored orientation, as the boxes are
            image = to_rgb(im, exif=False)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return Skipped("image_unreadable", f"{src} cannot be decoded ({type(err).__name__}: {err})")
    word = class_word(cand.category)
    dets = detect(gd, image, word, real.box_threshold, real.text_threshold)
    if not dets:
        return Skipped("no_detection", f"GroundingDINO found no {word!r} at box_threshold={real.box_threshold}, "
                                       f"text_threshold={real.text_threshold}")
    arr = np.asarray(image)
    masks = segment(sam, arr, [d.box for d in dets])
    if not masks[0].any():
        return Skipped("empty_mask", f"SAM's mask of the {word!r} box {list(dets[0].box)} is empty")
    labels = label_map(masks)
    box = mask_box(labels == 1)
    side = min(box[2] - box[0], box[3] - box[1])
    area = (box[2] - box[0]) * (box[3] - box[1])
    if side < real.min_box_side or area < real.min_box_area:
        return Skipped("box_too_small", f"concept mask box {list(box)} is under min_box_side={real.min_box_side} "
                                        f"or min_box_area={real.min_box_area}")
    ip, mp, lp = (out_dir / sub / f"{cid}.png" for sub in ("images", "masks", "labels"))
    _save_png(image, ip)
    _save_png((labels == 1).astype(np.uint8) * 255, mp, "L")
    _save_png(labels, lp, "L")
    identity = {
        "category": cand.category, "image_id": cand.image_id, "file_name": cand.file_name,
        "annotation_id": cand.annotation_id, "annotation_box": list(cand.annotation_box),
        "detection_box": list(dets[0].box), "detection_score": dets[0].score,
        "distractor_detections": len(dets) - 1,
    }
    row = {
        "concept_id": cid, "base_class": word, "group": group_of(cand.category), "image": _rel(ip, data_root),
        "mask": _rel(mp, data_root), "width": image.width, "height": image.height, "box": list(box),
        "identity": json.dumps(identity, sort_keys=True), "source": "", "seed": seed,
    }
    roles = [("concept", cid)] + [("distractor", None)] * (len(dets) - 1)
    return row, object_rows(labels, roles, word, row["image"], _rel(lp, data_root))


def make_real_exemplars(cfg: Config, out_dir: Path, data_root: Path) -> ExemplarResult:
    """Exemplars from the annotation file in ``cfg.exemplars.real``, written under ``out_dir``."""
    real = cfg.exemplars.real
    if real.images is None:
        raise ValueError("exemplars.real.images is null; the folder of the annotation file's images is required")
    images_root = Path(real.images)
    if not images_root.is_dir():
        raise FileNotFoundError(f"exemplars.real.images={real.images!r} is not a folder on this machine")
    if real.annotations is None:
        raise ValueError("exemplars.real.annotations is null; a COCO or LVIS instances JSON is required")
    cands = read_candidates(real.annotations)
    order = select_candidates(cands, real.classes, real.seed)
    gd = load_grounding_dino(real.grounding_dino, device=real.device)
    sam = load_sam(real.sam_checkpoint, real.sam_model_type, device=real.device)
    for sub in ("images", "masks", "labels"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    rows, objects, skipped = [], [], []
    for cand in order:
        if real.max_exemplars is not None and len(rows) >= real.max_exemplars:
            break
        cid = f"c{len(rows):05d}"
        got = make_exemplar(cand, cid, exemplar_seed(real.seed, len(rows)), gd, sam, real, images_root, out_dir, data_root)
        if isinstance(got, Skipped):
            log.info("exemplar skipped (%s): %s in image %s: %s", got.reason, cand.category, cand.file_name, got.detail)
            skipped.append({"image_id": cand.image_id, "file_name": cand.file_name, "category": cand.category,
                            "reason": got.reason, "detail": got.detail})
            continue
        row, objs = got
        row["source"] = cfg.exemplars.source
        rows.append(row)
        objects += objs
    if not rows:
        counts = dict(Counter(s["reason"] for s in skipped))
        raise ValueError(f"no exemplar accepted from exemplars.real.annotations={real.annotations!r} "
                         f"({len(skipped)} candidates skipped: {counts})")
    return ExemplarResult(pd.DataFrame(rows, columns=list(EXEMPLAR_COLUMNS)),
                          pd.DataFrame(objects, columns=list(OBJECT_COLUMNS)), skipped)
