"""The per-exemplar fan-out: Prefect tasks on a two-worker local Dask cluster."""

from __future__ import annotations

import pytest

from ardetect.generation.break_a_scene import jobs_from_table, work_root
from ardetect.generation.fanout import run_fanout
from real_helpers import gen_config


@pytest.mark.slow
def test_two_worker_local_dask_cluster(tiny_models, sample_coco, exemplar_root, tmp_path, monkeypatch):
    """Thread workers keep the test short (no process start, no second model load); the stage uses process workers."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    root, ex = exemplar_root
    cfg = gen_config(tiny_models, sample_coco, workers=2, customization={
        "base_model": str(tiny_models["stable_diffusion"]), "resolution": 32, "ti_steps": 1, "joint_steps": 1,
        "inference_steps": 1, "prior_preservation": False, "device": "cpu"})
    jobs = jobs_from_table(ex, root)
    summaries = run_fanout(jobs, cfg, work_root(cfg, root), processes=False)
    assert [s["job"]["concept_id"] for s in summaries] == [j.concept_id for j in jobs]
    assert all(s["worker"] is not None and not s["resumed"] for s in summaries)  # ran as tasks on Dask workers
    assert len({s["worker"] for s in summaries}) == 2  # one exemplar on each worker
    assert all((work_root(cfg, root) / j.concept_id / "done.json").is_file() for j in jobs)
    from distributed import LocalCluster  # an existing cluster, reached by its scheduler address

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        on_cluster = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"scheduler": cluster.scheduler_address})})
        again = run_fanout(jobs, on_cluster, work_root(cfg, root))
        seen = set(cluster.scheduler.workers)
    assert all(s["resumed"] for s in again)  # finished exemplars are skipped on a rerun
    assert len(seen) == 1 and all(s["worker"] is not None for s in again)
