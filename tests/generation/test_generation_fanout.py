"""The per-exemplar fan-out: Prefect tasks on a two-worker local Dask cluster."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from ardetect.generation.break_a_scene import jobs_from_table, work_root
from ardetect.generation.fanout import run_fanout
from real_helpers import gen_config


def _fan_out(tiny_models, sample_coco, root, ex, tmp_path) -> tuple[list, list, set, bool]:
    """Both runs of the test, in a process of their own: Prefect and an in-process Dask cluster leave
    logging handlers and threads behind that break later forked processes (DataLoader workers)."""
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    cfg = gen_config(tiny_models, sample_coco, workers=2, customization={
        "base_model": str(tiny_models["stable_diffusion"]), "resolution": 32, "ti_steps": 1, "joint_steps": 1,
        "inference_steps": 1, "prior_preservation": False, "device": "cpu"})
    jobs = jobs_from_table(ex, root)
    summaries = run_fanout(jobs, cfg, work_root(cfg, root), processes=False)
    done = all((work_root(cfg, root) / j.concept_id / "done.json").is_file() for j in jobs)
    from distributed import LocalCluster  # an existing cluster, reached by its scheduler address

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        on_cluster = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"scheduler": cluster.scheduler_address})})
        again = run_fanout(jobs, on_cluster, work_root(cfg, root))
        seen = set(cluster.scheduler.workers)
    return summaries, again, seen, done, [j.concept_id for j in jobs]


@pytest.mark.slow
def test_two_worker_local_dask_cluster(tiny_models, sample_coco, exemplar_root, tmp_path):
    """Thread workers keep the test short (no process start, no second model load); the stage uses process workers."""
    root, ex = exemplar_root
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        summaries, again, seen, done, ids = pool.submit(_fan_out, tiny_models, sample_coco, root, ex, tmp_path).result()
    assert [s["job"]["concept_id"] for s in summaries] == ids
    assert all(s["worker"] is not None and not s["resumed"] for s in summaries)  # ran as tasks on Dask workers
    assert len({s["worker"] for s in summaries}) == 2  # one exemplar on each worker
    assert done
    assert all(s["resumed"] for s in again)  # finished exemplars are skipped on a rerun
    assert len(seen) == 1 and all(s["worker"] is not None for s in again)
