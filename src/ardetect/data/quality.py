"""Data-quality checks of the tuple annotations, run with Great Expectations.

Every check is a Great Expectations expectation, reported through GE uniformly.
Checks GE cannot express on the raw record (files on disk, a prompt holding its own
row's phrase, an image in two splits, a tuple's negatives holding its own training
image, balance ratios, what the pixels hold) are first computed with pandas / PIL /
imagehash (:mod:`ardetect.data.content`) into *derived tables* (one row per tuple, per
image, per concept, per class, ...), and those derived columns are then asserted with
GE's built-in expectations.

Tables handed to GE (each a pandas dataframe asset with one batch definition, one
expectation suite and one validation definition, in an ephemeral context):

==================  ==============================================================
``tuples_columns``  the tuple table's column names (schema)
``neg_columns``     the negatives table's column names (schema)
``tuples``          one row per tuple: record columns, box parts, derived flags, the
                    query's hash distance to its training image, its agreement with
                    the exemplars and generated rows, its second detection
``images``          one row per referenced image file (and recorded size): decodes,
                    size, grey-level spread
``image_boxes``     one row per distinct (role, image, box): grey-level spread in the box
``concepts``        one row per concept: splits, training images
``train_images``    one row per training image: splits, concepts, nearest other concept's
                    training image by perceptual hash
``neg_per_tuple``   one row per tuple id of either table: negatives' counts
``classes``         one row per base class: tuples and imbalance ratio
``splits``          one row per split: concept share and its deviation
``objects_columns`` the objects table's column names (when it is given)
``objects``         one row per drawn object: box parts, image size, mask checks
``object_images``   one row per distinct (role, image, box) of the tuples: its image's
                    concept objects, the box's IoU with the mask's box and share inside
                    the mask's convex hull, the object the box covers best
``record_images``   one row per image path of the exemplars and generated tables (when
                    given): rows and concepts holding it
==================  ==============================================================

Expectation families (stable names, see :data:`FAMILIES`): ``schema``,
``box_finite``, ``box_ordered``, ``box_inside_image``, ``box_min_size``,
``image_files``, ``prompt_concept``, ``ids_unique``, ``split_leakage``,
``negatives_own_image``, ``min_negatives``, ``class_balance``, ``split_balance``,
``objects`` (the ``objects`` table: every object drawn in an image, see ``schema.OBJECT_COLUMNS``),
and the content families: ``box_covers_object`` (R_X and R_Q against the mask of the object
they claim, R_Q against a second detection), ``records_agree`` (each tuple against its
exemplars and generated rows and its image's concept object; an image path of one concept),
``image_content`` (no blank image, no flat box) and ``copies`` (near-duplicate training images
of two concepts; queries that copy their own training image are memorisation events, excluded
and counted, and fail the gate only above ``max_copy_share``).

Every expectation first runs with ``result_format="BOOLEAN_ONLY"``; only the failed
ones run again with ``COMPLETE`` to collect their unexpected rows (named through a
``_row`` column of each derived table and its id column, :data:`ROW_NAMES`, which the
Data Docs show too), which halves the cost of a passing run.

Each distinct image file and label map is read once, over one process per core.

Great Expectations is imported inside :func:`validate_tuples` only: the import
takes seconds. Set ``GX_ANALYTICS_ENABLED=False`` (done here if unset).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ardetect.config import SplitConfig, ValidateConfig
from ardetect.data.content import ImageProbe, box_iou, hamming, label_map_claims, nearest_other, probe_image
from ardetect.data.schema import (
    BOX_PARTS,
    EXCLUSION_COLUMNS,
    NEGATIVE_COLUMNS,
    OBJECT_COLUMNS,
    OBJECT_ROLES,
    SPLITS,
    TUPLE_COLUMNS,
)
from ardetect.data.templates import concept_phrase
from ardetect.procs import fork_context, reset_signals, usable_cores
from ardetect.tmpdirs import replaced_atomically, temp_dir_beside

__all__ = [
    "FAMILIES",
    "Check",
    "Failure",
    "ValidationFailed",
    "ValidationResult",
    "assert_valid",
    "build_specs",
    "build_tables",
    "validate_tuples",
]

FAMILIES: tuple[str, ...] = (
    "schema",
    "box_finite",
    "box_ordered",
    "box_inside_image",
    "box_min_size",
    "image_files",
    "prompt_concept",
    "ids_unique",
    "split_leakage",
    "negatives_own_image",
    "min_negatives",
    "class_balance",
    "split_balance",
    "objects",
    "box_covers_object",
    "records_agree",
    "image_content",
    "copies",
)

BOX_COLUMNS = ("query_box", "train_box")
MEMORISATION_COLUMNS = ("tuple_id", "concept_id", "query_image", "train_image", "hash_distance")
MEMORISATION_SHOWN = 50  # rows of the memorisation table in report.md
IMAGE_ROLES = {"query_image": ("query_width", "query_height"), "train_image": ("train_width", "train_height")}
# relative (no leading / or drive), no ".." component, a .png file
IMAGE_PATH_REGEX = r"^(?![/\\])(?![A-Za-z]:)(?!(?:.*[/\\])?\.\.(?:[/\\]|$)).+\.[pP][nN][gG]$"
_ROW = "_row"  # position of a row in its derived table; used to look up example context
# the column that names a failing row of each derived table, beside its position
ROW_NAMES = {"tuples": "tuple_id", "images": "image", "image_boxes": "tuple_id", "concepts": "concept_id",
             "train_images": "train_image", "neg_per_tuple": "tuple_id", "classes": "base_class", "splits": "split",
             "objects": "image", "object_images": "tuple_id", "record_images": "image"}


# --------------------------------------------------------------------------- results


@dataclass
class Check:
    """One expectation as run: what it asserts, on which table and column, and how it went."""

    name: str  # stable, e.g. "box_ordered:tuples:query_box_x1>query_box_x0"
    family: str
    expectation: str  # GE expectation type, e.g. "expect_column_values_to_be_between"
    table: str
    column: str | None
    description: str
    success: bool
    unexpected_count: int = 0
    element_count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    observed: Any = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "name": self.name,
                "family": self.family,
                "expectation": self.expectation,
                "table": self.table,
                "column": self.column,
                "description": self.description,
                "success": self.success,
                "unexpected_count": self.unexpected_count,
                "element_count": self.element_count,
                "examples": self.examples,
                "observed": self.observed,
                "error": self.error,
            }
        )


# A failed expectation is a Check with success False; the name says what callers read.
Failure = Check


@dataclass
class ValidationResult:
    """Outcome of :func:`validate_tuples`.

    ``families`` maps every family in :data:`FAMILIES` to whether all its expectations
    passed; ``failures`` lists the failed expectations with up to ``max_examples``
    example rows each; ``checks`` lists every expectation run.
    """

    success: bool
    families: dict[str, bool]
    failures: list[Failure]
    checks: list[Check] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    runtime_s: float = 0.0
    ge_version: str = ""
    # queries that are near-copies of their own training image: tuple_id, concept_id, query_image,
    # train_image, hash_distance (bits)
    memorisation: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(MEMORISATION_COLUMNS)),
                                       repr=False, compare=False)
    _ge_context: Any = field(default=None, repr=False, compare=False)  # for optional Data Docs

    def exclusions(self) -> pd.DataFrame:
        """The tuples to keep out of training and evaluation (:data:`EXCLUSION_COLUMNS`): every memorisation event."""
        m = self.memorisation
        bits = self.params.get("validate", {}).get("hash_size", 16) ** 2
        return pd.DataFrame(
            {
                "tuple_id": m["tuple_id"].astype(str).to_numpy(),
                "reason": "memorisation",
                "detail": [f"query {q} is a near-copy of its training image {x} (hash distance {d:g} of {bits} bits)"
                           for q, x, d in zip(m["query_image"], m["train_image"], m["hash_distance"])],
            },
            columns=list(EXCLUSION_COLUMNS),
        )

    @property
    def failed_families(self) -> list[str]:
        return [f for f in FAMILIES if not self.families.get(f, True)]

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable summary: totals, per-family success, failures, counts."""
        return _jsonable(
            {
                "success": self.success,
                "tuples": self.counts.get("tuples", 0),
                "negatives": self.counts.get("negatives", 0),
                "images": self.counts.get("images", 0),
                **({"objects": self.counts["objects"]} if "objects" in self.counts else {}),
                "memorisation_events": int(len(self.memorisation)),
                "expectations": len(self.checks),
                "failed_expectations": len(self.failures),
                "families": dict(self.families),
                "failed_families": self.failed_families,
                "failures": [f.to_dict() for f in self.failures],
                "memorisation": self.memorisation.to_dict(orient="records"),
                "checks": [
                    {
                        "name": c.name,
                        "family": c.family,
                        "success": c.success,
                        "unexpected_count": c.unexpected_count,
                        "element_count": c.element_count,
                    }
                    for c in self.checks
                ],
                "counts": self.counts,
                "params": self.params,  # no run time: the summary is the same file for the same data (the report has it)
                "great_expectations": self.ge_version,
            }
        )

    def message(self) -> str:
        """Human-readable listing of the failed expectations with example rows."""
        n = len(self.checks)
        if self.success:
            return f"data validation passed: {n} expectations over {self.counts.get('tuples', 0)} tuples"
        lines = [
            f"data validation FAILED: {len(self.failures)} of {n} expectations failed "
            f"(families: {', '.join(self.failed_families)})"
        ]
        for f in self.failures:
            where = f"{f.table}.{f.column}" if f.column else f.table
            if f.element_count:
                count = f"{f.unexpected_count} of {f.element_count} rows unexpected"
            elif f.examples:
                count = "failed"
            else:
                count = f"observed {_short(f.observed)}"
            lines.append(f"- [{f.family}] {f.name}: {f.description} ({f.expectation} on {where}); {count}")
            if f.error:
                lines.append(f"    error: {f.error}")
            for ex in f.examples:
                lines.append("    " + _format_example(ex))
            if f.unexpected_count > len(f.examples) and f.examples:
                lines.append(f"    ... and {f.unexpected_count - len(f.examples)} more")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The person-readable report (``report.md``)."""
        status = "PASSED" if self.success else "FAILED"
        c = self.counts
        out = [
            "# Tuple data validation",
            "",
            f"**Status: {status}** — {len(self.checks) - len(self.failures)} of {len(self.checks)} "
            f"expectations passed; {c.get('tuples', 0)} tuples, {c.get('negatives', 0)} negatives, "
            f"{c.get('images', 0)} image files checked in {self.runtime_s:.1f} s "
            f"(Great Expectations {self.ge_version}).",
            "",
            "## Families",
            "",
            "| family | result |",
            "|---|---|",
        ]
        out += [f"| {fam} | {'pass' if ok else '**FAIL**'} |" for fam, ok in self.families.items()]
        out += ["", f"Memorisation events (queries that copy their own training image, excluded): {len(self.memorisation)}."]
        if self.failures:
            out += ["", "## Failed expectations", ""]
            for f in self.failures:
                where = f"`{f.table}.{f.column}`" if f.column else f"`{f.table}`"
                out.append(f"### [{f.family}] {f.name}")
                out.append("")
                out.append(f"{f.description} — `{f.expectation}` on {where}: ")
                if f.element_count:
                    out.append(f"{f.unexpected_count} of {f.element_count} rows unexpected.")
                else:
                    out.append(f"observed `{_md(_short(f.observed, 300))}`.")
                if f.error:
                    out.append(f"Error: `{_md(f.error)}`")
                if f.examples:
                    out += ["", *_md_table(f.examples)]
                out.append("")
        m = self.memorisation
        out += ["", "## Memorisation events", ""]
        if len(m):
            out.append(f"{len(m)} generated queries are near-copies of their own training image; "
                       "they are excluded from training and evaluation (`exclusions.parquet`).")
            out += ["", *_md_table(m.head(MEMORISATION_SHOWN).to_dict(orient="records"))]
            if len(m) > MEMORISATION_SHOWN:
                out.append(f"... and {len(m) - MEMORISATION_SHOWN} more (all in `checks.json`)")
        else:
            out.append("None: no generated query is a near-copy of its own training image.")
        out += [
            "",
            "## Every expectation",
            "",
            "| # | family | expectation | table | column | description | result | unexpected |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for i, k in enumerate(self.checks, 1):
            res = "pass" if k.success else "**FAIL**"
            unexp = f"{k.unexpected_count}/{k.element_count}" if k.element_count else _md(_short(k.observed, 60))
            out.append(
                f"| {i} | {k.family} | {k.expectation} | {k.table} | {k.column or ''} | {_md(k.description)} "
                f"| {res} | {unexp} |"
            )
        out += ["", "## Counts", "", "```json", json.dumps(_jsonable(self.counts), indent=2), "```", ""]
        out += ["## Parameters", "", "```json", json.dumps(_jsonable(self.params), indent=2), "```", ""]
        return "\n".join(out)

    def write_report(self, out_dir: str | Path, data_docs: bool = False) -> dict[str, Path]:
        """Write ``report.md`` and ``summary.json`` into ``out_dir``, each atomically.

        With ``data_docs``, GE's HTML Data Docs site (about 4 MB, most of it static
        assets) is built too, into ``out_dir/data_docs/`` (``index.html``), swapped in whole.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "report": _write_text_atomic(out_dir / "report.md", self.markdown()),
            "summary": _write_text_atomic(
                out_dir / "summary.json", json.dumps(self.summary(), indent=2, allow_nan=False) + "\n"
            ),
        }
        if data_docs:
            paths["data_docs"] = self._write_data_docs(out_dir / "data_docs")
        return paths

    def _write_data_docs(self, dest: Path) -> Path:
        if self._ge_context is None:
            raise RuntimeError("no Great Expectations context kept with this result; Data Docs cannot be built")
        site = _docs_dir(self._ge_context)
        self._ge_context.build_data_docs()
        tmp = temp_dir_beside(dest, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            shutil.copytree(site, tmp, dirs_exist_ok=True)
            old = dest.with_name(f".{dest.name}.old")
            if dest.exists():
                os.replace(dest, old)
            os.replace(tmp, dest)
            if old.exists():
                shutil.rmtree(old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
            if site is not None and site.exists() and _is_temp(site):  # GE's own temp folder
                shutil.rmtree(site, ignore_errors=True)
        return dest / "index.html"


class ValidationFailed(RuntimeError):
    """Raised by :func:`assert_valid`; carries the :class:`ValidationResult`."""

    def __init__(self, result: ValidationResult):
        super().__init__(result.message())
        self.result = result


def assert_valid(result: ValidationResult) -> ValidationResult:
    """Raise :class:`ValidationFailed` (message lists failures and example rows) unless all passed."""
    if not result.success:
        raise ValidationFailed(result)
    return result


# --------------------------------------------------------------------------- derived tables


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """``df[name]`` as object values, or all-None when the column is missing."""
    if name in df.columns:
        return pd.Series(df[name].to_numpy(dtype=object), index=df.index)
    return pd.Series([None] * len(df), index=df.index, dtype=object)


def _str_or_none(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return None
    return str(v)


def _num(df: pd.DataFrame, name: str) -> np.ndarray:
    if name not in df.columns:
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _box_array(values: Iterable[Any]) -> tuple[np.ndarray, list[str]]:
    """Boxes as ``[N, 4]`` floats (NaN where missing, malformed or non-finite) and their raw reprs."""
    vals = list(values)
    out = np.full((len(vals), 4), np.nan)
    raw: list[str] = []
    for i, v in enumerate(vals):
        try:
            arr = np.asarray(v, dtype=float).reshape(-1)
        except (TypeError, ValueError):
            raw.append(repr(v))
            continue
        raw.append("[" + ", ".join(f"{x:g}" for x in arr) + "]" if arr.ndim == 1 and arr.size <= 8 else repr(v))
        if arr.shape == (4,):
            out[i] = arr
    out[~np.isfinite(out)] = np.nan
    return out, raw


def _tuples_table(tuples: pd.DataFrame, placeholder: str | None) -> pd.DataFrame:
    """One row per tuple: record columns, box parts and the derived per-row flags."""
    t = tuples.reset_index(drop=True)
    out = pd.DataFrame({_ROW: np.arange(len(t))})
    for name in ("tuple_id", "split", "concept_id", "base_class", "prompt", "concept_phrase", "query_image", "train_image"):
        out[name] = [_str_or_none(v) for v in _col(t, name)]
    for name in ("query_width", "query_height", "train_width", "train_height"):
        out[name] = _num(t, name)
    for box in BOX_COLUMNS:
        arr, raw = _box_array(_col(t, box))
        out[box] = raw
        for i, part in enumerate(BOX_PARTS):
            out[f"{box}_{part}"] = arr[:, i]
        w = arr[:, 2] - arr[:, 0]
        h = arr[:, 3] - arr[:, 1]
        ordered = (w > 0) & (h > 0)  # NaN compares False
        out[f"{box}_min_side"] = np.where(ordered, np.minimum(w, h), np.nan)
        out[f"{box}_area"] = np.where(ordered, w * h, np.nan)

    holds_phrase: list[bool | None] = []
    holds_class: list[bool | None] = []
    has_placeholder: list[bool | None] = []
    matches: list[bool | None] = []
    for prompt, phrase, cls in zip(out["prompt"], out["concept_phrase"], out["base_class"]):
        holds_phrase.append(None if prompt is None or not phrase else phrase in prompt)
        if phrase is None or not cls:
            holds_class.append(None)
            has_placeholder.append(None)
            matches.append(None)
            continue
        pat = re.compile(rf"(?<!\w){re.escape(cls.strip())}(?!\w)", re.IGNORECASE)
        holds_class.append(bool(pat.search(phrase)))
        has_placeholder.append(bool(pat.sub("", phrase, count=1).strip()))
        matches.append(None if placeholder is None else phrase == concept_phrase(placeholder, cls))
    out["prompt_holds_phrase"] = pd.Series(holds_phrase, dtype=object)
    out["phrase_holds_base_class"] = pd.Series(holds_class, dtype=object)
    out["phrase_has_placeholder"] = pd.Series(has_placeholder, dtype=object)
    out["phrase_matches_placeholder"] = pd.Series(matches, dtype=object)
    return out


def _probe_image(path: Path, boxes: list[Any] = (), hash_size: int = 16) -> ImageProbe:
    """Every image file is opened here, once (see :func:`ardetect.data.content.probe_image`)."""
    return probe_image(path, boxes, hash_size)


def _read_label_map(path: Path, claims: list[tuple[int, Any]] = ()):
    """Every label map is read here, once (see :func:`ardetect.data.content.label_map_claims`)."""
    return label_map_claims(path, claims)


def _call(fn, args: tuple) -> Any:
    return fn(*args)


INLINE_BELOW = 256  # files; fewer are read in this process (starting workers would cost more)


def _map_files(fn, items: list[tuple], workers: int | None) -> list[Any]:
    """``[fn(*item) for item in items]``, over ``workers`` processes (default: one per core).

    Decoding and measuring a file is mostly Python and numpy holding the GIL, so threads do not
    run it side by side; forked processes do."""
    n = workers or usable_cores()
    if n <= 1 or len(items) < INLINE_BELOW:
        return [fn(*item) for item in items]
    with ProcessPoolExecutor(max_workers=n, mp_context=fork_context(), initializer=reset_signals) as pool:
        return list(pool.map(partial(_call, fn), items, chunksize=max(1, len(items) // (n * 8))))


def _image_boxes(t: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct (role, image, box) of the tuples: the boxes whose pixels are measured."""
    frames = []
    for role in IMAGE_ROLES:
        box = role.replace("_image", "_box")
        frames.append(pd.DataFrame({"role": role, "image": t[role], "tuple_id": t["tuple_id"], "box": t[box],
                                    **{f"box_{p}": t[f"{box}_{p}"] for p in BOX_PARTS}}))
    rows = pd.concat(frames, ignore_index=True).drop_duplicates(["role", "image", "box"]).reset_index(drop=True)
    return rows


def _images_table(t: pd.DataFrame, negatives: pd.DataFrame, data_root: Path, workers: int | None,
                  hash_size: int = 16) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, ImageProbe]]:
    """(one row per (role, image, recorded size): exists, decodes, actual vs recorded size, pixel spread,
    perceptual hash; one row per (role, image, box) of the tuples: the pixel spread inside the box;
    every probe by path). Each distinct image file is opened once, for all of it."""
    frames = []
    for role, (wcol, hcol) in IMAGE_ROLES.items():
        frames.append(
            pd.DataFrame(
                {
                    "role": role,
                    "image": t[role],
                    "tuple_id": t["tuple_id"],
                    "recorded_width": t[wcol],
                    "recorded_height": t[hcol],
                }
            )
        )
    if "neg_image" in negatives.columns and len(negatives):
        neg = negatives[["neg_image"] + (["tuple_id"] if "tuple_id" in negatives.columns else [])]
        first = neg.drop_duplicates("neg_image")
        frames.append(
            pd.DataFrame(
                {
                    "role": "neg_image",
                    "image": [_str_or_none(v) for v in first["neg_image"]],
                    "tuple_id": [_str_or_none(v) for v in _col(first, "tuple_id")],
                    "recorded_width": np.nan,  # the negatives table records no size
                    "recorded_height": np.nan,
                }
            )
        )
    refs = pd.concat(frames, ignore_index=True)
    refs["image"] = refs["image"].astype(object)
    n_refs = refs.groupby(["role", "image"], dropna=False, sort=False)["tuple_id"].transform("size")
    refs["n_refs"] = n_refs.to_numpy()
    rows = refs.drop_duplicates(["role", "image", "recorded_width", "recorded_height"]).reset_index(drop=True)

    boxes = _image_boxes(t)
    asked: dict[str, list[Any]] = {}
    for img, raw in zip(boxes["image"], zip(*(boxes[f"box_{p}"] for p in BOX_PARTS))):
        if img is not None:
            asked.setdefault(img, []).append(raw)
    paths = [p for p in pd.unique(rows["image"].dropna())]
    root = Path(data_root)
    probed = dict(zip(paths, _map_files(_probe_image, [(root / p, asked.get(p, []), hash_size) for p in paths], workers)))
    missing = ImageProbe(False, None, error="no path recorded")
    info = [probed.get(p, missing) if p is not None else missing for p in rows["image"]]
    rows["exists"] = pd.Series([i.exists for i in info], dtype=object)
    rows["decodes"] = pd.Series([i.decodes for i in info], dtype=object)
    rows["width"] = np.array([i.width for i in info], dtype=float)
    rows["height"] = np.array([i.height for i in info], dtype=float)
    rows["error"] = [i.error for i in info]
    rows["pixel_std"] = np.array([i.pixel_std for i in info], dtype=float)
    rows.insert(0, _ROW, np.arange(len(rows)))

    # the box spreads come back in the order the boxes were asked for, image by image
    cursor: dict[str, int] = {}
    stds = []
    for img in boxes["image"]:
        probe = probed.get(img) if img is not None else None
        j = cursor.get(img, 0)
        cursor[img] = j + 1
        stds.append(probe.box_std[j] if probe is not None and j < len(probe.box_std) else np.nan)
    boxes["box_pixel_std"] = np.array(stds, dtype=float)
    boxes.insert(0, _ROW, np.arange(len(boxes)))
    return rows, boxes, probed


def _tuple_lists(t: pd.DataFrame, key: str, limit: int = 3) -> dict[Any, str]:
    """key -> "split: tuple ids" listing, a few tuples per split, for examples."""
    acc: dict[Any, dict[str, list[str]]] = {}
    for k, s, tid in zip(t[key], t["split"], t["tuple_id"]):
        if k is None:
            continue
        acc.setdefault(k, {}).setdefault(str(s), []).append(str(tid))
    out: dict[Any, str] = {}
    for k, per in acc.items():
        out[k] = "; ".join(
            f"{s}: {', '.join(ids[:limit])}{f' +{len(ids) - limit}' if len(ids) > limit else ''}"
            for s, ids in sorted(per.items())
        )
    return out


def _membership_tables(t: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per concept and per training image: how many splits / images / concepts it spans."""
    tt = t.dropna(subset=["concept_id"])
    concepts = tt.groupby("concept_id", sort=True).agg(
        n_splits=("split", "nunique"),
        n_train_images=("train_image", "nunique"),
        n_base_classes=("base_class", "nunique"),
        splits=("split", lambda s: ", ".join(sorted(set(map(str, s))))),
    )
    tl = _tuple_lists(tt, "concept_id")
    concepts["tuples"] = [tl.get(k, "") for k in concepts.index]
    concepts = concepts.reset_index()
    concepts.insert(0, _ROW, np.arange(len(concepts)))

    ti = t.dropna(subset=["train_image"])
    images = ti.groupby("train_image", sort=True).agg(
        n_splits=("split", "nunique"),
        n_concepts=("concept_id", "nunique"),
        splits=("split", lambda s: ", ".join(sorted(set(map(str, s))))),
        concepts=("concept_id", lambda s: ", ".join(sorted(set(map(str, s))))),
    )
    tl = _tuple_lists(ti, "train_image")
    images["tuples"] = [tl.get(k, "") for k in images.index]
    images = images.reset_index()
    images.insert(0, _ROW, np.arange(len(images)))
    return concepts, images


def _factorize(df: pd.DataFrame, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, uniques) of a column, -1 for missing; fast on categorical and string columns alike."""
    if name not in df.columns:
        return np.full(len(df), -1, dtype=np.int64), np.array([], dtype=object)
    codes, uniques = pd.factorize(df[name], use_na_sentinel=True)
    return codes.astype(np.int64), np.asarray(uniques, dtype=object).astype(str)


def _lookup(codes: np.ndarray, per_unique: np.ndarray) -> np.ndarray:
    """``per_unique[codes]`` with -1 where the code is -1 (missing)."""
    ext = np.append(per_unique, -1)
    return ext[np.where(codes >= 0, codes, len(per_unique))]


def _negatives_table(t: pd.DataFrame, negatives: pd.DataFrame) -> pd.DataFrame:
    """One row per tuple id (of either table): negatives, own-image / own-concept / cross-split counts.

    Vectorised over the negatives table (millions of rows at full size): every
    string column is factorised once and the comparisons run on integer codes.
    """
    nt, t_uni = _factorize(negatives, "tuple_id")
    nc, c_uni = _factorize(negatives, "neg_concept_id")
    ni, i_uni = _factorize(negatives, "neg_image")

    first = t.dropna(subset=["tuple_id"]).drop_duplicates("tuple_id").set_index("tuple_id")
    by_concept = t.dropna(subset=["concept_id"]).drop_duplicates("concept_id").set_index("concept_id")
    concept_split, concept_image = by_concept["split"], by_concept["train_image"]
    image_split = t.dropna(subset=["train_image"]).drop_duplicates("train_image").set_index("train_image")["split"]
    split_code = {s: i for i, s in enumerate(dict.fromkeys([*SPLITS, *map(str, t["split"].dropna())]))}

    # per unique negatives tuple_id: its own image / concept as codes of the negatives' columns, its split
    own_img = pd.Index(i_uni).get_indexer(first["train_image"].reindex(t_uni).to_numpy(dtype=object))
    own_cpt = pd.Index(c_uni).get_indexer(first["concept_id"].reindex(t_uni).to_numpy(dtype=object))
    own_spl = np.array([split_code.get(v, -1) for v in first["split"].reindex(t_uni)], dtype=np.int64)
    neg_spl = np.array([split_code.get(v, -1) for v in concept_split.reindex(c_uni)], dtype=np.int64)
    # the image is what the trainings and the evaluation read: its own split, and whether it is its concept's image
    img_spl = np.array([split_code.get(v, -1) for v in image_split.reindex(i_uni)], dtype=np.int64)
    cpt_img = pd.Index(i_uni).get_indexer(concept_image.reindex(c_uni).to_numpy(dtype=object))
    cpt_known = concept_image.reindex(c_uni).notna().to_numpy()

    own_img_row = _lookup(nt, own_img)
    own_cpt_row = _lookup(nt, own_cpt)
    is_own_image = (ni >= 0) & (ni == own_img_row)
    is_own_concept = (nc >= 0) & (nc == own_cpt_row)
    a, b, a_img = _lookup(nc, neg_spl), _lookup(nt, own_spl), _lookup(ni, img_spl)
    is_cross = (b >= 0) & (((a >= 0) & (a != b)) | ((a_img >= 0) & (a_img != b)))
    # a negative of a known concept whose image is not that concept's training image
    is_other_image = (nc >= 0) & _lookup(nc, cpt_known.astype(np.int64)).astype(bool) & (ni != _lookup(nc, cpt_img))
    key = (nt + 1) * (len(c_uni) + 1) + (nc + 1)
    dup = pd.Series(key).duplicated().to_numpy() if len(key) else np.zeros(0, bool)

    # aggregate per tuple id; missing tuple ids (code -1) land in one extra bin
    slot = np.where(nt >= 0, nt, len(t_uni))
    nbin = len(t_uni) + 1

    def count(mask: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(slot, weights=None if mask is None else mask.astype(np.float64), minlength=nbin)

    agg = pd.DataFrame(
        {
            "n_negatives": count(),
            "n_own_image": count(is_own_image),
            "n_own_concept": count(is_own_concept),
            "n_cross_split": count(is_cross),
            "n_image_not_concept": count(is_other_image),
            "n_duplicate": count(dup),
        },
        index=pd.Index([*t_uni, None], dtype=object),
    )
    if not (nt < 0).any():
        agg = agg.iloc[:-1]
    ids = list(dict.fromkeys([*first.index, *agg.index]))
    out = agg.reindex(pd.Index(ids, dtype=object)).fillna(0.0).astype(np.int64)  # no negatives: 0 of each
    out.index.name = "tuple_id"
    out = out.reset_index()
    in_tuples = set(first.index)
    out["in_tuples"] = pd.Series([k in in_tuples for k in out["tuple_id"]], dtype=object)

    # example context: the offending negatives of each tuple (only where any)
    bad = np.flatnonzero(is_own_image | is_own_concept | is_cross | is_other_image)
    ctx: dict[Any, list[str]] = {}
    for r in bad[:10_000]:
        k = t_uni[nt[r]] if nt[r] >= 0 else None
        lst = ctx.setdefault(k, [])
        if len(lst) < 3:
            cpt = c_uni[nc[r]] if nc[r] >= 0 else None
            img = i_uni[ni[r]] if ni[r] >= 0 else None
            cpt_split = concept_split.get(cpt) if cpt is not None else None
            img_split = image_split.get(img) if img is not None else None
            lst.append(f"{cpt} {img} ({cpt_split})" if img_split in (None, cpt_split) else f"{cpt} ({cpt_split}) {img} ({img_split})")
    out["bad_negatives"] = [", ".join(ctx.get(k, [])) for k in out["tuple_id"]]
    ids = out["tuple_id"].to_numpy(dtype=object)
    out["split"] = [_str_or_none(v) for v in first["split"].reindex(ids).to_numpy(dtype=object)]
    out["train_image"] = [_str_or_none(v) for v in first["train_image"].reindex(ids).to_numpy(dtype=object)]
    out.insert(0, _ROW, np.arange(len(out)))
    return out


def _classes_table(t: pd.DataFrame) -> pd.DataFrame:
    g = t.dropna(subset=["base_class"]).groupby("base_class", sort=True)
    out = pd.DataFrame({"n_tuples": g.size(), "n_concepts": g["concept_id"].nunique()}).reset_index()
    most = out["n_tuples"].max() if len(out) else 0
    out["imbalance"] = (most / out["n_tuples"]).astype(float) if len(out) else pd.Series(dtype=float)
    out["most_frequent"] = int(most)
    out.insert(0, _ROW, np.arange(len(out)))
    return out


def _splits_table(t: pd.DataFrame, split_cfg: SplitConfig) -> pd.DataFrame:
    pairs = t.dropna(subset=["concept_id", "split"]).drop_duplicates(["concept_id", "split"])
    per = pairs.groupby("split").size()
    total = float(per.sum())
    try:  # the shares tuples.split gives this many concepts: at least 2 a split, so a small world's val and test are above theirs
        counts = split_cfg.concept_counts(int(total))
    except ValueError:  # too few to split: the configured fractions (and min_negatives says why)
        counts = None
    rows = []
    for s in SPLITS:
        n = int(per.get(s, 0))
        share = n / total if total else 0.0
        expected = counts[s] / total if counts else float(getattr(split_cfg, s))
        rows.append(
            {
                "split": s,
                "n_concepts": n,
                "n_tuples": int((t["split"] == s).sum()),
                "share": share,
                "expected": expected,
                "deviation": abs(share - expected),
            }
        )
    out = pd.DataFrame(rows)
    out.insert(0, _ROW, np.arange(len(out)))
    return out


def _objects_tables(objects: pd.DataFrame, t: pd.DataFrame, data_root: Path, workers: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per object, one row per distinct (role, image, box) of the tuples): the objects table
    checked against its label maps (every box bounds its visible mask, its area counts it), and each
    tuple box against the concept object of its image (the mask's box, its hull; its concept id).
    Every label map is read once."""
    o = objects.reset_index(drop=True)
    out = pd.DataFrame({_ROW: np.arange(len(o))})
    for name in ("image", "role", "base_class", "concept_id", "mask"):
        out[name] = [_str_or_none(v) for v in _col(o, name)]
    out["object"] = _num(o, "object")
    out["area"] = _num(o, "area")
    arr, raw = _box_array(_col(o, "box"))
    out["box"] = raw
    for i, part in enumerate(BOX_PARTS):
        out[f"box_{part}"] = arr[:, i]
    sizes: dict[str, tuple[float, float]] = {}
    for role, (wcol, hcol) in IMAGE_ROLES.items():
        for img, w, h in zip(t[role], t[wcol], t[hcol]):
            sizes.setdefault(img, (w, h))
    out["width"] = [sizes.get(i, (np.nan, np.nan))[0] for i in out["image"]]
    out["height"] = [sizes.get(i, (np.nan, np.nan))[1] for i in out["image"]]
    out["in_tuples"] = pd.Series([i in sizes for i in out["image"]], dtype=object)
    roles, concept_ids = [_str_or_none(v) for v in _col(o, "role")], [_str_or_none(v) for v in _col(o, "concept_id")]
    out["role_matches_concept_id"] = pd.Series(  # from the lists: a column of str and None reads back None as NaN
        [None if r not in OBJECT_ROLES else (r == "concept") == (c is not None) for r, c in zip(roles, concept_ids)],
        dtype=object,
    )

    # the tuple boxes, each claiming the concept object of its image
    concept = out[out["role"] == "concept"]
    n_concepts = concept.groupby("image").size()
    first = concept.drop_duplicates("image")
    first_of = {i: (m, k, c) for i, m, k, c in zip(first["image"], first["mask"], first["object"], first["concept_id"])}
    imgs = _image_boxes(t)
    parts = imgs[[f"box_{p}" for p in BOX_PARTS]].to_numpy(dtype=float)
    claims: dict[str, list[tuple[int, Any]]] = {}
    claim_of: list[tuple[str, int] | None] = []
    # a box that is missing or not ordered is box_finite's or box_ordered's to report, not measured here
    valid = np.isfinite(parts).all(1) & (parts[:, 2] > parts[:, 0]) & (parts[:, 3] > parts[:, 1])
    for img, box, ok in zip(imgs["image"], parts, valid):
        m, k, _ = first_of.get(img, (None, np.nan, None))
        if ok and m is not None and np.isfinite(k):
            lst = claims.setdefault(m, [])
            claim_of.append((m, len(lst)))
            lst.append((int(k), box))
        else:
            claim_of.append(None)

    masks = [m for m in pd.unique(out["mask"].dropna())]
    root = Path(data_root)
    read = dict(zip(masks, _map_files(_read_label_map, [(root / m, claims.get(m, [])) for m in masks], workers)))
    exists = np.zeros(len(out), dtype=bool)
    got_box, got_area = np.full((len(out), 4), np.nan), np.full(len(out), np.nan)
    for i, (m, k) in enumerate(zip(out["mask"], out["object"])):
        got_map = read.get(m)
        if got_map is None:
            continue
        exists[i] = True
        got = got_map[0].get(int(k)) if np.isfinite(k) else None
        if got is not None:
            got_box[i], got_area[i] = got[0], got[1]
    bounds = (np.abs(got_box - arr) <= 1e-6).all(1)  # NaN (object not in its map, or box missing) compares False
    out["mask_reads"] = pd.Series(exists, dtype=object)
    out["box_bounds_mask"] = pd.Series(np.where(exists, bounds, None), dtype=object)
    out["area_counts_mask"] = pd.Series(np.where(exists, got_area == out["area"].to_numpy(dtype=float), None), dtype=object)

    role_of = dict(zip(zip(out["mask"], out["object"]), zip(out["role"], out["base_class"])))
    ious, hull, covers, mask_box = [], [], [], []
    for c, img in zip(claim_of, imgs["image"]):
        got_map = read.get(c[0]) if c is not None else None
        if got_map is None:
            ious.append(np.nan), hull.append(np.nan), covers.append(None), mask_box.append(None)
            continue
        cl = got_map[1][c[1]]
        ious.append(cl.iou)
        hull.append(cl.in_hull)
        mask_box.append(None if cl.mask_box is None else "[" + ", ".join(f"{v:g}" for v in cl.mask_box) + "]")
        if cl.best_object is None:
            covers.append("no object")
        else:
            role, cls = role_of.get((c[0], float(cl.best_object)), ("?", "?"))
            covers.append(f"object {cl.best_object} ({role} {cls}), IoU {cl.best_iou:.2f}")
    per_image = n_concepts.to_dict()
    imgs["n_concept_objects"] = [int(per_image.get(i, 0)) for i in imgs["image"]]
    distractors = out[out["role"] == "distractor"].groupby("image").size().to_dict()
    imgs["n_distractor_objects"] = [int(distractors.get(i, 0)) for i in imgs["image"]]
    tuple_concept = dict(zip(t["tuple_id"], t["concept_id"]))
    imgs["concept_id"] = [tuple_concept.get(k) for k in imgs["tuple_id"]]
    imgs["object_concept_id"] = [first_of[i][2] if i in first_of else None for i in imgs["image"]]
    imgs["concept_id_matches"] = pd.Series(
        [None if i not in first_of else a == b for i, a, b in zip(imgs["image"], imgs["object_concept_id"], imgs["concept_id"])],
        dtype=object,
    )
    imgs["mask_box"] = mask_box
    imgs["box_iou"] = np.array(ious, dtype=float)
    imgs["box_in_hull"] = np.array(hull, dtype=float)
    imgs["box_covers"] = covers
    imgs = imgs.drop(columns=[f"box_{p}" for p in BOX_PARTS])
    imgs.insert(0, _ROW, np.arange(len(imgs)))
    return out, imgs


def _records_tables(t: pd.DataFrame, exemplars: pd.DataFrame, generated: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the tuples' columns of agreement with their source rows, one row per image path of the two
    source tables). A tuple's training side is looked up in ``exemplars`` by its concept_id, its
    query side in ``generated`` by its query image."""
    ex = exemplars.reset_index(drop=True)
    ge = generated.reset_index(drop=True)
    e = pd.DataFrame({k: [_str_or_none(v) for v in _col(ex, k)] for k in ("concept_id", "image", "base_class")})
    e["width"], e["height"] = _num(ex, "width"), _num(ex, "height")
    e["box"] = _box_array(_col(ex, "box"))[0].tolist()
    g = pd.DataFrame({k: [_str_or_none(v) for v in _col(ge, k)]
                      for k in ("image", "concept_id", "prompt", "concept_phrase", "template", "medium")})
    g["width"], g["height"] = _num(ge, "width"), _num(ge, "height")
    g["box"] = _box_array(_col(ge, "box"))[0].tolist()
    e1 = e.dropna(subset=["concept_id"]).drop_duplicates("concept_id").set_index("concept_id")
    g1 = g.dropna(subset=["image"]).drop_duplicates("image").set_index("image")

    out = pd.DataFrame(index=t.index)
    er = e1.reindex(t["concept_id"].to_numpy(dtype=object))
    gr = g1.reindex(t["query_image"].to_numpy(dtype=object))
    found_e = er["image"].notna().to_numpy()
    found_g = gr["concept_id"].notna().to_numpy()

    def agree(found: np.ndarray, *pairs: tuple[Any, Any]) -> pd.Series:
        """True where every (source, tuple) column pair is equal; None where the source row is missing."""
        same = np.ones(len(found), dtype=bool)
        for a, b in pairs:
            same &= np.asarray(a, dtype=object) == np.asarray(b, dtype=object)
        return pd.Series(np.where(found, same, None), dtype=object)

    def boxes_agree(found: np.ndarray, source: pd.Series, parts: np.ndarray) -> pd.Series:
        src = np.array([np.asarray(v, dtype=float).reshape(4) for v in source], dtype=float).reshape(-1, 4)
        ok = np.isfinite(src).all(1) & np.isfinite(parts).all(1) & (np.abs(np.nan_to_num(src - parts, nan=np.inf)) <= 0.5).all(1)
        return pd.Series(np.where(found, ok, None), dtype=object)

    def fmt_box(b: Any) -> str:
        return "[" + ", ".join(f"{v:g}" for v in b) + "]"

    tb = t[[f"train_box_{p}" for p in BOX_PARTS]].to_numpy(dtype=float)
    qb = t[[f"query_box_{p}" for p in BOX_PARTS]].to_numpy(dtype=float)
    er_box = [b if isinstance(b, list) else [np.nan] * 4 for b in er["box"]]
    gr_box = [b if isinstance(b, list) else [np.nan] * 4 for b in gr["box"]]
    out["exemplar_found"] = pd.Series(found_e, dtype=object)
    out["exemplar_image"] = er["image"].to_numpy(dtype=object)
    out["exemplar_box"] = [fmt_box(b) if f else None for f, b in zip(found_e, er_box)]
    out["train_image_agrees"] = agree(found_e, (er["image"], t["train_image"]))
    out["train_box_agrees"] = boxes_agree(found_e, er_box, tb)
    out["train_size_agrees"] = agree(found_e, (er["width"], t["train_width"]), (er["height"], t["train_height"]))
    out["base_class_agrees"] = agree(found_e, (er["base_class"], t["base_class"]))
    out["generated_found"] = pd.Series(found_g, dtype=object)
    out["generated_concept_id"] = gr["concept_id"].to_numpy(dtype=object)
    out["generated_box"] = [fmt_box(b) if f else None for f, b in zip(found_g, gr_box)]
    out["generated_prompt"] = gr["prompt"].to_numpy(dtype=object)
    out["query_concept_agrees"] = agree(found_g, (gr["concept_id"], t["concept_id"]))
    out["query_box_agrees"] = boxes_agree(found_g, gr_box, qb)
    out["query_size_agrees"] = agree(found_g, (gr["width"], t["query_width"]), (gr["height"], t["query_height"]))
    out["prompt_agrees"] = agree(found_g, (gr["prompt"], t["prompt"]), (gr["concept_phrase"], t["concept_phrase"]))

    # every image path of the two source tables: one row, one concept
    refs = pd.concat([e.assign(table="exemplars")[["image", "concept_id", "table"]],
                      g.assign(table="generated")[["image", "concept_id", "table"]]], ignore_index=True).dropna(subset=["image"])
    per = refs.groupby("image", sort=True).agg(n_rows=("table", "size"), n_concepts=("concept_id", "nunique")).reset_index()
    # which concepts and tables, for the images shared (the examples); the rest hold one row
    shared = refs[refs["image"].isin(set(per.loc[per["n_rows"] > 1, "image"]))].groupby("image")
    names = {img: (", ".join(sorted(set(map(str, g["concept_id"])))), ", ".join(sorted(set(g["table"])))) for img, g in shared}
    one = dict(zip(refs["image"], zip(refs["concept_id"], refs["table"])))
    per["concepts"] = [names[i][0] if i in names else _str_or_none(one[i][0]) for i in per["image"]]
    per["tables"] = [names[i][1] if i in names else one[i][1] for i in per["image"]]
    per.insert(0, _ROW, np.arange(len(per)))
    return out, per


def _detections_columns(t: pd.DataFrame, detections: pd.DataFrame) -> pd.DataFrame:
    """Per tuple: the second detections of its query image and the best IoU of one with R_Q."""
    d = detections.reset_index(drop=True)
    imgs = [_str_or_none(v) for v in _col(d, "image")]
    arr = _box_array(_col(d, "box"))[0]
    score = _num(d, "score")
    by_image: dict[str, list[int]] = {}
    for i, img in enumerate(imgs):
        if img is not None:
            by_image.setdefault(img, []).append(i)
    qb = t[[f"query_box_{p}" for p in BOX_PARTS]].to_numpy(dtype=float)
    best_iou, best_box, n = [], [], []
    for img, box in zip(t["query_image"], qb):
        rows = by_image.get(img, [])
        n.append(len(rows))
        if not np.isfinite(box).all():
            best_iou.append(np.nan), best_box.append(None)
            continue
        if not rows:
            best_iou.append(0.0), best_box.append("no detection")  # nothing found where R_Q claims an object
            continue
        ious = np.nan_to_num(box_iou(np.repeat(box[None], len(rows), 0), arr[rows]), nan=0.0)
        j = max(range(len(rows)), key=lambda k: (ious[k], score[rows[k]]))  # the best overlap, then the surest
        best_iou.append(float(ious[j]))
        best_box.append("[" + ", ".join(f"{v:g}" for v in arr[rows[j]]) + f"] score {score[rows[j]]:.2f}")
    return pd.DataFrame({"n_detections": n, "detection_iou": np.array(best_iou, dtype=float), "best_detection": best_box},
                        index=t.index)


def build_tables(
    tuples: pd.DataFrame,
    negatives: pd.DataFrame,
    data_root: str | Path,
    split_cfg: SplitConfig,
    placeholder: str | None = None,
    workers: int | None = None,
    objects: pd.DataFrame | None = None,
    *,
    exemplars: pd.DataFrame | None = None,
    generated: pd.DataFrame | None = None,
    detections: pd.DataFrame | None = None,
    cfg: ValidateConfig | None = None,
) -> dict[str, pd.DataFrame]:
    """The derived tables GE validates (pure pandas/PIL; no GE import); ``objects`` adds the objects
    tables, ``exemplars`` with ``generated`` the records' agreement, ``detections`` the second detection."""
    cfg = cfg or ValidateConfig()
    t = _tuples_table(tuples, placeholder)
    concepts, train_images = _membership_tables(t)
    images, image_boxes, probed = _images_table(t, negatives, Path(data_root), workers, cfg.hash_size)

    # a box below the least size is box_min_size's to report: its spread says nothing
    w = image_boxes["box_x1"] - image_boxes["box_x0"]
    h = image_boxes["box_y1"] - image_boxes["box_y0"]
    small = ~((np.minimum(w, h) >= cfg.min_box_side) & (w * h >= cfg.min_box_area))
    image_boxes.loc[small.to_numpy(), "box_pixel_std"] = np.nan

    # copies: each query against its own training image; training images against those of other concepts
    qh = [probed[p].phash if p in probed else None for p in t["query_image"]]
    th = [probed[p].phash if p in probed else None for p in t["train_image"]]
    t["hash_distance"] = hamming(qh, th)
    t["hash_bits"] = float(cfg.hash_size**2)
    ti_concept = [c.split(", ")[0] for c in train_images["concepts"]]
    dist, idx = nearest_other([probed[p].phash if p in probed else None for p in train_images["train_image"]],
                              ti_concept, cfg.duplicate_max_distance)
    train_images["nearest_distance"] = dist
    train_images["nearest_image"] = [train_images["train_image"].iloc[j] if j >= 0 else None for j in idx]
    train_images["nearest_concept"] = [ti_concept[j] if j >= 0 else None for j in idx]

    extra = {}
    if objects is not None:
        extra["objects_columns"] = pd.DataFrame({c: pd.Series(dtype=object) for c in objects.columns})
        extra["objects"], extra["object_images"] = _objects_tables(objects, t, Path(data_root), workers)
    if (exemplars is None) != (generated is None):
        raise ValueError("exemplars and generated: give both source tables or neither")
    if exemplars is not None:
        agree, extra["record_images"] = _records_tables(t, exemplars, generated)
        t = pd.concat([t, agree], axis=1)
    if detections is not None:
        t = pd.concat([t, _detections_columns(t, detections)], axis=1)
    return {**extra,
        "tuples_columns": pd.DataFrame({c: pd.Series(dtype=object) for c in tuples.columns}),
        "neg_columns": pd.DataFrame({c: pd.Series(dtype=object) for c in negatives.columns}),
        "tuples": t,
        "images": images,
        "image_boxes": image_boxes,
        "concepts": concepts,
        "train_images": train_images,
        "neg_per_tuple": _negatives_table(t, negatives),
        "classes": _classes_table(t),
        "splits": _splits_table(t, split_cfg),
    }


# --------------------------------------------------------------------------- expectations


@dataclass
class _Spec:
    """An expectation to build: GE class name, kwargs, and how to report it."""

    family: str
    table: str
    kind: str  # GE expectation class name, e.g. "ExpectColumnValuesToBeBetween"
    kwargs: dict[str, Any]
    description: str
    context: tuple[str, ...] = ()  # columns of the table shown beside each example
    key: str = ""  # unique suffix for the name

    @property
    def column(self) -> str | None:
        kw = self.kwargs
        if "column" in kw:
            return kw["column"]
        if "column_A" in kw:
            return f"{kw['column_A']},{kw['column_B']}"
        if "column_list" in kw:
            return ",".join(kw["column_list"])
        return None

    @property
    def name(self) -> str:
        return f"{self.family}:{self.table}:{self.key or self.column or self.kind}"


_T_ID = ("tuple_id",)


DISTRACTOR_SLACK = 2  # images any world may have outside its distractor count (a small world's share moves by whole images)


def _object_specs(add, cfg: ValidateConfig, distractors: tuple[int, int] | None, images: int | None) -> None:
    """The ``objects`` family: the objects table against its record, its label maps and the tuples; with
    ``distractors`` (the world's (min_count, max_count)), how many distractors each of its ``images`` shows: at
    least ``cfg.distractor_count_share`` of them, and all but ``DISTRACTOR_SLACK`` in a small world."""
    octx = ("image", "object", "role", "box")
    add(_Spec("objects", "objects_columns", "ExpectTableColumnsToMatchSet",
              {"column_set": list(OBJECT_COLUMNS), "exact_match": True}, "objects table has exactly the record's columns",
              key="columns"))
    for c in ("image", "role", "base_class", "mask"):
        add(_Spec("objects", "objects", "ExpectColumnValuesToNotBeNull", {"column": c}, f"{c} is present", octx,
                  key=f"{c}_not_null"))
    add(_Spec("objects", "objects", "ExpectColumnValuesToBeInSet", {"column": "role", "value_set": list(OBJECT_ROLES)},
              f"role is one of {', '.join(OBJECT_ROLES)}", octx))
    add(_Spec("objects", "objects", "ExpectColumnValuesToBeInSet", {"column": "role_matches_concept_id", "value_set": [True]},
              "a concept object names its concept_id, a distractor none", (*octx, "concept_id")))
    add(_Spec("objects", "objects", "ExpectColumnValuesToBeBetween", {"column": "object", "min_value": 1},
              "object is a label value >= 1", octx))
    add(_Spec("objects", "objects", "ExpectColumnValuesToBeBetween", {"column": "area", "min_value": 1},
              "a recorded object is visible (area >= 1 pixel)", (*octx, "area")))
    for p in BOX_PARTS:
        add(_Spec("objects", "objects", "ExpectColumnValuesToNotBeNull", {"column": f"box_{p}"},
                  f"box_{p} is a finite number", octx))
    add(_Spec("objects", "objects", "ExpectColumnPairValuesAToBeGreaterThanB",
              {"column_A": "box_x1", "column_B": "box_x0", "or_equal": False, "ignore_row_if": "either_value_is_missing"},
              "object box: x1 > x0", octx))
    add(_Spec("objects", "objects", "ExpectColumnPairValuesAToBeGreaterThanB",
              {"column_A": "box_y1", "column_B": "box_y0", "or_equal": False, "ignore_row_if": "either_value_is_missing"},
              "object box: y1 > y0", octx))
    for p in ("x0", "y0"):
        add(_Spec("objects", "objects", "ExpectColumnValuesToBeBetween", {"column": f"box_{p}", "min_value": 0},
                  f"object box: {p} >= 0", octx))
    add(_Spec("objects", "objects", "ExpectColumnPairValuesAToBeGreaterThanB",
              {"column_A": "width", "column_B": "box_x1", "or_equal": True, "ignore_row_if": "either_value_is_missing"},
              "object box: x1 <= the image's width", (*octx, "width")))
    add(_Spec("objects", "objects", "ExpectColumnPairValuesAToBeGreaterThanB",
              {"column_A": "height", "column_B": "box_y1", "or_equal": True, "ignore_row_if": "either_value_is_missing"},
              "object box: y1 <= the image's height", (*octx, "height")))
    add(_Spec("objects", "objects", "ExpectColumnValuesToBeInSet", {"column": "in_tuples", "value_set": [True]},
              "an object's image is an image of the tuples", octx))
    add(_Spec("objects", "objects", "ExpectColumnValuesToBeInSet", {"column": "mask_reads", "value_set": [True]},
              "the object's label map exists and decodes", (*octx, "mask")))
    add(_Spec("objects", "objects", "ExpectColumnValuesToBeInSet", {"column": "box_bounds_mask", "value_set": [True]},
              "the box bounds the object's visible mask exactly", (*octx, "mask")))
    add(_Spec("objects", "objects", "ExpectColumnValuesToBeInSet", {"column": "area_counts_mask", "value_set": [True]},
              "area is the object's visible pixel count", (*octx, "area", "mask")))
    ictx = ("role", "image", "tuple_id", "box")
    add(_Spec("objects", "object_images", "ExpectColumnValuesToBeBetween",
              {"column": "n_concept_objects", "min_value": 1, "max_value": 1},
              "every tuple image has exactly one concept object", (*ictx, "n_concept_objects")))
    if distractors is not None:  # a few may be covered whole by the concept, or find no free spot
        lo, hi = distractors
        share = float(cfg.distractor_count_share)
        if images:
            share = min(share, max(0.0, 1.0 - DISTRACTOR_SLACK / images))
        add(_Spec("objects", "object_images", "ExpectColumnValuesToBeBetween",
                  {"column": "n_distractor_objects", "min_value": int(lo), "max_value": int(hi), "mostly": share},
                  f"at least {share:.0%} of tuple images show {lo} to {hi} distractors (world.distractors)",
                  (*ictx, "n_distractor_objects")))


def _content_specs(add, cfg: ValidateConfig, objects: bool, records: bool, detections: bool) -> None:
    """The families that look at the pixels and across tables."""
    # box_covers_object: R_X and R_Q against the mask of the object they claim (and a second detection of R_Q)
    if objects:
        bctx = ("role", "image", "tuple_id", "box", "mask_box", "box_covers")
        add(_Spec("box_covers_object", "object_images", "ExpectColumnValuesToBeBetween",
                  {"column": "box_iou", "min_value": float(cfg.box_iou_min)},
                  f"the box has IoU >= {cfg.box_iou_min:g} with the bounding box of its concept object's mask",
                  (*bctx, "box_iou")))
        add(_Spec("box_covers_object", "object_images", "ExpectColumnValuesToBeBetween",
                  {"column": "box_in_hull", "min_value": float(cfg.box_in_hull_min)},
                  f"at least {cfg.box_in_hull_min:g} of the box's area lies inside the convex hull of its object's mask",
                  (*bctx, "box_in_hull")))
    if detections:
        add(_Spec("box_covers_object", "tuples", "ExpectColumnValuesToBeBetween",
                  {"column": "detection_iou", "min_value": float(cfg.detection_iou_min)},
                  f"R_Q has IoU >= {cfg.detection_iou_min:g} with a second detection of the concept in Q",
                  ("tuple_id", "query_image", "query_box", "best_detection", "n_detections", "detection_iou")))
    # records_agree: each tuple against its exemplar and generated rows; image paths against concepts
    if records:
        tctx = ("tuple_id", "concept_id", "train_image", "exemplar_image")
        for col, what in (("exemplar_found", "the tuple's concept_id has an exemplars row"),
                          ("train_image_agrees", "train_image is its concept's exemplar image"),
                          ("train_size_agrees", "train_width/height are the exemplar's"),
                          ("base_class_agrees", "base_class is the exemplar's")):
            add(_Spec("records_agree", "tuples", "ExpectColumnValuesToBeInSet", {"column": col, "value_set": [True]},
                      what, tctx))
        add(_Spec("records_agree", "tuples", "ExpectColumnValuesToBeInSet", {"column": "train_box_agrees", "value_set": [True]},
                  "train_box is the exemplar's box (within 0.5 px)", ("tuple_id", "concept_id", "train_box", "exemplar_box")))
        qctx = ("tuple_id", "concept_id", "query_image", "generated_concept_id")
        add(_Spec("records_agree", "tuples", "ExpectColumnValuesToBeInSet", {"column": "generated_found", "value_set": [True]},
                  "the query image has a generated row", qctx))
        add(_Spec("records_agree", "tuples", "ExpectColumnValuesToBeInSet", {"column": "query_concept_agrees", "value_set": [True]},
                  "the query image was generated for the tuple's concept", qctx))
        add(_Spec("records_agree", "tuples", "ExpectColumnValuesToBeInSet", {"column": "query_box_agrees", "value_set": [True]},
                  "query_box is the generated box (within 0.5 px)", ("tuple_id", "query_image", "query_box", "generated_box")))
        add(_Spec("records_agree", "tuples", "ExpectColumnValuesToBeInSet", {"column": "query_size_agrees", "value_set": [True]},
                  "query_width/height are the generated image's", qctx))
        add(_Spec("records_agree", "tuples", "ExpectColumnValuesToBeInSet", {"column": "prompt_agrees", "value_set": [True]},
                  "prompt and concept_phrase are the generated row's", ("tuple_id", "query_image", "prompt", "generated_prompt")))
        rctx = ("image", "concepts", "tables", "n_rows")
        add(_Spec("records_agree", "record_images", "ExpectColumnValuesToBeBetween", {"column": "n_concepts", "max_value": 1},
                  "an image path of the exemplars and generated tables belongs to one concept", rctx))
        add(_Spec("records_agree", "record_images", "ExpectColumnValuesToBeBetween", {"column": "n_rows", "max_value": 1},
                  "an image path is one row of the exemplars and generated tables", rctx))
    if objects:
        add(_Spec("records_agree", "object_images", "ExpectColumnValuesToBeInSet", {"column": "concept_id_matches", "value_set": [True]},
                  "the image's concept object has the tuple's concept_id",
                  ("role", "image", "tuple_id", "concept_id", "object_concept_id")))
    # image_content: spread of the pixels, of the whole image and inside each box
    add(_Spec("image_content", "images", "ExpectColumnValuesToBeBetween", {"column": "pixel_std", "min_value": float(cfg.min_pixel_std)},
              f"the image is not blank: grey-level std >= {cfg.min_pixel_std:g}", ("tuple_id", "role", "image", "pixel_std")))
    add(_Spec("image_content", "image_boxes", "ExpectColumnValuesToBeBetween",
              {"column": "box_pixel_std", "min_value": float(cfg.min_box_pixel_std)},
              f"the box region is not flat: grey-level std >= {cfg.min_box_pixel_std:g}",
              ("tuple_id", "role", "image", "box", "box_pixel_std")))
    # copies: a query that reproduces its own training image; training images of two concepts alike
    add(_Spec("copies", "tuples", "ExpectColumnValuesToBeBetween",
              {"column": "hash_distance", "min_value": int(cfg.copy_max_distance) + 1, "mostly": 1.0 - float(cfg.max_copy_share)},
              f"at most {cfg.max_copy_share:g} of queries are near-copies of their own training image "
              f"(hash distance <= {cfg.copy_max_distance} bits; each is excluded as a memorisation event)",
              ("tuple_id", "query_image", "train_image", "hash_distance")))
    add(_Spec("copies", "train_images", "ExpectColumnValuesToBeBetween",
              {"column": "nearest_distance", "min_value": int(cfg.duplicate_max_distance) + 1},
              f"no training image is a near-duplicate of another concept's (hash distance <= {cfg.duplicate_max_distance} bits)",
              ("train_image", "concepts", "nearest_image", "nearest_concept", "nearest_distance")))


def build_specs(cfg: ValidateConfig, tuple_ids: Iterable[str] | None = None, placeholder: str | None = None,
                objects: bool = False, records: bool = False, detections: bool = False,
                distractors: tuple[int, int] | None = None, images: int | None = None) -> list[_Spec]:
    """Every expectation, grouped by family (GE-free description of the suites); ``objects``
    adds the ``objects`` family and the box-versus-mask checks, ``records`` the agreement with the
    exemplars and generated tables, ``detections`` R_Q against a second detection (each needs the
    tables ``build_tables`` adds for it); ``distractors`` (a synthetic world's (min_count, max_count), with
    ``objects``) the count of distractors each of the tuples' ``images`` (their number) shows."""
    S: list[_Spec] = []
    add = S.append
    # schema
    add(_Spec("schema", "tuples_columns", "ExpectTableColumnsToMatchSet",
              {"column_set": list(TUPLE_COLUMNS), "exact_match": True}, "tuples table has exactly the record's columns",
              key="columns"))
    add(_Spec("schema", "neg_columns", "ExpectTableColumnsToMatchSet",
              {"column_set": list(NEGATIVE_COLUMNS), "exact_match": True},
              "negatives table has exactly the record's columns", key="columns"))
    add(_Spec("schema", "tuples", "ExpectTableRowCountToBeBetween", {"min_value": 1}, "tuples table is not empty",
              key="rows"))
    for c in ("tuple_id", "split", "concept_id", "base_class", "prompt", "concept_phrase", "query_image", "train_image"):
        add(_Spec("schema", "tuples", "ExpectColumnValuesToNotBeNull", {"column": c}, f"{c} is present", _T_ID,
                  key=f"{c}_not_null"))
    add(_Spec("schema", "tuples", "ExpectColumnValuesToBeInSet", {"column": "split", "value_set": list(SPLITS)},
              f"split is one of {', '.join(SPLITS)}", _T_ID))
    for c in ("query_width", "query_height", "train_width", "train_height"):
        add(_Spec("schema", "tuples", "ExpectColumnValuesToNotBeNull", {"column": c}, f"{c} is recorded", _T_ID,
                  key=f"{c}_not_null"))
        add(_Spec("schema", "tuples", "ExpectColumnValuesToBeBetween", {"column": c, "min_value": 1},
                  f"{c} is a positive size", _T_ID))
    for box in BOX_COLUMNS:
        ctx = ("tuple_id", box)
        x0, y0, x1, y1 = (f"{box}_{p}" for p in BOX_PARTS)
        # box_finite
        for p in (x0, y0, x1, y1):
            add(_Spec("box_finite", "tuples", "ExpectColumnValuesToNotBeNull", {"column": p},
                      f"{p} is a finite number (box is a list of 4 finite floats)", ctx))
        # box_ordered
        add(_Spec("box_ordered", "tuples", "ExpectColumnPairValuesAToBeGreaterThanB",
                  {"column_A": x1, "column_B": x0, "or_equal": False, "ignore_row_if": "either_value_is_missing"},
                  f"{box}: x1 > x0", ctx))
        add(_Spec("box_ordered", "tuples", "ExpectColumnPairValuesAToBeGreaterThanB",
                  {"column_A": y1, "column_B": y0, "or_equal": False, "ignore_row_if": "either_value_is_missing"},
                  f"{box}: y1 > y0", ctx))
        # box_inside_image
        wcol, hcol = IMAGE_ROLES[box.replace("_box", "_image")]
        ictx = ("tuple_id", box, wcol, hcol)
        add(_Spec("box_inside_image", "tuples", "ExpectColumnValuesToBeBetween", {"column": x0, "min_value": 0},
                  f"{box}: x0 >= 0", ictx))
        add(_Spec("box_inside_image", "tuples", "ExpectColumnValuesToBeBetween", {"column": y0, "min_value": 0},
                  f"{box}: y0 >= 0", ictx))
        add(_Spec("box_inside_image", "tuples", "ExpectColumnPairValuesAToBeGreaterThanB",
                  {"column_A": wcol, "column_B": x1, "or_equal": True, "ignore_row_if": "either_value_is_missing"},
                  f"{box}: x1 <= {wcol}", ictx))
        add(_Spec("box_inside_image", "tuples", "ExpectColumnPairValuesAToBeGreaterThanB",
                  {"column_A": hcol, "column_B": y1, "or_equal": True, "ignore_row_if": "either_value_is_missing"},
                  f"{box}: y1 <= {hcol}", ictx))
        # box_min_size
        add(_Spec("box_min_size", "tuples", "ExpectColumnValuesToBeBetween",
                  {"column": f"{box}_min_side", "min_value": float(cfg.min_box_side)},
                  f"{box}: shorter side >= {cfg.min_box_side:g} px", ctx))
        add(_Spec("box_min_size", "tuples", "ExpectColumnValuesToBeBetween",
                  {"column": f"{box}_area", "min_value": float(cfg.min_box_area)},
                  f"{box}: area >= {cfg.min_box_area:g} px^2", ctx))
    # image_files
    ictx = ("tuple_id", "role", "image")
    add(_Spec("image_files", "images", "ExpectColumnValuesToMatchRegex", {"column": "image", "regex": IMAGE_PATH_REGEX},
              "image path is relative to the data root, without '..', and names a .png", ictx, key="image_path"))
    add(_Spec("image_files", "images", "ExpectColumnValuesToBeInSet", {"column": "exists", "value_set": [True]},
              "image file exists under the data root", ictx))
    add(_Spec("image_files", "images", "ExpectColumnValuesToBeInSet", {"column": "decodes", "value_set": [True]},
              "image file decodes", (*ictx, "error")))
    add(_Spec("image_files", "images", "ExpectColumnPairValuesToBeEqual",
              {"column_A": "width", "column_B": "recorded_width", "ignore_row_if": "either_value_is_missing"},
              "image width equals the recorded width", ictx))
    add(_Spec("image_files", "images", "ExpectColumnPairValuesToBeEqual",
              {"column_A": "height", "column_B": "recorded_height", "ignore_row_if": "either_value_is_missing"},
              "image height equals the recorded height", ictx))
    # prompt_concept
    pctx = ("tuple_id", "prompt", "concept_phrase", "base_class")
    add(_Spec("prompt_concept", "tuples", "ExpectColumnValuesToBeInSet",
              {"column": "prompt_holds_phrase", "value_set": [True]}, "prompt holds its concept_phrase", pctx))
    add(_Spec("prompt_concept", "tuples", "ExpectColumnValuesToBeInSet",
              {"column": "phrase_holds_base_class", "value_set": [True]}, "concept_phrase holds its base_class", pctx))
    add(_Spec("prompt_concept", "tuples", "ExpectColumnValuesToBeInSet",
              {"column": "phrase_has_placeholder", "value_set": [True]},
              "concept_phrase holds a placeholder besides the base_class", pctx))
    if placeholder is not None:
        add(_Spec("prompt_concept", "tuples", "ExpectColumnValuesToBeInSet",
                  {"column": "phrase_matches_placeholder", "value_set": [True]},
                  f"concept_phrase equals {placeholder!r} filled with the base_class", pctx))
    # ids_unique
    add(_Spec("ids_unique", "tuples", "ExpectColumnValuesToBeUnique", {"column": "tuple_id"}, "tuple_id is unique",
              ("tuple_id", "query_image")))
    add(_Spec("ids_unique", "tuples", "ExpectColumnValuesToBeUnique", {"column": "query_image"},
              "each tuple has its own query image", ("tuple_id", "query_image")))
    add(_Spec("ids_unique", "concepts", "ExpectColumnValuesToBeBetween", {"column": "n_train_images", "max_value": 1},
              "a concept has one training image", ("concept_id", "tuples")))
    add(_Spec("ids_unique", "train_images", "ExpectColumnValuesToBeBetween", {"column": "n_concepts", "max_value": 1},
              "a training image belongs to one concept", ("train_image", "concepts", "tuples")))
    add(_Spec("ids_unique", "neg_per_tuple", "ExpectColumnValuesToBeInSet", {"column": "in_tuples", "value_set": [True]},
              "every tuple_id of the negatives table is a tuple", ("tuple_id",)))
    add(_Spec("ids_unique", "neg_per_tuple", "ExpectColumnValuesToBeBetween", {"column": "n_duplicate", "max_value": 0},
              "no (tuple_id, neg_concept_id) pair twice in the negatives", ("tuple_id",)))
    add(_Spec("ids_unique", "neg_per_tuple", "ExpectColumnValuesToBeBetween", {"column": "n_image_not_concept", "max_value": 0},
              "a negative's neg_image is its neg_concept_id's training image", ("tuple_id", "bad_negatives")))
    # split_leakage
    add(_Spec("split_leakage", "train_images", "ExpectColumnValuesToBeBetween", {"column": "n_splits", "max_value": 1},
              "a training image is in one split", ("train_image", "splits", "tuples")))
    add(_Spec("split_leakage", "concepts", "ExpectColumnValuesToBeBetween", {"column": "n_splits", "max_value": 1},
              "a concept is in one split", ("concept_id", "splits", "tuples")))
    add(_Spec("split_leakage", "neg_per_tuple", "ExpectColumnValuesToBeBetween", {"column": "n_cross_split", "max_value": 0},
              "a tuple's negatives come from its own split (their concepts and their images)", ("tuple_id", "split", "bad_negatives")))
    # negatives_own_image
    nctx = ("tuple_id", "train_image", "bad_negatives")
    add(_Spec("negatives_own_image", "neg_per_tuple", "ExpectColumnValuesToBeBetween",
              {"column": "n_own_image", "max_value": 0}, "no negative is the tuple's own training image", nctx))
    add(_Spec("negatives_own_image", "neg_per_tuple", "ExpectColumnValuesToBeBetween",
              {"column": "n_own_concept", "max_value": 0}, "no negative is of the tuple's own concept", nctx))
    # min_negatives
    add(_Spec("min_negatives", "neg_per_tuple", "ExpectColumnValuesToBeBetween",
              {"column": "n_negatives", "min_value": int(cfg.min_negatives)},
              f"every tuple has at least {cfg.min_negatives} negatives", ("tuple_id", "split")))
    # class_balance
    add(_Spec("class_balance", "classes", "ExpectColumnValuesToBeBetween",
              {"column": "imbalance", "max_value": float(cfg.class_balance_tolerance)},
              f"most / this class's tuple count <= {cfg.class_balance_tolerance:g}",
              ("base_class", "n_tuples", "most_frequent")))
    # split_balance
    add(_Spec("split_balance", "splits", "ExpectColumnValuesToBeBetween",
              {"column": "deviation", "max_value": float(cfg.split_tolerance)},
              f"|concept share - the share tuples.split gives (its fraction, rounded, at least 2 concepts)| <= {cfg.split_tolerance:g}",
              ("split", "n_concepts", "share", "expected")))
    if objects:
        _object_specs(add, cfg, distractors, images)
    _content_specs(add, cfg, objects, records, detections)
    return S


# --------------------------------------------------------------------------- running GE


def _run_ge(tables: dict[str, pd.DataFrame], specs: list[_Spec], max_examples: int) -> tuple[list[Check], str, Any]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    try:
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    source = context.data_sources.add_pandas("ardetect")
    by_table: dict[str, list[_Spec]] = {}
    for s in specs:
        by_table.setdefault(s.table, []).append(s)

    def validate(table: str, df: pd.DataFrame, tspecs: list[_Spec], suffix: str, fmt: dict[str, Any]) -> dict[int, Any]:
        asset = source.add_dataframe_asset(name=f"{table}{suffix}")
        batch_def = asset.add_batch_definition_whole_dataframe(f"{table}{suffix}_all")
        # built whole, then added once: add_expectation on a stored suite re-serialises it every time
        expectations = [
            getattr(gx.expectations, s.kind)(**s.kwargs, meta={"ardetect_index": i, "family": s.family, "name": s.name})
            for i, s in enumerate(tspecs)
        ]
        suite = context.suites.add(gx.ExpectationSuite(name=f"ardetect_{table}{suffix}", expectations=expectations))
        vdef = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate_{table}{suffix}", data=batch_def, suite=suite)
        )
        res = vdef.run(batch_parameters={"dataframe": df}, result_format=fmt)
        return {int(r.expectation_config.meta["ardetect_index"]): r for r in res.results}

    checks: list[Check] = []
    for table, tspecs in by_table.items():
        df = tables[table]
        # pass 1, every expectation, pass/fail only (about half the cost of COMPLETE)
        quick = validate(table, df, tspecs, "", {"result_format": "BOOLEAN_ONLY"})
        failed = [i for i in range(len(tspecs)) if quick.get(i) is None or not quick[i].success]
        # pass 2, the failed ones again with their unexpected rows
        detail: dict[int, Any] = {}
        if failed:
            fmt: dict[str, Any] = {"result_format": "COMPLETE", "include_unexpected_rows": False}
            if _ROW in df.columns:
                key = ROW_NAMES.get(table)  # names the failing rows in the Data Docs too
                fmt["unexpected_index_column_names"] = [_ROW] + ([key] if key in df.columns else [])
                fmt["return_unexpected_index_query"] = False
            again = validate(table, df, [tspecs[i] for i in failed], "_failed", fmt)
            detail = {failed[j]: r for j, r in again.items()}
        for i, s in enumerate(tspecs):
            if i in detail or i in failed:
                checks.append(_to_check(s, detail.get(i, quick.get(i)), df, max_examples))
            else:
                checks.append(_passed(s, df))
    # the ephemeral context made an (empty) temp folder for its docs site; drop it until asked for docs
    site = _docs_dir(context)
    if site is not None and _is_temp(site):
        try:
            site.rmdir()
        except OSError:
            pass
    return checks, gx.__version__, context


def _is_temp(path: Path) -> bool:
    return Path(path).resolve().parent == Path(tempfile.gettempdir()).resolve()


def _docs_dir(context: Any) -> Path | None:
    try:
        site = context.get_config().data_docs_sites["local_site"]["store_backend"]["base_directory"]
    except (KeyError, TypeError, AttributeError):
        return None
    return Path(site)


_TABLE_LEVEL = ("ExpectTable",)


def _passed(s: _Spec, df: pd.DataFrame) -> Check:
    """A check that passed pass 1 (BOOLEAN_ONLY): counts known without asking GE again."""
    table_level = s.kind.startswith(_TABLE_LEVEL)
    return Check(name=s.name, family=s.family, expectation=_snake(s.kind), table=s.table, column=s.column,
                 description=s.description, success=True, unexpected_count=0,
                 element_count=0 if table_level else len(df),
                 observed=(list(df.columns) if "Columns" in s.kind else len(df)) if table_level else None)


def _to_check(s: _Spec, r: Any, df: pd.DataFrame, max_examples: int) -> Check:
    base = dict(name=s.name, family=s.family, expectation=_snake(s.kind), table=s.table, column=s.column,
                description=s.description)
    if r is None:
        return Check(**base, success=False, error="expectation returned no result")
    info = r.exception_info or {}
    if info.get("raised_exception"):
        return Check(**base, success=False, error=str(info.get("exception_message")))
    result = r.result or {}
    check = Check(**base, success=bool(r.success), unexpected_count=int(result.get("unexpected_count") or 0),
                  element_count=int(result.get("element_count") or 0), observed=result.get("observed_value"))
    details = result.get("details") or {}
    if details and not r.success:
        check.observed = {"observed": result.get("observed_value"), "details": details}
        mismatched = details.get("mismatched") if isinstance(details, dict) else None
        if isinstance(mismatched, dict):  # expect_table_columns_to_match_set
            check.examples = [{f"{k}_columns": v for k, v in mismatched.items()}]
            return check
    if r.success:
        return check
    rows = [d.get(_ROW) for d in (result.get("unexpected_index_list") or []) if isinstance(d, dict)]
    values = result.get("unexpected_list") or []
    cols = [c for c in (s.kwargs.get("column"), s.kwargs.get("column_A"), s.kwargs.get("column_B")) if c]
    examples = []
    for k, row in enumerate(rows[:max_examples]):
        ex: dict[str, Any] = {}
        if row is not None and 0 <= int(row) < len(df):
            rec = df.iloc[int(row)]
            for c in (*s.context, *cols):
                if c in df.columns and c not in ex:
                    ex[c] = rec[c]
        elif k < len(values):
            ex["value"] = values[k]
        examples.append(ex)
    if not examples and values:
        examples = [{"value": v} for v in values[:max_examples]]
    check.examples = examples
    if not check.element_count and check.unexpected_count == 0 and check.observed is None:
        check.observed = {k: v for k, v in result.items() if k != "details"}
    return check


def validate_tuples(
    tuples: pd.DataFrame,
    negatives: pd.DataFrame,
    data_root: str | Path,
    cfg: ValidateConfig,
    split_cfg: SplitConfig,
    *,
    placeholder: str | None = None,
    workers: int | None = None,
    objects: pd.DataFrame | None = None,
    exemplars: pd.DataFrame | None = None,
    generated: pd.DataFrame | None = None,
    detections: pd.DataFrame | None = None,
    distractors: tuple[int, int] | None = None,
) -> ValidationResult:
    """Run every expectation family on the tuple and negatives tables, and on the tables given:
    ``objects`` (every object of their images: the ``objects`` family and the box-versus-mask
    checks), ``exemplars`` with ``generated`` (the source rows each tuple must agree with) and
    ``detections`` (a second detection of each query's concept, :data:`ardetect.data.schema.DETECTION_COLUMNS`: R_Q
    against it). A family whose inputs are not given has no checks and passes. ``distractors``, a synthetic
    world's (min_count, max_count), adds the check that most images (``cfg.distractor_count_share``) show that many.

    Queries that are near-copies of their own training image are memorisation events: listed in
    ``result.memorisation`` and in :meth:`ValidationResult.exclusions`, the tuples the training
    and evaluation stages leave out; the gate fails only when their share exceeds
    ``cfg.max_copy_share``.

    ``data_root`` is the folder the image paths are relative to. ``placeholder`` (e.g.
    ``"V* {}"``) additionally requires every concept_phrase to be that template filled
    with its base class. ``workers`` processes read the image files and label maps (default: one per core;
    small inputs are read in this process). Returns a :class:`ValidationResult`; never raises on bad data (see
    :func:`assert_valid`).
    """
    t0 = time.perf_counter()
    tables = build_tables(tuples, negatives, data_root, split_cfg, placeholder=placeholder, workers=workers, objects=objects,
                          exemplars=exemplars, generated=generated, detections=detections, cfg=cfg)
    specs = build_specs(cfg, placeholder=placeholder, objects=objects is not None, records=exemplars is not None,
                        detections=detections is not None, distractors=distractors,
                        images=len(tables["object_images"]) if "object_images" in tables else None)
    checks, version, context = _run_ge(tables, specs, cfg.max_examples)
    order = {s.name: i for i, s in enumerate(specs)}
    checks.sort(key=lambda c: order.get(c.name, len(order)))  # spec (family) order, not table order
    families = {f: all(c.success for c in checks if c.family == f) for f in FAMILIES}
    failures = [c for c in checks if not c.success]
    t = tables["tuples"]
    copies = t["hash_distance"].to_numpy(dtype=float) <= cfg.copy_max_distance  # NaN (no hash) compares False
    memorisation = t.loc[copies, ["tuple_id", "concept_id", "query_image", "train_image", "hash_distance"]].reset_index(drop=True)
    counts = {
        "tuples": int(len(tuples)),
        "negatives": int(len(negatives)),
        "images": int(tables["images"]["image"].nunique()),
        **({"objects": int(len(objects))} if objects is not None else {}),
        **({"detections": int(len(detections))} if detections is not None else {}),
        "memorisation_events": int(len(memorisation)),
        "concepts": int(t["concept_id"].nunique()),
        "per_split": {str(k): int(v) for k, v in t["split"].value_counts(dropna=False).sort_index().items()},
        "concepts_per_split": {
            str(r["split"]): int(r["n_concepts"]) for _, r in tables["splits"].iterrows()
        },
        "per_class": {str(k): int(v) for k, v in t["base_class"].value_counts(dropna=False).sort_index().items()},
        "negatives_per_tuple": {
            "min": float(tables["neg_per_tuple"]["n_negatives"].min()) if len(tables["neg_per_tuple"]) else 0.0,
            "max": float(tables["neg_per_tuple"]["n_negatives"].max()) if len(tables["neg_per_tuple"]) else 0.0,
        },
    }
    return ValidationResult(
        success=not failures,
        families=families,
        failures=failures,
        checks=checks,
        counts=counts,
        params={"validate": cfg.model_dump(), "split": split_cfg.model_dump(), "placeholder": placeholder,
                "distractors": None if distractors is None else list(distractors), "data_root": str(data_root)},
        runtime_s=time.perf_counter() - t0,
        ge_version=version,
        memorisation=memorisation,
        _ge_context=context,
    )


# --------------------------------------------------------------------------- helpers


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars unwrapped, NaN/inf as strings, tuples as lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _short(v: Any, limit: int = 160) -> str:
    s = json.dumps(_jsonable(v)) if not isinstance(v, str) else v
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _format_example(ex: dict[str, Any]) -> str:
    return " ".join(f"{k}={_short(v, 120)}" for k, v in ex.items())


def _md(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_md(_short(r.get(c, ""), 120)) for c in cols) + " |")
    return out


def _write_text_atomic(path: Path, text: str) -> Path:
    with replaced_atomically(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path
