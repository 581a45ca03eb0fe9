"""The record: table layouts shared by every stage.

All tables are parquet; images are PNG files beside them. Image paths are stored
relative to the data root (``data/``), so a data folder can be moved whole.
Boxes at rest are absolute pixel ``xyxy`` floats, stored as a list of 4 floats.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ardetect.tmpdirs import replaced_atomically

BOX_PARTS = ("x0", "y0", "x1", "y1")

EXEMPLAR_COLUMNS: dict[str, str] = {
    "concept_id": "str",  # unique per exemplar identity, e.g. "c00012"
    "base_class": "str",  # real word, e.g. "cat"
    "group": "str",  # template group (LVIS-type table 6), e.g. "living_creatures"
    "image": "str",  # path relative to the data root
    "mask": "str",  # path of the concept mask PNG (L mode, 255 inside)
    "width": "int",
    "height": "int",
    "box": "box",  # concept box, xyxy pixels
    "identity": "str",  # JSON of the identity parameters (synthetic) or source annotation (real)
    "source": "str",  # "synthetic", "coco", "lvis"
    "seed": "int",
}

GENERATED_COLUMNS: dict[str, str] = {
    "query_id": "str",
    "concept_id": "str",
    "prompt": "str",  # the filled prompt, holding the placeholder phrase, e.g. "... V* cat ..."
    "concept_phrase": "str",  # e.g. "V* cat"
    "template": "str",  # the template with "{}" for the concept
    "medium": "str",  # "photo", "oil painting", "charcoal sketch", ...
    "scene": "str",  # the scene the context words chose
    "image": "str",
    "width": "int",
    "height": "int",
    "box": "box",  # generated concept box, xyxy pixels
    "backend": "str",  # "synthetic" or "break_a_scene"
    "seed": "int",
}

OBJECT_COLUMNS: dict[str, str] = {
    # every object drawn in an exemplar or generated image (objects.parquet beside each image table)
    "image": "str",  # path relative to the data root, as in the image's own table
    "object": "int",  # the object's value in its label map, 1..n in drawing order
    "role": "str",  # "concept" (the image's concept instance) or "distractor"
    "base_class": "str",
    "concept_id": "str",  # the concept's id when role is "concept", else null
    "box": "box",  # box of its visible mask, xyxy pixels
    "mask": "str",  # path of the image's label map PNG (L mode): the object's mask is where it equals ``object``
    "area": "int",  # visible pixels
}
OBJECT_ROLES = ("concept", "distractor")

TUPLE_COLUMNS: dict[str, str] = {
    "tuple_id": "str",
    "split": "str",  # train / val / test, by concept
    "concept_id": "str",
    "base_class": "str",
    "group": "str",
    "prompt": "str",
    "concept_phrase": "str",
    "template": "str",
    "medium": "str",
    "query_image": "str",
    "query_box": "box",
    "query_width": "int",
    "query_height": "int",
    "train_image": "str",
    "train_box": "box",
    "train_width": "int",
    "train_height": "int",
    "generator": "str",
    "gen_seed": "int",
}

NEGATIVE_COLUMNS: dict[str, str] = {
    "tuple_id": "str",
    "neg_concept_id": "str",
    "neg_image": "str",
}

DETECTION_COLUMNS: dict[str, str] = {
    # a second, independent detection of each tuple's concept in its query image (the real path's
    # GroundingDINO run on the base class); the quality gate checks R_Q against it
    "image": "str",  # query image path relative to the data root
    "phrase": "str",  # the text the detector was given
    "box": "box",  # xyxy pixels
    "score": "float",
}

EXCLUSION_COLUMNS: dict[str, str] = {
    # tuples the quality gate keeps out of training and evaluation (data/validation/exclusions.parquet)
    "tuple_id": "str",
    "reason": "str",  # e.g. "memorisation": the query is a near-copy of its own training image
    "detail": "str",
}

SPLITS = ("train", "val", "test")


class SchemaError(ValueError):
    """A table does not have the columns the record defines."""


def check_columns(df: pd.DataFrame, columns: dict[str, str], table: str) -> None:
    """Raise :class:`SchemaError` naming missing or unexpected columns."""
    missing = [c for c in columns if c not in df.columns]
    extra = [c for c in df.columns if c not in columns]
    if missing or extra:
        raise SchemaError(f"table {table!r}: missing columns {missing}, unexpected columns {extra}")


def expand_boxes(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Return ``df`` with ``column`` (list of 4) split into ``<column>_x0 .. _y1`` float columns."""
    out = df.copy()
    values = out[column].tolist()
    for i, part in enumerate(BOX_PARTS):
        out[f"{column}_{part}"] = [
            float(v[i]) if v is not None and len(v) == 4 else float("nan") for v in values
        ]
    return out


def write_parquet_atomic(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` to ``path`` through a temp file in the same folder, then rename."""
    path = Path(path)
    with replaced_atomically(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def read_table(path: str | Path, columns: dict[str, str], table: str) -> pd.DataFrame:
    """Read a parquet table and check its columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table {table!r} not found at {path}; run the stage that writes it first")
    df = pd.read_parquet(path)
    check_columns(df, columns, table)
    return df


def drop_excluded(tuples: pd.DataFrame, exclusions_path: str | Path) -> pd.DataFrame:
    """``tuples`` without the rows the quality gate excluded (``exclusions.parquet``, see :data:`EXCLUSION_COLUMNS`).

    The file is required: it is written by the ``validate`` stage, which every training and
    evaluation stage follows.
    """
    excluded = read_table(exclusions_path, EXCLUSION_COLUMNS, "exclusions")
    if excluded.empty:
        return tuples
    keep = ~tuples["tuple_id"].astype(str).isin(set(excluded["tuple_id"].astype(str)))
    return tuples[keep].reset_index(drop=True)
