"""The synthetic attribution world: the embedded default data source.

Exemplars hold one concept instance with a unique identity (palette, texture,
marks, proportions) of a base class (shape family), on a procedural scene with
distractors (some of the same base class). A simulated customization renders the
identity into the scene and medium a prompt template names, with pose, scale and
identity drift. Boxes and masks are known by construction. Deterministic per seed.
"""

from __future__ import annotations

import io
import json
import math
import os
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from ardetect.config import WorldConfig
from ardetect.data.classes import WORLD_CLASSES
from ardetect.data.schema import EXEMPLAR_COLUMNS, GENERATED_COLUMNS, OBJECT_COLUMNS
from ardetect.data.templates import SCENES, Template, fill, templates_for
from ardetect.data.world_scenes import background, stylize
from ardetect.data.world_shapes import MARK_REGION, SHAPES
from ardetect.procs import fork_context, reset_signals, usable_cores

TEXTURES = ("solid", "stripes", "dots", "checker", "gradient", "rings", "zigzag")
MARK_SHAPES = ("circle", "square", "triangle", "cross", "diamond")
MIN_BOX_SIDE = 10.0  # pixels
_STREAM_IDENTITY, _STREAM_EXEMPLAR, _STREAM_GENERATED, _STREAM_TEMPLATE = 1, 2, 3, 4


def _classes(cfg: WorldConfig) -> list[str]:
    classes = list(cfg.base_classes) if cfg.base_classes else list(WORLD_CLASSES)
    unknown = [c for c in classes if c not in WORLD_CLASSES]
    if unknown:
        raise ValueError(f"world.base_classes has unknown classes {unknown}; known: {list(WORLD_CLASSES)}")
    return classes


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _hsv_color(h: float, s: float, v: float) -> list[int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return [int(round(255 * r)), int(round(255 * g)), int(round(255 * b))]


def _random_identity(base_class: str, rng: np.random.Generator) -> dict:
    h = rng.random()
    palette = [
        _hsv_color(h, 0.45 + 0.5 * rng.random(), 0.5 + 0.5 * rng.random()),
        _hsv_color((h + 0.25 + 0.5 * rng.random()) % 1.0, 0.3 + 0.7 * rng.random(), 0.35 + 0.65 * rng.random()),
        _hsv_color(rng.random(), 0.6 + 0.4 * rng.random(), 0.6 + 0.4 * rng.random()),
        _hsv_color(rng.random(), 0.3, 0.1 + 0.15 * rng.random()),
    ]
    texture = {
        "type": str(rng.choice(TEXTURES)),
        "freq": float(2.0 + 4.0 * rng.random()),
        "angle": float(rng.uniform(0, math.pi)),
        "color": _hsv_color(rng.random(), 0.5 + 0.5 * rng.random(), 0.3 + 0.7 * rng.random()),
    }
    cx, cy, rx, ry = MARK_REGION[base_class]
    marks = [
        {
            "shape": str(rng.choice(MARK_SHAPES)),
            "u": float(cx + rx * rng.uniform(-1, 1)),
            "v": float(cy + ry * rng.uniform(-1, 1)),
            "size": float(rng.uniform(0.08, 0.16)),
            "color": _hsv_color(rng.random(), 0.8, 0.4 + 0.6 * rng.random()),
        }
        for _ in range(int(rng.integers(1, 4)))
    ]
    return {
        "base_class": base_class,
        "group": WORLD_CLASSES[base_class],
        "palette": palette,
        "texture": texture,
        "marks": marks,
        "proportions": {"aspect": float(rng.uniform(0.8, 1.25)), "a": float(rng.uniform(0.8, 1.2)), "b": float(rng.uniform(0.8, 1.2))},
    }


def sample_identity(cfg: WorldConfig, concept_index: int) -> dict:
    """The identity of concept ``concept_index`` (base classes round-robin)."""
    classes = _classes(cfg)
    base_class = classes[concept_index % len(classes)]
    return _random_identity(base_class, _rng(cfg.seed, _STREAM_IDENTITY, concept_index))


def drift_identity(identity: dict, drift: float, rng: np.random.Generator) -> dict:
    """A perturbed copy of ``identity`` (palette, texture, marks, proportions), scaled by ``drift``."""
    out = json.loads(json.dumps(identity))
    if drift <= 0:
        return out

    def col(c):
        return [int(np.clip(v + rng.normal(0, 255 * drift), 0, 255)) for v in c]

    out["palette"] = [col(c) for c in out["palette"]]
    out["texture"]["color"] = col(out["texture"]["color"])
    out["texture"]["freq"] *= float(1 + drift * rng.normal())
    out["texture"]["angle"] += float(drift * rng.normal())
    for m in out["marks"]:
        m["u"] += float(drift * 0.5 * rng.normal())
        m["v"] += float(drift * 0.5 * rng.normal())
        m["color"] = col(m["color"])
    for k in out["proportions"]:
        out["proportions"][k] *= float(np.clip(1 + drift * rng.normal(), 0.7, 1.3))
    return out


def _mark_poly(shape: str, u: float, v: float, s: float) -> np.ndarray:
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, 12, endpoint=False)
        return np.stack([u + s * np.cos(t), v + s * np.sin(t)], 1)
    if shape == "square":
        return np.array([[u - s, v - s], [u + s, v - s], [u + s, v + s], [u - s, v + s]])
    if shape == "triangle":
        return np.array([[u, v - s], [u + s, v + s * 0.8], [u - s, v + s * 0.8]])
    if shape == "diamond":
        return np.array([[u, v - s * 1.2], [u + s, v], [u, v + s * 1.2], [u - s, v]])
    w = s * 0.35  # cross
    return np.array([[u - w, v - s], [u + w, v - s], [u + w, v - w], [u + s, v - w], [u + s, v + w], [u + w, v + w],
                     [u + w, v + s], [u - w, v + s], [u - w, v + w], [u - s, v + w], [u - s, v - w], [u - w, v - w]])


