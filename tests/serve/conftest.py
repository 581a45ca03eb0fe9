"""Fixtures of the service tests: the export tests' tiny trained detector, exported, and an index of its world."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_EXPORT = Path(__file__).resolve().parents[1] / "export"
sys.path.insert(0, str(_EXPORT))
_spec = importlib.util.spec_from_file_location("export_fixtures", _EXPORT / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
trained = _fixtures.trained  # the same session fixture: a nano detector trained a few steps on a 16-concept world


@pytest.fixture(scope="session")
def served(trained, tmp_path_factory):
    """The detector exported (no parity, fp32 only), its world laid out as the pipeline's data, and an index of
    every training image: SimpleNamespace(export, data, index, model, tuples)."""
    from ardetect.export.build import ExportOptions, build_export
    from ardetect.serve import load_model
    from ardetect.serve.index import build_index, pipeline_entries

    tuples, negatives, root, _, p2 = trained
    base = tmp_path_factory.mktemp("serve")
    export = base / "export"
    build_export(p2, export, ExportOptions(identity_weight=5.0, grid=2, top_k=3, fp16=False, int8=False))
    data = base / "data"  # the pipeline's layout: <data>/tuples/tuples.parquet, image paths relative to <data>
    (data / "tuples").mkdir(parents=True)
    tuples.to_parquet(data / "tuples" / "tuples.parquet")
    (data / "img").symlink_to(root / "img")
    model = load_model(export, providers=["CPUExecutionProvider"])
    entries, examples = pipeline_entries(data, "all")
    build_index(model, data, entries, base / "index", examples=examples, chunk=4, source="pipeline:all", progress=False)
    return SimpleNamespace(export=export, data=data, index=base / "index", model=model, tuples=tuples)


@pytest.fixture(scope="session")
def attributor(served):
    from ardetect.serve import Attributor, CandidateIndex

    return Attributor(served.model, CandidateIndex(served.index, served.model.fingerprint), shortlist=5)
