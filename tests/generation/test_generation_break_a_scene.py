"""Generated images per real exemplar: the record, drop reasons, resuming, and a killed run rerun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ardetect import tracking
from ardetect.data.schema import GENERATED_COLUMNS, OBJECT_COLUMNS
from ardetect.generation.break_a_scene import DONE, jobs_from_table, work_root
from ardetect.generation.real import generate_real
from real_helpers import gen_config


def test_generated_record_and_resume(tiny_models, sample_coco, exemplar_root):
    root, ex = exemplar_root
    cfg = gen_config(tiny_models, sample_coco)
    res = generate_real(cfg, ex, root / "generated", root)
    t, o = res.table, res.objects
    assert list(t.columns) == list(GENERATED_COLUMNS) and list(o.columns) == list(OBJECT_COLUMNS)
    assert len(t) + len(res.drops) == 4 and len(t) >= 1
    assert set(t["backend"]) == {"break_a_scene"} and t["seed"].is_unique and t["query_id"].is_unique
    for r in t.itertuples(index=False):
        base = ex.set_index("concept_id").at[r.concept_id, "base_class"]
        assert f"V* {base}" in r.prompt and r.concept_phrase == f"V* {base}" and r.template.replace("{}", "") in r.prompt.replace(f"V* {base}", "")
        with Image.open(root / r.image) as im:
            assert im.size == (r.width, r.height) == (32, 32)
        concept = o[(o["image"] == r.image) & (o["role"] == "concept")]
        assert len(concept) == 1 and list(concept.iloc[0]["box"]) == list(r.box)
        labels = np.asarray(Image.open(root / concept.iloc[0]["mask"]))
        ys, xs = np.nonzero(labels == 1)
        assert list(r.box) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert all(not s["resumed"] for s in res.summaries)
    for base in ex["base_class"]:  # prior images: sampled once per class, kept for the class's other exemplars
        pri = work_root(cfg, root) / "priors" / base.replace(" ", "_")
        assert (pri / DONE).is_file() and len(list(pri.glob("*.png"))) == 1
    assert {"load", "prior", "customize_ti", "customize_joint", "sample", "detect"} <= set(res.summaries[0]["seconds"])
    again = generate_real(cfg, ex, root / "generated-again", root)  # finished exemplars are not redone
    assert all(s["resumed"] for s in again.summaries)
    pd.testing.assert_frame_equal(t.drop(columns="image"), again.table.drop(columns="image"))
    # how the work is spread is not part of the work root's key: a rerun with more workers resumes
    spread = gen_config(tiny_models, sample_coco, workers=4, batch_size=3)
    assert work_root(spread, root) == work_root(cfg, root)
    # the exemplar behind a concept id is another one (drawn again from other settings): made again, the others kept
    first = ex.iloc[0]
    image = root / first["image"]
    kept = image.read_bytes()
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    try:
        redo = generate_real(cfg, ex, root / "generated-redo", root)
    finally:
        image.write_bytes(kept)
    resumed = {s["job"]["concept_id"]: s["resumed"] for s in redo.summaries}
    assert resumed == {c: c != first["concept_id"] for c in ex["concept_id"]}, resumed


def test_multi_instance_and_missing_detections_are_dropped(tiny_models, sample_coco, exemplar_root):
    root, ex = exemplar_root
    cfg = gen_config(tiny_models, sample_coco, max_instances=1, customization={
        "base_model": str(tiny_models["stable_diffusion"]), "resolution": 32, "ti_steps": 0, "joint_steps": 0,
        "inference_steps": 1, "prior_preservation": False, "device": "cpu"})
    with pytest.raises(ValueError, match=r"no generated image kept from 2 exemplars \(drops: \{'multi_instance': 4\}\)"):
        generate_real(cfg, ex.iloc[:2], root / "g-multi", root)
    drops = json.loads((work_root(cfg, root) / "c00000" / DONE).read_text())["drops"]
    assert {d["reason"] for d in drops} == {"multi_instance"} and all("seed" in d and "V*" in d["prompt"] for d in drops)
    cfg = gen_config(tiny_models, sample_coco, box_threshold=1.0, customization={
        "base_model": str(tiny_models["stable_diffusion"]), "resolution": 32, "ti_steps": 0, "joint_steps": 0,
        "inference_steps": 1, "prior_preservation": False, "device": "cpu"})
    with pytest.raises(ValueError, match=r"'no_detection': 2"):
        generate_real(cfg, ex.iloc[:1], root / "g-none", root)


KILL_SCRIPT = """
import json, sys
from pathlib import Path
import pandas as pd
from ardetect.config import config_from_dict
from ardetect.generation.real import generate_real
cfg = config_from_dict(json.loads(Path(sys.argv[1]).read_text()))
root = Path(sys.argv[2])
generate_real(cfg, pd.read_parquet(root / "exemplars.parquet"), root / "generated", root)
"""


@pytest.mark.slow
def test_killed_run_leaves_no_partial_exemplar_and_resumes(tiny_models, sample_coco, exemplar_root, tmp_path):
    """Exemplar 0 finishes; the process is killed (SIGKILL) while exemplar 1 is under way; a rerun redoes only exemplar 1."""
    src_root, ex = exemplar_root
    root = tmp_path / "data"
    root.mkdir()
    (root / "exemplars").symlink_to(src_root / "exemplars")
    ex.to_parquet(root / "exemplars.parquet")
    cfg = gen_config(tiny_models, sample_coco, customization={
        "base_model": str(tiny_models["stable_diffusion"]), "resolution": 32, "ti_steps": 2, "joint_steps": 20,
        "inference_steps": 2, "prior_images": 1, "device": "cpu"})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.model_dump(mode="json", by_alias=True)))
    wr = work_root(cfg, root)
    first, second = (j.concept_id for j in jobs_from_table(ex, root))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "cfg.json"), str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list(wr.glob(f".{second}.tmp-*")):  # exemplar 0 is finished and exemplar 1 under way
            assert proc.poll() is None, "the generating process ended before starting its second exemplar"
            assert time.time() < deadline, "the second exemplar did not start in time"
            time.sleep(0.02)
    finally:  # killed as soon as exemplar 1's temp folder exists: its load, prior and 22 steps are still ahead
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (wr / first / DONE).is_file()
    assert not (wr / second).exists()  # nothing of the unfinished exemplar under its final name
    assert not (root / "generated").exists()  # nor any stage output
    res = generate_real(cfg, ex, root / "generated", root)
    assert [s["resumed"] for s in res.summaries] == [True, False]
    assert not list(wr.glob(".*.tmp-*"))  # the killed run's temp folder is gone
    assert (wr / second / DONE).is_file() and set(res.table["concept_id"]) <= {first, second}


@pytest.mark.slow
def test_mlflow_child_run_per_batch(tiny_models, sample_coco, exemplar_root, tmp_path):
    import mlflow

    from ardetect.stages.generate import log_batches

    root, ex = exemplar_root
    res = generate_real(gen_config(tiny_models, sample_coco), ex, root / "g-mlflow", root)  # finished: resumed
    tracking.use_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "gen")
    with mlflow.start_run(run_name="generate") as parent:
        assert log_batches(res.summaries, res.table, root, batch_size=1) == 2
    runs = mlflow.search_runs(filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", output_format="list")
    assert len(runs) == 2 and {r.data.tags["ard.kind"] for r in runs} == {"generate_batch"}
    for r in runs:
        m = r.data.metrics
        assert m["exemplars"] == 1 and m["kept"] + m.get("dropped", 0) == 2 and m["seconds_per_exemplar"] > 0
        assert {"seconds_customize_ti", "seconds_sample", "seconds_detect"} <= set(m)
        arts = [a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)]
        assert "batch.json" in arts
        if m["kept"]:
            assert [a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id, "samples")]


def test_prior_images_are_shared_by_a_class(tiny_models, tmp_path):
    from ardetect.config import CustomizationConfig
    from ardetect.generation.break_a_scene import class_priors
    from ardetect.generation.customize import prior_class_images
    from ardetect.generation.models import load_stable_diffusion

    pipe = load_stable_diffusion(str(tiny_models["stable_diffusion"]), device="cpu")
    c = CustomizationConfig(resolution=32, inference_steps=1, prior_images=2, device="cpu")
    calls = []

    def counting(*a, **kw):
        calls.append(a[1])
        return prior_class_images(*a, **kw)

    first = class_priors(pipe, "pickup truck", c, tmp_path, counting)
    again = class_priors(pipe, "pickup truck", c, tmp_path, counting)
    assert calls == ["pickup truck"] and len(first) == len(again) == 2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert (tmp_path / "priors" / "pickup_truck" / DONE).is_file()