class _Pose:
    """Unit frame -> pixels: scale (with aspect), rotation, flip, translation."""

    def __init__(self, scale: float, aspect: float, angle: float, flip: bool):
        sx, sy = scale * math.sqrt(aspect), scale / math.sqrt(aspect)
        c, s = math.cos(angle), math.sin(angle)
        f = -1.0 if flip else 1.0
        self.A = np.array([[c, -s], [s, c]]) @ np.diag([f * sx, sy])
        self.t = np.zeros(2)

    def apply(self, pts: np.ndarray) -> np.ndarray:
        return pts @ self.A.T + self.t

    def inverse(self, xy: np.ndarray) -> np.ndarray:
        return (xy - self.t) @ np.linalg.inv(self.A).T


def _texture(tex: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Weight in [0, 1] of the texture colour over the primary colour, in the unit frame."""
    typ, f, a = tex["type"], tex["freq"], tex["angle"]
    ru = u * math.cos(a) + v * math.sin(a)
    rv = -u * math.sin(a) + v * math.cos(a)
    if typ == "solid":
        return np.zeros_like(u)
    if typ == "stripes":
        return (np.sin(ru * f * math.pi) > 0.2).astype(np.float32)
    if typ == "dots":
        return ((np.sin(ru * f * math.pi) * np.sin(rv * f * math.pi)) > 0.5).astype(np.float32)
    if typ == "checker":
        return ((np.floor(ru * f * 0.7) + np.floor(rv * f * 0.7)) % 2).astype(np.float32)
    if typ == "gradient":
        return np.clip((ru + 1.0) / 2.0, 0, 1).astype(np.float32)
    if typ == "rings":
        return (np.sin(np.hypot(u, v) * f * math.pi) > 0.3).astype(np.float32)
    return (np.sin((ru + 0.25 * np.abs(((rv * f) % 2) - 1)) * f * math.pi) > 0).astype(np.float32)  # zigzag


def _object_parts(identity: dict) -> list:
    return SHAPES[identity["base_class"]](identity["proportions"])


def _place(parts: list, pose: _Pose, size: int, rng: np.random.Generator, center: tuple[float, float] | None = None) -> None:
    """Set ``pose.t`` so the object lies inside the image (at ``center`` when given, else random)."""
    pts = np.concatenate([p for _, _, p in parts])
    tp = pose.apply(pts) - pose.t  # the object's extent at no translation: a retry's pose still holds the last try's
    lo, hi = tp.min(0), tp.max(0)
    ext = hi - lo
    margin = 2.0
    if center is None:
        x = rng.uniform(margin, max(margin, size - margin - ext[0]))
        y = rng.uniform(margin, max(margin, size - margin - ext[1]))
    else:
        x = float(np.clip(center[0] - ext[0] / 2, margin, max(margin, size - margin - ext[0])))
        y = float(np.clip(center[1] - ext[1] / 2, margin, max(margin, size - margin - ext[1])))
    pose.t = np.array([x, y]) - lo


def _pixel_box(parts: list, pose: _Pose) -> np.ndarray:
    tp = pose.apply(np.concatenate([p for _, _, p in parts]))
    return np.concatenate([tp.min(0), tp.max(0)])


def _make_pose(identity: dict, size: int, frac: float, angle: float, flip: bool) -> _Pose:
    parts = _object_parts(identity)
    aspect = identity["proportions"]["aspect"]
    base = _Pose(1.0, aspect, angle, flip)
    tp = base.apply(np.concatenate([p for _, _, p in parts]))
    ext = float((tp.max(0) - tp.min(0)).max())
    scale = frac * size / max(ext, 1e-6)
    scale = min(scale, (size - 6) / max(ext, 1e-6))
    return _Pose(scale, aspect, angle, flip)


def _draw_object(canvas: np.ndarray, identity: dict, pose: _Pose) -> np.ndarray:
    """Draw ``identity`` onto ``canvas`` (HxWx3 float32, in place); return its mask (bool HxW)."""
    size = canvas.shape[0]
    parts = _object_parts(identity)
    label = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(label)
    for kind, c, pts in parts:
        xy = [tuple(p) for p in pose.apply(pts)]
        d.polygon(xy, fill=0 if kind == "hole" else c)
    lab = np.asarray(label)
    mask = lab > 0
    if not mask.any():
        return mask
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    sub = lab[y0:y1, x0:x1]
    pal = np.array(identity["palette"], np.float32)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    uv = pose.inverse(np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1))
    u, v = uv[:, 0].reshape(sub.shape), uv[:, 1].reshape(sub.shape)
    w = _texture(identity["texture"], u, v)[..., None]
    prim = pal[0] * (1 - w) + np.array(identity["texture"]["color"], np.float32) * w
    col = np.zeros(sub.shape + (3,), np.float32)
    col[sub == 1] = prim[sub == 1]
    for k in (2, 3, 4):
        col[sub == k] = pal[k - 1]
    # identity marks, clipped to the silhouette
    mk = Image.new("L", (size, size), 0)
    md = ImageDraw.Draw(mk)
    for i, m in enumerate(identity["marks"]):
        xy = [tuple(p) for p in pose.apply(_mark_poly(m["shape"], m["u"], m["v"], m["size"]))]
        md.polygon(xy, fill=i + 1)
    mka = np.asarray(mk)[y0:y1, x0:x1]
    for i, m in enumerate(identity["marks"]):
        sel = (mka == i + 1) & (sub > 0)
        col[sel] = np.array(m["color"], np.float32)
    # shading + dark outline
    shade = 1.0 - 0.25 * np.clip((v + 1) / 2, 0, 1)
    col *= shade[..., None]
    er = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(3)))[y0:y1, x0:x1] > 0
    edge = (sub > 0) & ~er
    col[edge] *= 0.45
    region = canvas[y0:y1, x0:x1]
    region[sub > 0] = col[sub > 0]
    return mask


class Rendered(NamedTuple):
    """A rendered scene: the image, the concept's mask and box, and every object drawn.

    ``labels`` [H, W] uint8: 0 background, k the k-th object drawn (distractors first, the
    concept last), as visible in the image (later objects cover earlier ones). ``objects``:
    one dict per object still visible, in drawing order: ``object`` (its label value),
    ``role`` ("concept" or "distractor"), ``base_class``, ``box`` (xyxy pixels of its
    visible mask) and ``area`` (visible pixels).
    """

    image: np.ndarray
    mask: np.ndarray
    box: tuple[float, float, float, float]
    labels: np.ndarray
    objects: list[dict]


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def _render_scene(cfg: WorldConfig, identity: dict, scene: str, medium: str, rng: np.random.Generator,
                  angle: float, flip: bool) -> Rendered:
    size = cfg.image_size
    classes = _classes(cfg)
    lo, hi = cfg.object_scale
    frac = float(rng.uniform(lo, hi))
    pose = _make_pose(identity, size, frac, angle, flip)
    parts = _object_parts(identity)
    _place(parts, pose, size, rng)
    cbox = _pixel_box(parts, pose)
    canvas = np.asarray(background(scene, size, rng), np.float32).copy()
    labels = np.zeros((size, size), np.uint8)
    drawn: list[tuple[str, str]] = []  # (role, base class) of each object drawn, label k = index + 1
    # distractors: other objects, some of the same base class, that barely overlap the concept
    dc = cfg.distractors
    n = int(rng.integers(dc.min_count, dc.max_count + 1))
    others = [c for c in classes if c != identity["base_class"]] or classes
    for _ in range(n):
        same = rng.random() < dc.same_class_prob
        bc = identity["base_class"] if same else str(rng.choice(others))
        did = _random_identity(bc, rng)
        dfrac = float(rng.uniform(*dc.scale))
        dpose = _make_pose(did, size, dfrac, float(rng.uniform(-0.3, 0.3)), bool(rng.random() < 0.5))
        dparts = _object_parts(did)
        for _try in range(12):
            _place(dparts, dpose, size, rng)
            db = _pixel_box(dparts, dpose)
            iw = max(0.0, min(db[2], cbox[2]) - max(db[0], cbox[0]))
            ih = max(0.0, min(db[3], cbox[3]) - max(db[1], cbox[1]))
            darea = (db[2] - db[0]) * (db[3] - db[1])
            if iw * ih <= 0.1 * darea:
                dmask = _draw_object(canvas, did, dpose)
                drawn.append(("distractor", bc))
                labels[dmask] = len(drawn)
                break
    mask = _draw_object(canvas, identity, pose)
    drawn.append(("concept", identity["base_class"]))
    labels[mask] = len(drawn)
    img = stylize(Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)), medium, rng)
    objects = []
    for k, (role, base_class) in enumerate(drawn, start=1):
        visible = labels == k
        if visible.any():  # a distractor the concept covers whole is not in the image
            objects.append({"object": k, "role": role, "base_class": base_class, "box": _mask_box(visible), "area": int(visible.sum())})
    return Rendered(np.asarray(img, np.uint8), mask, _mask_box(mask), labels, objects)


def render_exemplar(cfg: WorldConfig, identity: dict, rng: np.random.Generator) -> Rendered:
    """An exemplar: photo medium, the identity undrifted in a random scene."""
    scene = str(rng.choice(SCENES))
    return _render_scene(cfg, identity, scene, "photo", rng, float(rng.uniform(-0.1, 0.1)), bool(rng.random() < 0.5))


def render_generated(cfg: WorldConfig, identity: dict, template: Template, rng: np.random.Generator) -> Rendered:
    """A simulated customization output for ``template``."""
    drifted = drift_identity(identity, cfg.identity_drift, rng)
    angle = float(rng.uniform(-cfg.pose_jitter, cfg.pose_jitter))
    return _render_scene(cfg, drifted, template.scene, template.medium, rng, angle, bool(rng.random() < 0.5))


def _save_png(arr: np.ndarray, path: Path, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG", compress_level=3)
    path.write_bytes(buf.getvalue())


def _rel(path: Path, root: Path) -> str:
    return os.path.relpath(Path(path).resolve(), Path(root).resolve()).replace(os.sep, "/")


def _object_rows(r: Rendered, image: str, labels: str, concept_id: str) -> list[dict]:
    """The ``objects`` rows of one rendered image (its label map saved at ``labels``)."""
    return [
        {"image": image, "object": o["object"], "role": o["role"], "base_class": o["base_class"],
         "concept_id": concept_id if o["role"] == "concept" else None, "box": [float(b) for b in o["box"]],
         "mask": labels, "area": o["area"]}
        for o in r.objects
    ]


def _exemplar_job(i: int, cfg: WorldConfig, out_dir: Path, data_root: Path) -> tuple[dict, list[dict]]:
    identity = sample_identity(cfg, i)
    seed = _seed(cfg.seed, _STREAM_EXEMPLAR, i)
    r = render_exemplar(cfg, identity, np.random.default_rng(seed))
    cid = f"c{i:05d}"
    ip, mp, lp = out_dir / "images" / f"{cid}.png", out_dir / "masks" / f"{cid}.png", out_dir / "labels" / f"{cid}.png"
    _save_png(r.image, ip)
    _save_png(r.mask.astype(np.uint8) * 255, mp, "L")
    _save_png(r.labels, lp, "L")
    row = {
        "concept_id": cid, "base_class": identity["base_class"], "group": identity["group"],
        "image": _rel(ip, data_root), "mask": _rel(mp, data_root),
        "width": int(r.image.shape[1]), "height": int(r.image.shape[0]), "box": [float(b) for b in r.box],
        "identity": json.dumps(identity, sort_keys=True), "source": "synthetic", "seed": int(seed),
    }
    return row, _object_rows(r, row["image"], _rel(lp, data_root), cid)


def _generated_job(item: tuple[int, str, str], cfg: WorldConfig, out_dir: Path, data_root: Path) -> tuple[list[dict], list[dict]]:
    i, cid, identity_json = item
    identity = json.loads(identity_json)
    temps = templates_for(identity["group"], cfg.template_set)
    trng = _rng(cfg.seed, _STREAM_TEMPLATE, i)
    q = cfg.queries_per_concept
    order = list(trng.permutation(len(temps)))
    while len(order) < q:
        order += list(trng.permutation(len(temps)))
    rows, objects = [], []
    for j in range(q):
        t = temps[order[j]]
        seed = _seed(cfg.seed, _STREAM_GENERATED, i, j)
        r = render_generated(cfg, identity, t, np.random.default_rng(seed))
        qid = f"q{i:05d}_{j:02d}"
        ip, lp = out_dir / "images" / f"{qid}.png", out_dir / "labels" / f"{qid}.png"
        _save_png(r.image, ip)
        _save_png(r.labels, lp, "L")
        prompt, phrase = fill(t.text, identity["base_class"], cfg.placeholder)
        rows.append({
            "query_id": qid, "concept_id": cid, "prompt": prompt, "concept_phrase": phrase, "template": t.text,
            "medium": t.medium, "scene": t.scene, "image": _rel(ip, data_root),
            "width": int(r.image.shape[1]), "height": int(r.image.shape[0]), "box": [float(b) for b in r.box],
            "backend": "synthetic", "seed": int(seed),
        })
        objects += _object_rows(r, rows[-1]["image"], _rel(lp, data_root), cid)
    return rows, objects


def _run(fn, items: list, workers: int, desc: str) -> list:
    n = workers or usable_cores()
    if n <= 1 or len(items) <= 1:
        return [fn(x) for x in tqdm(items, desc=desc, unit="img")]
    chunk = max(1, min(32, len(items) // (n * 4)))
    with fork_context().Pool(n, initializer=reset_signals) as pool:
        out = list(tqdm(pool.imap(fn, items, chunksize=chunk), total=len(items), desc=desc, unit="img"))
        pool.close()  # the workers end on the pool's sentinel, not by a signal
        pool.join()
    return out


def make_exemplars(cfg: WorldConfig, out_dir: Path, data_root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Render ``cfg.n_concepts`` exemplars into ``out_dir``; return the exemplar and objects tables."""
    out_dir = Path(out_dir)
    for sub in ("images", "masks", "labels"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    _classes(cfg)
    per = _run(partial(_exemplar_job, cfg=cfg, out_dir=out_dir, data_root=Path(data_root)),
               list(range(cfg.n_concepts)), cfg.workers, "exemplars")
    return (pd.DataFrame([row for row, _ in per], columns=list(EXEMPLAR_COLUMNS)),
            pd.DataFrame([o for _, objs in per for o in objs], columns=list(OBJECT_COLUMNS)))


def make_generated(cfg: WorldConfig, exemplars: pd.DataFrame, out_dir: Path, data_root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Render ``cfg.queries_per_concept`` generated images per exemplar; return the generated and objects tables."""
    out_dir = Path(out_dir)
    for sub in ("images", "labels"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    items = [(int(str(r.concept_id)[1:]), str(r.concept_id), str(r.identity)) for r in exemplars.itertuples(index=False)]
    per = _run(partial(_generated_job, cfg=cfg, out_dir=out_dir, data_root=Path(data_root)), items, cfg.workers, "generated")
    return (pd.DataFrame([r for rows, _ in per for r in rows], columns=list(GENERATED_COLUMNS)),
            pd.DataFrame([o for _, objs in per for o in objs], columns=list(OBJECT_COLUMNS)))
