"""What the quality gate measures in the pixels: image probes, box-versus-mask agreement,
perceptual hashes and near-duplicate search, and the second detection of a concept.

Pure numpy / PIL / scipy / imagehash; no Great Expectations. Every image file is opened
once (:func:`probe_image`: decode, size, pixel spread, the spread inside each box it
carries, its perceptual hash) and every label map once (:func:`label_map_claims`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ardetect.data.schema import DETECTION_COLUMNS

__all__ = [
    "ImageProbe",
    "Claim",
    "box_iou",
    "detect_phrases",
    "hamming",
    "label_map_claims",
    "nearest_other",
    "probe_image",
]

Box = tuple[float, float, float, float]


@dataclass
class ImageProbe:
    """One image file as read once: whether it is there and decodes, its size, pixel spread,
    the spread inside each box asked about, and its perceptual hash (packed bits)."""

    exists: bool
    decodes: bool | None
    width: float = math.nan
    height: float = math.nan
    error: str | None = None
    pixel_std: float = math.nan  # grey levels 0-255
    box_std: list[float] = field(default_factory=list)  # aligned with the boxes asked about
    phash: bytes | None = None


def _grey(im) -> np.ndarray:
    return np.asarray(im.convert("L"), dtype=np.float32)  # [H, W]


def _box_slice(box: Sequence[float], width: int, height: int) -> tuple[slice, slice] | None:
    """Pixel rows and columns a box covers (floor/ceil, clipped to the image); None when empty or not finite."""
    b = np.asarray(box, dtype=float).reshape(-1)
    if b.shape != (4,) or not np.isfinite(b).all():
        return None
    x0, y0 = max(0, int(math.floor(b[0]))), max(0, int(math.floor(b[1])))
    x1, y1 = min(width, int(math.ceil(b[2]))), min(height, int(math.ceil(b[3])))
    if x1 <= x0 or y1 <= y0:
        return None
    return slice(y0, y1), slice(x0, x1)


def probe_image(path: Path, boxes: Sequence[Sequence[float]] = (), hash_size: int = 16) -> ImageProbe:
    """Open ``path`` once: structure check, full decode, size, grey-level std of the whole image
    and of each box in ``boxes``, and its perceptual hash (``imagehash.phash``, ``hash_size**2`` bits)."""
    import imagehash
    from PIL import Image

    if not path.is_file():
        return ImageProbe(False, None, error="no such file")
    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated or corrupt pixel data
            w, h = im.size
            grey = _grey(im)
            bits = imagehash.phash(im, hash_size=hash_size).hash.reshape(-1)
    except Exception as err:  # noqa: BLE001 - any decoder error means "does not decode"
        return ImageProbe(True, False, error=f"{type(err).__name__}: {err}")
    stds = []
    for box in boxes:
        sl = _box_slice(box, w, h)
        stds.append(float(grey[sl].std()) if sl is not None else math.nan)
    return ImageProbe(True, True, float(w), float(h), None, float(grey.std()), stds, np.packbits(bits).tobytes())


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes row by row (``[N, 4]`` each; NaN where either is missing or empty)."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a) + area(b) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def _hull_raster(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a bool mask ``[H, W]`` as a bool raster of the same shape.

    The hull is taken over the corners of each row's outermost mask pixels; a mask whose
    corners are collinear (qhull cannot span it) is its own hull.
    """
    from PIL import Image, ImageDraw
    from scipy.spatial import ConvexHull, QhullError

    rows = np.flatnonzero(mask.any(1))
    if len(rows) == 0:
        return mask
    sub = mask[rows]
    first = sub.argmax(1)
    last = mask.shape[1] - sub[:, ::-1].argmax(1)  # one past the last pixel
    pts = np.concatenate([np.stack([first, rows], 1), np.stack([first, rows + 1], 1),
                          np.stack([last, rows], 1), np.stack([last, rows + 1], 1)]).astype(float)
    try:
        hull = ConvexHull(pts)
    except QhullError:
        return mask
    canvas = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    # pixel (x, y) covers [x, x+1) x [y, y+1); PIL fills by pixel centre, so shift the corners by -0.5
    ImageDraw.Draw(canvas).polygon([(float(x) - 0.5, float(y) - 0.5) for x, y in pts[hull.vertices]], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool) | mask


