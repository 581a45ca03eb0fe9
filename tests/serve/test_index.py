"""The candidate index: the shortlist of every image is the brute-force ranking, the build resumes after a
kill and refuses another model, and the served model comes from a folder or the registry, on the CPU here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ardetect import tracking
from ardetect.images import open_image
from ardetect.serve import CandidateIndex, IndexMismatch, build_index
from ardetect.serve.index import folder_entries, pipeline_entries

REPO = Path(__file__).resolve().parents[2]


def query_of(served, n: int = 0):
    t = served.tuples[served.tuples["split"] == "test"].iloc[n]
    return open_image(served.data / t["query_image"]), [float(v) for v in t["query_box"]], t["prompt"], t["concept_phrase"], t


def test_shortlist_of_every_image_is_the_brute_force_ranking(served, attributor):
    from ardetect.export.runtime import prepare_image

    index = attributor.index
    img, box, prompt, phrase, t = query_of(served)
    got = attributor.attribute(img, box, prompt, phrase, top_k=len(index), shortlist=len(index))
    assert got.shortlist is None and got.scored == len(index) == 16
    # brute force, independently of the index: every training image decoded, encoded and scored at once
    det = served.model.detector
    paths = [served.data / p for p in index.table["path"]]
    prepared = [prepare_image(p, det.size) for p in paths]
    query = det.encode_query(served.data / t["query_image"], box, prompt, phrase)
    out = det.score(det.encode_images(np.stack([a for a, _ in prepared])), query, np.array([s for _, s in prepared]), chunk=8)
    order = np.argsort(-out["scores"], kind="stable")
    assert [r["id"] for r in got.results] == [index.ids[i] for i in order]
    np.testing.assert_allclose([r["score"] for r in got.results], out["scores"][order], rtol=0, atol=1e-6)
    np.testing.assert_allclose([r["box"] for r in got.results], out["boxes"][order], atol=1e-3)
    # a larger N than the index is the same; an explicit candidate list ranks exactly those, in the same order
    again = attributor.attribute(img, box, prompt, phrase, top_k=5, shortlist=10_000)
    assert [r["id"] for r in again.results] == [r["id"] for r in got.results[:5]]
    subset = [index.ids[i] for i in (3, 0, 7)]
    part = attributor.attribute(img, box, prompt, phrase, top_k=10, candidates=subset)
    assert part.scored == 3 and sorted(r["id"] for r in part.results) == sorted(subset)
    assert [r["id"] for r in part.results] == [r["id"] for r in got.results if r["id"] in subset]


def test_shortlist_takes_the_nearest_embeddings(served, attributor):
    index = attributor.index
    img, box, prompt, phrase, _ = query_of(served, 1)
    _, emb = attributor.encode(img, box, prompt, phrase)
    sims = index.embeddings @ emb[0]
    nearest = set(np.argsort(-sims, kind="stable")[:4].tolist())
    assert set(index.shortlist(emb, 4).tolist()) == nearest
    got = attributor.attribute(img, box, prompt, phrase, top_k=10, shortlist=4)
    assert got.shortlist == 4 and got.scored == 4 and len(got.results) == 4
    assert {index.position[r["id"]] for r in got.results} == nearest
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)


def test_index_records_the_pipeline_data(served, attributor):
    index = attributor.index
    meta = json.loads((served.index / "index.json").read_text())
    assert meta["count"] == 16 and meta["source"] == "pipeline:all" and meta["model_fingerprint"] == served.model.fingerprint
    first = served.tuples.drop_duplicates("train_image").sort_values("train_image").iloc[0]
    k = index.position[Path(first["train_image"]).stem]
    info = index.info(k)
    assert info["concept_id"] == first["concept_id"] and info["concept_box"] == [float(v) for v in first["train_box"]]
    assert (info["width"], info["height"]) == (64, 64)
    assert index.examples is not None and len(index.examples) == len(served.tuples)
    assert list(index.examples["split"].iloc[:12]) == ["test"] * 12  # held-out queries first
    test_only, _ = pipeline_entries(served.data, "test")
    test_images = set(served.tuples.loc[served.tuples["split"] == "test", "train_image"])
    assert len(test_only) == len(test_images) == 6 and {e.path for e in test_only} == test_images
    with pytest.raises(ValueError, match="split='tset'"):
        pipeline_entries(served.data, "tset")


def test_index_refuses_another_model(served, tmp_path):
    with pytest.raises(IndexMismatch, match="built with another model"):
        CandidateIndex(served.index, fingerprint="0" * 64 + ":64")
    # a partial build of one model is not resumed with another
    entries = folder_entries(served.data / "img")[:6]
    real = served.model.detector.encode_images
    calls = []

    def stop_after_one(images):
        calls.append(len(images))
        if len(calls) > 1:
            raise KeyboardInterrupt  # as a kill would, between two chunks
        return real(images)

    det = SimpleNamespace(encode_images=stop_after_one, size=served.model.detector.size)
    with pytest.raises(KeyboardInterrupt):
        build_index(SimpleNamespace(detector=det, fingerprint=served.model.fingerprint), served.data / "img", entries, tmp_path / "idx",
                    chunk=2, progress=False)
    other = SimpleNamespace(detector=served.model.detector, fingerprint="f" * 64 + ":64")
    # a build another process is writing is refused, naming it: not even --fresh removes its chunks
    from ardetect.serve.index import IndexBusy
    from ardetect.tmpdirs import hold_lock

    held = hold_lock(tmp_path / ".idx.building" / ".lock", "ard index build")
    with pytest.raises(IndexBusy, match=rf"--out {tmp_path / 'idx'}: another index build is writing it \(ard index build, PID {os.getpid()}, "):
        build_index(other, served.data / "img", entries, tmp_path / "idx", chunk=2, progress=False, fresh=True)
    held.close()
    assert len(list((tmp_path / ".idx.building").glob("chunk-*.npz"))) == 1
    with pytest.raises(IndexMismatch, match="partial index build of another model"):
        build_index(other, served.data / "img", entries, tmp_path / "idx", chunk=2, progress=False)
    assert not (tmp_path / "idx").exists()
    done = build_index(other, served.data / "img", entries, tmp_path / "idx", chunk=2, progress=False, fresh=True)
    assert done["count"] == 6 and not (tmp_path / ".idx.building").exists()


def test_unreadable_files_are_passed_over_listed_and_the_rest_indexed_as_without_them(served, tmp_path):
    """A folder of a user's images can hold a truncated copy or a file that is not an image: the build used to fail
    at it ("not an image file that PIL can read"), without naming it, after encoding everything before it."""
    import shutil

    from ardetect.serve import IndexUnusable

    good = sorted((served.data / "img").glob("*.png"))[:5]
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for f in good:
        shutil.copy(f, folder / f.name)
    (folder / "sub" / "half.png").write_bytes(good[0].read_bytes()[: good[0].stat().st_size // 2])  # a truncated copy
    (folder / "notes.jpg").write_text("not an image")
    model = served.model
    meta = build_index(model, folder, folder_entries(folder), tmp_path / "idx", chunk=2, progress=False)
    assert meta["count"] == 5 and meta["skipped"] == 2
    listed = json.loads((tmp_path / "idx" / "skipped.json").read_text())
    assert [r["path"] for r in listed] == ["notes.jpg", "sub/half.png"]
    assert "not an image file" in listed[0]["reason"] and "truncated" in listed[1]["reason"]
    clean = tmp_path / "clean"
    clean.mkdir()
    for f in good:
        shutil.copy(f, clean / f.name)
    build_index(model, clean, folder_entries(clean), tmp_path / "idx-clean", chunk=2, progress=False)
    got, want = CandidateIndex(tmp_path / "idx"), CandidateIndex(tmp_path / "idx-clean")
    assert got.ids == want.ids == [f.stem for f in good]
    np.testing.assert_array_equal(got.embeddings, want.embeddings)
    for f in good[1:]:
        (folder / f.name).unlink()
    shutil.copy(folder / "sub" / "half.png", folder / good[0].name)
    with pytest.raises(IndexUnusable, match=r"none of the 3 images could be read; the first: notes.jpg: not an image file"):
        build_index(model, folder, folder_entries(folder), tmp_path / "idx2", chunk=2, progress=False)


@pytest.mark.slow
def test_index_build_resumes_after_a_kill(served, tmp_path):
    """A build killed with SIGKILL mid-way resumes from its chunks and ends with the arrays of an uninterrupted build."""
    script = tmp_path / "slow_build.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(REPO / 'src')!r})
from ardetect.serve import load_model
from ardetect.serve.index import build_index, pipeline_entries
model = load_model({str(served.export)!r})
real = model.detector.encode_images
def slow(images):
    time.sleep(0.4)
    return real(images)
model.detector.encode_images = slow
entries, examples = pipeline_entries({str(served.data)!r}, "all")
build_index(model, {str(served.data)!r}, entries, {str(tmp_path / 'idx')!r}, examples=examples, chunk=1, progress=False)
""")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    work = tmp_path / ".idx.building"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("chunk-*.npz"))) < 4:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    chunks = sorted(work.glob("chunk-*.npz"))
    assert 4 <= len(chunks) < 16 and not (tmp_path / "idx").exists(), proc.stdout.read().decode()[-2000:]
    for c in chunks:  # every chunk on disk is whole (temp file, then rename)
        assert np.load(c)["features"].shape[0] == 1
    # resume: only the missing chunks are encoded
    from ardetect.serve import load_model

    model = load_model(served.export)
    real = model.detector.encode_images
    encoded = []
    model.detector.encode_images = lambda images: encoded.append(len(images)) or real(images)
    entries, examples = pipeline_entries(served.data, "all")
    build_index(model, served.data, entries, tmp_path / "idx", examples=examples, chunk=1, progress=False)
    assert len(encoded) == 16 - len(chunks)
    resumed, whole = CandidateIndex(tmp_path / "idx"), CandidateIndex(served.index)
    assert resumed.ids == whole.ids
    for name in ("features", "region_map", "embeddings"):
        np.testing.assert_allclose(np.asarray(getattr(resumed, name)), np.asarray(getattr(whole, name)), atol=1e-5)


