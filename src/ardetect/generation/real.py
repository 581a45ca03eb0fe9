"""The real path's generate step: every exemplar's generated images, sequentially or fanned out.

Real exemplars are made by :mod:`ardetect.generation.exemplars`; the per-exemplar work of
:mod:`ardetect.generation.break_a_scene` runs here in this process (``generate.workers``
1 and no ``generate.scheduler``), or as Prefect tasks on Dask (:mod:`ardetect.generation.fanout`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ardetect.config import Config
from ardetect.generation.break_a_scene import assemble, clear_stale, jobs_from_table, run_exemplar, work_root

log = logging.getLogger("ardetect.generation")


@dataclass
class GeneratedResult:
    table: pd.DataFrame
    objects: pd.DataFrame
    drops: list[dict]
    summaries: list[dict]

    @property
    def drop_counts(self) -> dict[str, int]:
        return dict(Counter(d["reason"] for d in self.drops))


def generate_real(cfg: Config, exemplars: pd.DataFrame, out_dir: Path, data_root: Path) -> GeneratedResult:
    """Customize on each exemplar and write its generated images under ``out_dir`` (finished exemplars are reused)."""
    jobs = jobs_from_table(exemplars, data_root)
    root = work_root(cfg, data_root)
    stale = clear_stale(root)
    if stale:
        log.info("removed %d unfinished exemplar folders of an earlier run in %s", stale, root)
    g = cfg.generate
    if g.workers > 1 or g.scheduler:
        from ardetect.generation.fanout import run_fanout

        summaries = run_fanout(jobs, cfg, root)
    else:
        summaries = []
        for job in jobs:
            summaries.append(run_exemplar(job, cfg, root))
            s = summaries[-1]
            log.info("exemplar %s: %s, %d kept, %d dropped", job.concept_id, "resumed" if s["resumed"] else "done",
                     s["kept"], len(s["drops"]))
    table, objects, drops = assemble(jobs, root, out_dir, data_root)
    if table.empty:
        raise ValueError(f"no generated image kept from {len(jobs)} exemplars (drops: {dict(Counter(d['reason'] for d in drops))}); "
                         "check generate.box_threshold, generate.max_instances and the weights")
    return GeneratedResult(table, objects, drops, summaries)