@dataclass
class Claim:
    """A box's agreement with the object it claims, measured on the label map."""

    mask_box: Box | None  # bounding box of the object's mask (None: the object is not in the map)
    iou: float  # IoU of the box with ``mask_box``
    in_hull: float  # share of the box's pixels inside the convex hull of the mask
    best_object: int | None  # the object whose mask box the box overlaps most
    best_iou: float


def _mask_box(m: np.ndarray) -> Box:
    """xyxy pixel box of a non-empty bool mask ``[H, W]``."""
    rows, cols = m.any(1), m.any(0)
    y0, y1 = int(rows.argmax()), len(rows) - int(rows[::-1].argmax())
    x0, x1 = int(cols.argmax()), len(cols) - int(cols[::-1].argmax())
    return (float(x0), float(y0), float(x1), float(y1))


def label_map_claims(path: Path, claims: Iterable[tuple[int, Sequence[float]]] = ()) -> tuple[dict[int, tuple[Box, int]], list[Claim]] | None:
    """Read a label-map PNG once: ``{label: (xyxy box of its mask, pixels)}`` for every non-zero value,
    and for each ``(object, box)`` in ``claims`` how well the box covers that object's mask.
    None when the file does not read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            labels = np.asarray(im)
    except Exception:  # noqa: BLE001 - missing or undecodable: reported as such
        return None
    objects: dict[int, tuple[Box, int]] = {}
    counts = np.bincount(labels.ravel(), minlength=1)
    for k in np.flatnonzero(counts[1:]) + 1:
        objects[int(k)] = (_mask_box(labels == k), int(counts[k]))
    out: list[Claim] = []
    hulls: dict[int, np.ndarray] = {}
    h, w = labels.shape[:2]
    keys = list(objects)
    boxes = np.array([objects[k][0] for k in keys], dtype=float).reshape(-1, 4)
    for k, box in claims:
        b = np.asarray(box, dtype=float).reshape(-1)
        if b.shape != (4,) or not np.isfinite(b).all():
            out.append(Claim(None, math.nan, math.nan, None, math.nan))
            continue
        ious = box_iou(np.repeat(b[None], len(keys), 0), boxes) if keys else np.zeros(0)
        best = int(np.nanargmax(ious)) if len(keys) and np.isfinite(ious).any() else None
        best_obj, best_iou = (keys[best], float(ious[best])) if best is not None else (None, math.nan)
        if k not in objects:
            out.append(Claim(None, math.nan, math.nan, best_obj, best_iou))
            continue
        if k not in hulls:
            hulls[k] = _hull_raster(labels == k)
        sl = _box_slice(b, w, h)
        share = float(hulls[k][sl].mean()) if sl is not None else math.nan
        iou = float(box_iou(b[None], np.asarray(objects[k][0], float)[None])[0])
        out.append(Claim(objects[k][0], iou, share, best_obj, best_iou))
    return objects, out


# --------------------------------------------------------------------------- perceptual hashes


def hamming(a: Sequence[bytes | None], b: Sequence[bytes | None]) -> np.ndarray:
    """Bit distance of packed hashes pair by pair (NaN where either is missing or the lengths differ)."""
    out = np.full(len(a), np.nan)
    for i, (x, y) in enumerate(zip(a, b)):
        if x is not None and y is not None and len(x) == len(y):
            out[i] = (int.from_bytes(x, "big") ^ int.from_bytes(y, "big")).bit_count()
    return out


def nearest_other(hashes: Sequence[bytes | None], groups: Sequence[object], max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """For each hash, the nearest hash of another group within ``max_distance`` bits.

    Returns (distance, index): the smallest distance to a hash of a different group when it is at
    most ``max_distance`` (else NaN and -1). Exact, and sub-quadratic: the bits are cut into
    ``max_distance + 1`` chunks, and two hashes within ``max_distance`` bits agree on at least one
    whole chunk (pigeonhole), so only hashes sharing a chunk value are compared.
    """
    n = len(hashes)
    dist, idx = np.full(n, np.nan), np.full(n, -1, dtype=np.int64)
    have = [i for i, h in enumerate(hashes) if h is not None]
    if len(have) < 2:
        return dist, idx
    nbytes = len(hashes[have[0]])
    have = [i for i in have if len(hashes[i]) == nbytes]
    bits = np.unpackbits(np.frombuffer(b"".join(hashes[i] for i in have), dtype=np.uint8).reshape(len(have), nbytes), axis=1)
    nbits = bits.shape[1]
    packed = np.frombuffer(b"".join(hashes[i] for i in have), dtype=np.uint8).reshape(len(have), nbytes)
    gcodes = pd.factorize(pd.Series([groups[i] for i in have], dtype=object))[0]
    # more chunks than max_distance + 1 keep the guarantee; at most 62 bits each fit an int64 key
    chunks = np.array_split(np.arange(nbits), min(nbits, max(max_distance + 1, -(-nbits // 62))))
    pairs = []
    for cols in chunks:
        weights = (1 << np.arange(len(cols), dtype=np.int64))[::-1]
        key = bits[:, cols].astype(np.int64) @ weights  # [n] the chunk's value
        order = np.argsort(key, kind="stable")
        k = key[order]
        offset = 1
        while offset < len(k):  # members of a bucket are adjacent once sorted: pair each with the next ones
            same = np.flatnonzero(k[offset:] == k[:-offset])
            if len(same) == 0:
                break
            pairs.append(np.stack([order[same], order[same + offset]], 1))
            offset += 1
    if not pairs:
        return dist, idx
    p = np.unique(np.sort(np.concatenate(pairs), axis=1), axis=0)
    p = p[gcodes[p[:, 0]] != gcodes[p[:, 1]]]
    if len(p) == 0:
        return dist, idx
    d = np.unpackbits(packed[p[:, 0]] ^ packed[p[:, 1]], axis=1).sum(1)
    keep = d <= max_distance
    p, d = p[keep], d[keep]
    if len(p) == 0:
        return dist, idx
    both, dd = np.concatenate([p, p[:, ::-1]]), np.concatenate([d, d])
    order = np.lexsort((dd, both[:, 0]))  # by hash, then distance: the first of each hash is its nearest
    both, dd = both[order], dd[order]
    first = np.r_[True, both[1:, 0] != both[:-1, 0]]
    have_arr = np.asarray(have)
    dist[have_arr[both[first, 0]]] = dd[first]
    idx[have_arr[both[first, 0]]] = have_arr[both[first, 1]]
    return dist, idx


# --------------------------------------------------------------------------- second detection (real path)

Detector = Callable[[object, str], Iterable[tuple[Sequence[float], float]]]


def detect_phrases(tuples: pd.DataFrame, data_root: str | Path, detector: Detector) -> pd.DataFrame:
    """A second detection of each tuple's concept in its query image, as the detections table.

    ``detector(image, text)`` gets the query image (PIL, RGB) and the tuple's base class (the
    concept phrase without its placeholder word, which a pretrained detector cannot read) and
    returns ``(xyxy box, score)`` pairs; the real path passes GroundingDINO here. Each query
    image is read and detected once. Returns a table of :data:`DETECTION_COLUMNS`.
    """
    from PIL import Image

    rows = []
    firsts = tuples.drop_duplicates("query_image")
    for img, text in zip(firsts["query_image"].astype(str), firsts["base_class"].astype(str)):
        with Image.open(Path(data_root) / img) as im:
            rgb = im.convert("RGB")
        for box, score in detector(rgb, text):
            b = [float(v) for v in box]
            if len(b) != 4:
                raise ValueError(f"detector returned box={box!r} for image {img!r}; expected 4 xyxy values")
            rows.append({"image": img, "phrase": text, "box": b, "score": float(score)})
    return pd.DataFrame(rows, columns=list(DETECTION_COLUMNS))