def test_providers_fall_back_to_the_cpu(served, monkeypatch):
    import onnxruntime as ort
    import torch

    from ardetect.export.onnx_export import ExportError
    from ardetect.export.runtime import choose_providers
    from ardetect.serve import load_model

    listed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)  # onnxruntime-gpu lists them on any machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ExportError, match="none is available"):
        choose_providers(["CUDAExecutionProvider"])
    model = load_model(served.export)  # default preference: TensorRT, CUDA, CPU, the first usable
    assert set(model.providers.values()) == {"CPUExecutionProvider"}
    assert set(model.providers) == {"image_encoder", "query_encoder", "scorer"}


@pytest.mark.slow
def test_model_from_the_registry(served, tmp_path, monkeypatch):
    import mlflow

    from ardetect.export.onnx_export import ExportError
    from ardetect.export.registry import log_and_register
    from ardetect.serve import ModelNotFound, load_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.use_experiment(uri, "serve-test")
    with mlflow.start_run():
        reg = log_and_register(served.export, uri, {"test_recall_at_10": 0.5})
    downloads = []
    real = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **kw: downloads.append(kw) or real(**kw))
    cache = tmp_path / "cache"
    model = load_model("models:/ardetect-detector@champion", tracking_uri=uri, cache=cache)
    assert (model.name, model.version, model.alias) == ("ardetect-detector", reg.version, "champion")
    assert model.fingerprint == served.model.fingerprint  # the same graphs: the index built from the folder fits
    CandidateIndex(served.index, fingerprint=model.fingerprint)
    assert model.folder.is_relative_to(cache) and len(downloads) == 1

    # a second start opens the cached copy: no download, no second folder, no temporary one left
    again = load_model(f"models:/ardetect-detector/{reg.version}", tracking_uri=uri, cache=cache)
    assert again.version == reg.version and again.folder == model.folder and len(downloads) == 1
    assert [p.name for p in cache.iterdir()] == [model.folder.relative_to(cache).parts[0]]

    # a cached copy altered since is fetched again, whole
    graph = model.folder / "image_encoder.onnx"
    graph.write_bytes(graph.read_bytes()[:-10])
    healed = load_model("models:/ardetect-detector@champion", tracking_uri=uri, cache=cache)
    assert len(downloads) == 2 and healed.fingerprint == served.model.fingerprint

    # the default cache is ARD_MODEL_CACHE's folder
    monkeypatch.setenv("ARD_MODEL_CACHE", str(tmp_path / "env-cache"))
    assert load_model("models:/ardetect-detector@champion", tracking_uri=uri).folder.is_relative_to(tmp_path / "env-cache")

    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match=r"model cache .*file/cache: cannot write there.*ARD_MODEL_CACHE"):
        load_model("models:/ardetect-detector@champion", tracking_uri=uri, cache=tmp_path / "file" / "cache")
    with pytest.raises(ModelNotFound, match="no alias 'staging'"):
        load_model("models:/ardetect-detector@staging", tracking_uri=uri)
    with pytest.raises(ModelNotFound, match="no such folder"):
        load_model(tmp_path / "nowhere")


