"""Per-exemplar generation as Prefect tasks on Dask (prefect-dask's ``DaskTaskRunner``).

``generate.scheduler`` names an existing Dask cluster; otherwise a local cluster of
``generate.workers`` processes, one thread each, is started for the run. On a machine
with GPUs each worker takes one: the worker's index modulo the GPU count picks its
device (unless ``generate.customization.device`` fixes one). A task is one exemplar;
:func:`ardetect.generation.break_a_scene.run_exemplar` makes it resumable and its output
whole or absent, so a retried or rerun task redoes only unfinished exemplars.
"""

from __future__ import annotations

import os
from pathlib import Path

from ardetect.config import Config
from ardetect.generation.break_a_scene import ExemplarJob, run_exemplar


def worker_device(configured: str | None) -> str | None:
    """The device of this Dask worker: ``configured`` if set, else ``cuda:<worker index % GPUs>``, else None (CPU)."""
    if configured:
        return configured
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else abs(hash(name))
    except (ImportError, ValueError):
        index = 0
    return f"cuda:{index % torch.cuda.device_count()}"


def _exemplar(job: ExemplarJob, cfg: Config, root: str) -> dict:
    device = worker_device(cfg.generate.customization.device)
    if device != cfg.generate.customization.device:
        c = cfg.generate.customization.model_copy(update={"device": device})
        r = cfg.exemplars.real.model_copy(update={"device": cfg.exemplars.real.device or device})
        cfg = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"customization": c}),
                                     "exemplars": cfg.exemplars.model_copy(update={"real": r})})
    try:
        from distributed import get_worker

        worker = str(get_worker().name)
    except (ImportError, ValueError):
        worker = None
    return {**run_exemplar(job, cfg, Path(root)), "worker": worker, "pid": os.getpid(), "device": device or "cpu"}


def task_runner(cfg: Config, processes: bool = True):
    """prefect-dask's runner: the configured scheduler, or a local cluster of ``generate.workers`` workers
    (processes; ``processes=False`` gives thread workers in this process, which start in no time but share its GPU)."""
    from prefect_dask import DaskTaskRunner

    g = cfg.generate
    if g.scheduler:
        return DaskTaskRunner(address=g.scheduler)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": g.workers, "threads_per_worker": 1, "processes": processes, "dashboard_address": None},
    )


def run_fanout(jobs: list[ExemplarJob], cfg: Config, root: Path, processes: bool = True) -> list[dict]:
    """Run every exemplar as a Prefect task on Dask; return their summaries in ``jobs`` order."""
    # without a Prefect server, the flow starts an ephemeral one, whose first start migrates its database:
    # more than Prefect's 20-s default on a busy small machine (read when prefect is first imported)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from prefect import flow, task

    exemplar_task = task(_exemplar, name="customize-and-generate", retries=1, retry_delay_seconds=5)

    @flow(name="generate-real", task_runner=task_runner(cfg, processes), log_prints=True, validate_parameters=False)
    def generate_flow(jobs: list[ExemplarJob], cfg: Config, root: str) -> list[dict]:
        futures = [exemplar_task.with_options(task_run_name=f"exemplar-{j.concept_id}").submit(j, cfg, root) for j in jobs]
        return [f.result() for f in futures]

    return generate_flow(jobs, cfg, str(root))
