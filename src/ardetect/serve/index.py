"""The candidate index: training images encoded once, searched by an image-level embedding.

An index folder holds, per image, its id, its path relative to the image root, its size,
the image encoder's outputs (``features.npy``, ``region_map.npy`` and, for a detector with a
region classifier, ``pixels.npy``: what the scorer reads)
and an image-level embedding (``embeddings.npy``) for the shortlist:

- image embedding: the region map max-pooled over the whole image (the control row of
  the evaluation, "AbC (ARD backbone)", pools the same map), L2-normalised;
- query embedding: the query image's region map max-pooled over the cells the query
  box covers, L2-normalised.

This pooling was chosen on the val split (``docs/shortlist_pooling.py``: the share of
queries whose training image is in a shortlist of 10, 25 and 50 of 104 was 0.44 / 0.64 /
0.87, the best at 10 and 50 of sixteen poolings: max or mean, whole map or 2x2 to 8x8
cells, raw or standardised).

A query takes the top-N images by inner product (faiss, exact) and the scorer re-ranks
them; N >= the index size scores every image. ``index.json`` records the model the
features came from (``model_fingerprint``): opening an index with another model fails.

``build_index`` encodes in chunks, each written to a temp file then renamed into a work
folder beside the index; a killed build started again skips the chunks already there,
and the finished index replaces the old folder only once complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ardetect.images import IMAGE_SUFFIXES, ImageRejected, open_image
from ardetect.tmpdirs import LockHeld, hold_lock, replaced_atomically, swap_into_place, temp_dir_beside

INDEX_FORMAT = 2
ENCODER_ARRAYS = ("features", "region_map")  # what every image encoder gives; ``index.json`` "arrays" lists any more


class IndexUnusable(ValueError):
    """An index that cannot be used: missing, incomplete, or of other images; the message says which."""


class IndexMismatch(IndexUnusable):
    """An index (or a partial build) made with another model than the one at hand."""


class IndexBusy(IndexUnusable):
    """Another ``ard index build`` is writing the same index."""


@dataclass
class ImageEntry:
    id: str
    path: str  # relative to the image root, posix
    concept_id: str | None = None
    gt_box: list[float] | None = None  # the box of the image's own concept, when the pipeline's data says it


# --- what to index --------------------------------------------------------------------------

def pipeline_entries(data_root: Path, split: str = "all") -> tuple[list[ImageEntry], pd.DataFrame]:
    """The pipeline's training images (``<data>/tuples/tuples.parquet``) of ``split`` (train, val, test or all),
    each with its concept's id and box, and the split's queries (with their true training image) as examples."""
    from ardetect.data.schema import TUPLE_COLUMNS, read_table

    data_root = Path(data_root)
    tuples = read_table(data_root / "tuples" / "tuples.parquet", TUPLE_COLUMNS, "tuples")
    if split != "all":
        if split not in set(tuples["split"]):
            raise IndexUnusable(f"split={split!r}: the tuples hold the splits {sorted(set(tuples['split']))} (or 'all')")
        tuples = tuples[tuples["split"] == split]
    first = tuples.drop_duplicates("train_image").sort_values("train_image")
    stems = [Path(p).stem for p in first["train_image"]]
    ids = stems if len(set(stems)) == len(stems) else [_id_of(p) for p in first["train_image"]]
    entries = [ImageEntry(i, str(p), str(c), [float(v) for v in b])
               for i, p, c, b in zip(ids, first["train_image"], first["concept_id"], first["train_box"])]
    by_image = dict(zip(first["train_image"], ids))
    order = {"test": 0, "val": 1, "train": 2}  # held-out queries first: the page offers the first ones
    ex = tuples.assign(_o=tuples["split"].map(order).fillna(3)).sort_values(["_o", "tuple_id"])
    examples = pd.DataFrame({
        "tuple_id": ex["tuple_id"].astype(str), "split": ex["split"].astype(str), "query_image": ex["query_image"].astype(str),
        "query_box": [[float(v) for v in b] for b in ex["query_box"]], "prompt": ex["prompt"].astype(str),
        "concept_phrase": ex["concept_phrase"].astype(str), "train_id": [by_image[p] for p in ex["train_image"]],
    })
    return entries, examples


def folder_entries(folder: Path) -> list[ImageEntry]:
    """Every image file under ``folder`` (recursively, sorted); ids are the relative paths without suffix.

    Linked folders are followed (a data set put together from links, ``images/coco -> /data/coco``), each real folder
    once: a link back up the tree, or two links to one folder, neither loops nor indexes an image twice."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IndexUnusable(f"--images {folder}: no such folder")
    files, seen_dirs = [], set()
    for here, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs.sort()  # a fixed walk (sorted, depth first): of two links to one folder, the one it meets first is kept
        files += [Path(here, n) for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES and Path(here, n).is_file()]
    files.sort()
    entries, seen = [], set()
    for p in files:
        rel = p.relative_to(folder).as_posix()
        i = base = _id_of(rel)
        n = 1
        while i in seen:
            n += 1
            i = f"{base}-{n}"
        seen.add(i)
        entries.append(ImageEntry(i, rel))
    if not entries:
        raise IndexUnusable(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return entries


def inside(rel: str) -> bool:
    """Whether a stored relative path stays under its root (no absolute path, no '..' out of it)."""
    norm = os.path.normpath(rel)
    return not os.path.isabs(norm) and norm != ".." and not norm.startswith("../") and "\0" not in rel


def _id_of(rel: str) -> str:
    stem = rel.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9._/-]", "_", stem).lstrip("./_-") or "image"