def test_model_cache_keeps_the_last_used_versions(tmp_path):
    """The cache keeps the 3 versions used last and removes killed downloads' temp folders, and nothing else:
    ARD_MODEL_CACHE may name a folder that holds other things (the pruning used to remove every folder in it but
    the 3 newest, whatever they were)."""
    from ardetect.serve.loader import CACHE_MARK, _prune

    now = time.time()
    names = ["m-v1-a", "m-v2-b", "m-v3-c", "m-v4-d", ".m-v5-e.tmp-x", ".m-v6-f.tmp-y",
             "photos", "old-v1-x", ".config.tmp-z", "linked"]
    for i, name in enumerate(names):
        if name == "linked":
            (tmp_path / name).symlink_to(tmp_path / "photos")
            continue
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
        if name.startswith("m-v"):
            (tmp_path / name / CACHE_MARK).write_text("")
        age = 2 * 86400 if name in (".m-v5-e.tmp-x", ".config.tmp-z") else 100 * (20 - i)  # v1 the oldest use
        os.utime(tmp_path / name, (now - age, now - age))
    _prune(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".config.tmp-z", ".m-v6-f.tmp-y", "linked", "m-v2-b", "m-v3-c",
                                                          "m-v4-d", "old-v1-x", "photos"]
    assert (tmp_path / "photos" / "f").read_text() == "photos"


@pytest.mark.slow
def test_service_ranks_as_the_evaluation_ranks(served):
    """Each test query against an index of the test split's training images, every image scored: the score of
    its own training image and its rank are the evaluation harness's (``OnnxARDMethod`` through
    ``evaluate_method``, the code behind the ``ARD`` row's figures)."""
    from ardetect.evaluation.harness import evaluate_method
    from ardetect.evaluation.metrics import rank_of_positive
    from ardetect.export.runtime import OnnxARDMethod
    from ardetect.serve import Attributor

    from trained_pair import negatives_of

    tuples = served.tuples
    test = tuples[tuples["split"] == "test"]
    entries, _ = pipeline_entries(served.data, "test")
    folder = served.index.parent / "index_test"
    build_index(served.model, served.data, entries, folder, chunk=4, progress=False)
    att = Attributor(served.model, CandidateIndex(folder, served.model.fingerprint), shortlist=len(entries))
    ev = evaluate_method(OnnxARDMethod(served.model.detector, served.data), test, negatives_of(tuples), progress=False).per_query
    ev = ev.set_index("tuple_id")
    for _, q in test.iterrows():
        got = att.attribute(open_image(served.data / q["query_image"]), [float(v) for v in q["query_box"]], q["prompt"],
                            q["concept_phrase"], top_k=len(entries))
        scores = {r["id"]: r["score"] for r in got.results}
        own = scores.pop(Path(q["train_image"]).stem)
        assert abs(own - ev.loc[q["tuple_id"], "score"]) < 1e-5
        assert rank_of_positive(own, list(scores.values())) == ev.loc[q["tuple_id"], "rank"]


def test_a_folder_of_linked_folders_is_walked_each_real_folder_once(tmp_path):
    """`ard index build --images` over a data set put together from links: a linked folder's images are indexed (the
    walk skipped them before, without a word), while a link back up the tree and a second link to one folder neither
    loop nor index an image twice."""
    from PIL import Image

    elsewhere = tmp_path / "elsewhere" / "coco"
    elsewhere.mkdir(parents=True)
    folder = tmp_path / "images"
    (folder / "own").mkdir(parents=True)
    for path in (folder / "own" / "a.png", elsewhere / "b.png", elsewhere / "c.jpg"):
        Image.new("RGB", (8, 8), "red").save(path)
    (elsewhere / "notes.txt").write_text("not an image")
    (folder / "coco").symlink_to(elsewhere)
    (folder / "coco again").symlink_to(elsewhere)  # the same folder twice
    (folder / "own" / "up").symlink_to(folder)  # a loop
    (folder / "gone").symlink_to(tmp_path / "missing")  # a dangling link: nothing to index, no error
    (folder / "d.png").symlink_to(elsewhere / "b.png")  # a linked file is an image file like any other
    entries = folder_entries(folder)
    assert [(e.id, e.path) for e in entries] == [("coco/b", "coco/b.png"), ("coco/c", "coco/c.jpg"), ("d", "d.png"),
                                                 ("own/a", "own/a.png")]
    assert all((folder / e.path).is_file() for e in entries)


def test_the_index_never_replaces_a_folder_that_is_not_an_index(served, tmp_path):
    """The finished index replaces its folder whole: `ard index build --out ~/work` deleted what ~/work held (tried:
    a thesis.txt there was gone). A folder holding anything but an index, or a file, is refused before any encoding;
    an empty folder and an index's own folder are written."""
    from ardetect.serve import IndexUnusable

    images = served.data / "img"
    entries = folder_entries(images)[:2]
    mine = tmp_path / "work"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    with pytest.raises(IndexUnusable, match=r"--out .*work holds 1 entries that are not an index \(the first: thesis.txt\)"):
        build_index(served.model, images, entries, mine, chunk=2, progress=False)
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"] and not (tmp_path / ".work.building").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(IndexUnusable, match="a file, not a folder for the index"):
        build_index(served.model, images, entries, tmp_path / "afile", chunk=2, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_index(served.model, images, entries, empty, chunk=2, progress=False)["count"] == 2
    assert build_index(served.model, images, entries[:1], empty, chunk=2, progress=False)["count"] == 1  # an index's own