# --- embeddings --------------------------------------------------------------------------------

def pooled_map(region_map: np.ndarray) -> np.ndarray:
    """[N, D, h, w] -> [N, D]: max over the whole map."""
    return region_map.reshape(*region_map.shape[:2], -1).max(-1)


def pooled_box(region_map: np.ndarray, box: np.ndarray, image_size: int) -> np.ndarray:
    """[1, D, h, w] and a pixel xyxy box in the resized image -> [1, D]: max over the cells the box covers."""
    h, w = region_map.shape[-2:]
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box).reshape(4))
    sx, sy = w / image_size, h / image_size
    c0, c1 = int(np.clip(np.floor(x0 * sx), 0, w - 1)), int(np.clip(np.ceil(x1 * sx), 1, w))
    r0, r1 = int(np.clip(np.floor(y0 * sy), 0, h - 1)), int(np.clip(np.ceil(y1 * sy), 1, h))
    return region_map[:, :, r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)].reshape(region_map.shape[0], region_map.shape[1], -1).max(-1)


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (inner product = cosine)."""
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


# --- building ----------------------------------------------------------------------------------

def _plan_key(fingerprint: str, root: Path, entries: list[ImageEntry], chunk: int) -> str:
    h = hashlib.sha256(f"{fingerprint}\n{root}\n{chunk}\n".encode())
    for e in entries:
        h.update(f"{e.id}\t{e.path}\n".encode())
    return h.hexdigest()


def _save_atomic_npz(path: Path, **arrays) -> None:
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


def build_index(model, root: Path, entries: list[ImageEntry], out: Path, examples: pd.DataFrame | None = None,
                chunk: int = 64, source: str = "folder", progress: bool = True, fresh: bool = False, max_pixels: int | None = None) -> dict:
    """Encode ``entries`` (paths under ``root``) with ``model`` (a ``LoadedModel``) into the index folder ``out``.

    Resumes a killed build of the same model and images; refuses a partial build of another
    model unless ``fresh``, and a build another process is writing. Returns the index's ``index.json`` content.
    """
    from tqdm import tqdm

    from ardetect.export.runtime import prepare_image

    det = model.detector
    root, out = Path(root).absolute(), Path(out)
    _check_out(out)
    fingerprint = model.fingerprint
    work = out.parent / f".{out.name}.building"
    key = _plan_key(fingerprint, root, entries, chunk)
    plan_file = work / "plan.json"
    work.mkdir(parents=True, exist_ok=True)
    try:  # two builds of one index: the second would find the first's chunks half there, or remove them (--fresh)
        lock = hold_lock(work / ".lock", "ard index build")
    except LockHeld as held:
        raise IndexBusy(f"--out {out}: another index build is writing it ({held.who()}): wait for it to end, or stop it "
                        f"(Ctrl-C in its terminal{held.kill_hint()})") from None
    with lock:
        if fresh:
            for p in work.iterdir():
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.name != ".lock":
                    p.unlink()
        if plan_file.is_file():
            plan = json.loads(plan_file.read_text())
            if plan.get("model_fingerprint") != fingerprint:
                raise IndexMismatch(f"{work} is a partial index build of another model ({plan.get('model_fingerprint', '?')[:16]}..., "
                                    f"this one is {fingerprint[:16]}...): pass --fresh to discard it")
            if plan.get("key") != key:
                raise IndexMismatch(f"{work} is a partial index build of other images or settings ({plan.get('count')} images from "
                                    f"{plan.get('root')}): pass --fresh to discard it")
        else:
            tmp = work / ".plan.json.tmp"
            tmp.write_text(json.dumps({"model_fingerprint": fingerprint, "key": key, "count": len(entries), "root": str(root)}))
            os.replace(tmp, plan_file)
        n_chunks = (len(entries) + chunk - 1) // chunk
        done = {int(p.stem.split("-")[1]) for p in work.glob("chunk-*.npz")}
        bar = tqdm(total=len(entries), desc="index build", unit="img", disable=not progress)
        bar.update(sum(min(chunk, len(entries) - c * chunk) for c in done if c < n_chunks))
        t0 = time.perf_counter()
        for c in range(n_chunks):
            if c in done:
                continue
            part = entries[c * chunk : (c + 1) * chunk]
            prepared, kept, skipped = [], [], []
            for j, e in enumerate(part):
                if not inside(e.path):
                    raise IndexUnusable(f"{e.path}: leads outside the image root {root}")
                try:  # one unreadable file (a truncated copy, a text file named .jpg) is passed over and listed
                    image = open_image(root / e.path, max_pixels)
                except (ImageRejected, OSError) as err:
                    skipped.append((e.path, str(err)))
                    continue
                prepared.append(prepare_image(image, det.size))
                kept.append(j)
            enc = det.encode_images(np.stack([a for a, _ in prepared])) if prepared else {}
            sizes = np.array([s for _, s in prepared], dtype=np.int64).reshape(-1, 2)  # (h, w)
            _save_atomic_npz(work / f"chunk-{c:05d}.npz", **enc, sizes=sizes, kept=np.array(kept, dtype=np.int64),
                             skipped_paths=np.array([p for p, _ in skipped], dtype=str), skipped_reasons=np.array([r for _, r in skipped], dtype=str))
            bar.update(len(part))
        bar.close()
        encode_s = time.perf_counter() - t0
        meta = _assemble(work, out, entries, chunk, n_chunks, root, fingerprint, det, examples, source, encode_s)
        shutil.rmtree(work, ignore_errors=True)
        return meta


def _check_out(out: Path) -> None:
    """The finished index replaces ``out`` whole: refuse an ``out`` that holds anything but an index (a user's folder,
    the image folder itself), whose files the swap would delete."""
    if out.exists() and not out.is_dir():
        raise IndexUnusable(f"--out {out}: a file, not a folder for the index")
    if out.is_dir() and not (out / "index.json").is_file():
        held = sorted(p.name for p in out.iterdir())
        if held:
            raise IndexUnusable(f"--out {out} holds {len(held)} entries that are not an index (the first: {held[0]}), which "
                                "the finished index would replace: choose an empty or new folder, or an index's own")


CHUNK_RECORDS = ("sizes", "kept", "skipped_paths", "skipped_reasons")  # a chunk's entries besides the encoder's arrays


def _assemble(work: Path, out: Path, entries, chunk: int, n_chunks: int, root: Path, fingerprint: str, det, examples, source: str,
              encode_s: float) -> dict:
    chunks = [np.load(work / f"chunk-{c:05d}.npz") for c in range(n_chunks)]
    indexed, skipped = [], []
    for c, z in enumerate(chunks):
        part = entries[c * chunk : (c + 1) * chunk]
        kept = z["kept"].tolist() if "kept" in z.files else range(len(z["sizes"]))  # (chunks of a build before skipping)
        indexed += [part[i] for i in kept]
        if "skipped_paths" in z.files:
            skipped += [{"path": p, "reason": r} for p, r in zip(z["skipped_paths"].tolist(), z["skipped_reasons"].tolist())]
    if not indexed:
        raise IndexUnusable(f"none of the {len(entries)} images could be read; the first: {skipped[0]['path']}: {skipped[0]['reason']}")
    first = next(z for z in chunks if len(z["sizes"]))
    entries, n = indexed, len(indexed)
    tmp = temp_dir_beside(out)
    try:
        arrays = {k: np.lib.format.open_memmap(tmp / f"{k}.npy", mode="w+", dtype=np.float32, shape=(n, *first[k].shape[1:]))
                  for k in first.files if k not in CHUNK_RECORDS}
        sizes = np.zeros((n, 2), dtype=np.int64)
        s = 0
        for z in chunks:
            m = len(z["sizes"])
            if not m:  # every image of the chunk unreadable: it holds no arrays
                continue
            for k in arrays:
                arrays[k][s : s + m] = z[k]
            sizes[s : s + m] = z["sizes"]
            s += m
        if s != n:
            raise IndexUnusable(f"{work}: the chunks hold {s} images, the plan {n}")
        if skipped:
            (tmp / "skipped.json").write_text(json.dumps(skipped, indent=2) + "\n")
        np.save(tmp / "embeddings.npy", normalise(pooled_map(np.asarray(arrays["region_map"]))))
        for a in arrays.values():
            a.flush()
        del arrays
        table = pd.DataFrame({
            "id": [e.id for e in entries], "path": [e.path for e in entries], "height": sizes[:, 0], "width": sizes[:, 1],
            "concept_id": [e.concept_id for e in entries], "gt_box": [e.gt_box for e in entries],
        })
        table.to_parquet(tmp / "images.parquet", index=False)
        if examples is not None and len(examples):
            examples.to_parquet(tmp / "examples.parquet", index=False)
        meta = {
            "format_version": INDEX_FORMAT, "model_fingerprint": fingerprint, "image_size": det.size, "count": n, "root": str(root),
            "source": source, "embedding": "region_map max-pooled, L2-normalised", "arrays": sorted(k for k in first.files if k not in CHUNK_RECORDS),
            "skipped": len(skipped),
            "feature_shape": list(np.load(tmp / "features.npy", mmap_mode="r").shape[1:]),
            "region_map_shape": list(np.load(tmp / "region_map.npy", mmap_mode="r").shape[1:]),
            "encode_seconds": round(encode_s, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
        swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


# --- reading and searching ---------------------------------------------------------------------

class CandidateIndex:
    """An index folder opened for queries: arrays memory-mapped, a faiss inner-product index over the embeddings."""

    def __init__(self, folder: Path, fingerprint: str | None = None):
        import faiss

        self.folder = Path(folder)
        meta_file = self.folder / "index.json"
        if not meta_file.is_file():
            raise IndexUnusable(f"{meta_file} not found: {self.folder} is not a candidate index (run `ard index build`)")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format_version") != INDEX_FORMAT:
            raise IndexUnusable(f"{meta_file}: format_version {self.meta.get('format_version')!r}, this ardetect reads {INDEX_FORMAT}")
        if fingerprint is not None and self.meta["model_fingerprint"] != fingerprint:
            raise IndexMismatch(
                f"{self.folder} was built with another model (image encoder {self.meta['model_fingerprint'][:16]}..., "
                f"the served model's is {fingerprint[:16]}...): rebuild it with `ard index build`"
            )
        self.arrays = {}
        for k in (*sorted(set(self.meta.get("arrays") or ()) | set(ENCODER_ARRAYS)), "embeddings"):
            p = self.folder / f"{k}.npy"
            if not p.is_file():
                raise IndexUnusable(f"{p} not found: the index in {self.folder} is incomplete")
            self.arrays[k] = np.load(p, mmap_mode="r")
        self.embeddings = np.asarray(self.arrays.pop("embeddings"))
        self.features, self.region_map = self.arrays["features"], self.arrays["region_map"]
        self.table = pd.read_parquet(self.folder / "images.parquet")
        n = self.meta["count"]
        if not (len(self.table) == len(self.embeddings) == n and all(len(a) == n for a in self.arrays.values())):
            raise IndexUnusable(f"{self.folder}: images.parquet and the arrays disagree on the image count (index.json says {n})")
        self.root = Path(self.meta["root"])
        self.ids = self.table["id"].astype(str).tolist()
        self.position = {i: k for k, i in enumerate(self.ids)}
        self.sizes = self.table[["height", "width"]].to_numpy(np.int64)
        self.search_index = faiss.IndexFlatIP(self.embeddings.shape[1])
        self.search_index.add(np.ascontiguousarray(self.embeddings, dtype=np.float32))
        ex = self.folder / "examples.parquet"
        self.examples = pd.read_parquet(ex) if ex.is_file() else None

    def __len__(self) -> int:
        return len(self.ids)

    def query_embedding(self, query_region_map: np.ndarray, box: np.ndarray, image_size: int) -> np.ndarray:
        return normalise(pooled_box(query_region_map, box, image_size))

    def shortlist(self, query_embedding: np.ndarray, n: int) -> np.ndarray:
        """Positions of the ``n`` images nearest the query embedding (all of them when ``n`` >= the index size), ascending."""
        if n >= len(self):
            return np.arange(len(self))
        _, found = self.search_index.search(np.ascontiguousarray(query_embedding, dtype=np.float32), int(n))
        return np.sort(found[0][found[0] >= 0])

    def positions_of(self, ids: list[str]) -> np.ndarray:
        unknown = [i for i in ids if i not in self.position]
        if unknown:
            from ardetect.serve.requests import RequestError

            raise RequestError("candidates", f"{len(unknown)} unknown ids, e.g. {unknown[:5]!r} (this index has {len(self)} images)")
        return np.sort(np.array([self.position[i] for i in ids], dtype=np.int64))

    def candidates(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(a[positions]) for k, a in self.arrays.items()}

    def path_of(self, image_id: str) -> Path:
        """The file of an image id; only ids in the index resolve, and only to files under its root."""
        k = self.position.get(image_id)
        if k is None:
            raise KeyError(image_id)
        return self.file_under_root(self.table["path"].iloc[k], image_id)

    def file_under_root(self, rel: str, what: str) -> Path:
        """``rel`` under the index's root; a path that would leave it is refused (``KeyError``)."""
        if not inside(str(rel)):
            raise KeyError(what)
        return self.root / os.path.normpath(str(rel))

    def info(self, k: int) -> dict:
        row = self.table.iloc[k]
        box = row["gt_box"]
        return {"id": self.ids[k], "width": int(row["width"]), "height": int(row["height"]),
                "concept_id": None if row["concept_id"] is None or pd.isna(row["concept_id"]) else str(row["concept_id"]),
                "concept_box": None if box is None else [float(v) for v in box]}
