"""The ardetect pipeline as a Prefect flow.

Each task runs one DVC stage (``dvc repro <stage>``), in ``dvc.yaml`` order, one at
a time; DVC decides what is up to date, so a second run re-runs nothing. Transient
failures (a DVC lock held by another process, a locked tracking database) are
retried; a failed data check is not. The whole run is one MLflow parent run, each
stage a child run. A markdown artifact summarises what ran.

Run once:              python flows/pipeline.py   (or: make flow)
Serve as a deployment: python flows/deploy.py     (see README)
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import TerminationSignal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ardetect import tracking  # noqa: E402
from ardetect.config import load_config  # noqa: E402
from ardetect.pipeline import (  # noqa: E402
    STOP_SIGNALS,
    PipelineStopped,
    StageOutcome,
    ensure_repository,
    hold_pipeline_lock,
    record_parent_run,
    repro_stage,
    requested_stages,
    settings_changed_outcome,
    settings_drift,
    stages_in_order,
    stop_signals_interrupt,
    summarize,
)
from ardetect.stages.check import preflight  # noqa: E402


class StageFailed(RuntimeError):
    def __init__(self, outcome: StageOutcome):
        detail = f"{outcome.error_type}: {outcome.describe_failure()}" if outcome.error else outcome.describe_failure()
        super().__init__(f"stage {outcome.stage!r} failed ({detail}):\n{outcome.output[-4000:]}")
        self.outcome = outcome


def _retry_transient(task, task_run, state) -> bool:
    """Retry only failures that may pass on their own (see StageOutcome.transient)."""
    try:
        state.result()
    except StageFailed as err:
        return err.outcome.transient
    except Exception:  # noqa: BLE001 - anything else (a crash of dvc itself) is worth one more try
        return True
    return False


@task(name="dvc-stage", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_transient, task_run_name="dvc repro {stage}")
def run_stage(stage: str, root: str) -> dict:
    """One stage, DVC deciding what runs; its output goes to the task log a line at a time
    (each progress bar once, in its final state)."""
    logger = get_run_logger()
    outcome = repro_stage(stage, Path(root), echo=logger.info)
    if not outcome.ok:
        raise StageFailed(outcome)
    return outcome.to_dict()


@flow(name="ardetect-pipeline", log_prints=True)
def pipeline(root: str = str(ROOT), stages: list[str] | None = None) -> dict:
    """Run the DVC stages in order under one MLflow parent run."""
    logger = get_run_logger()
    rootp = Path(root).resolve()
    cfg = load_config(rootp / "params.yaml")
    preflight(cfg, rootp)
    lock = hold_pipeline_lock(rootp, "the Prefect flow")  # PipelineBusy: another pipeline runs here
    made = ensure_repository(rootp)
    if made:
        logger.warning(made)
    order = stages_in_order(rootp)
    names = requested_stages(stages, order, option="stages")
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri, rootp)
    start = time.perf_counter()
    outcomes: list[StageOutcome] = []
    tags = {"ard.profile": cfg.profile, "ard.orchestrator": "prefect", "ard.stages_requested": ",".join(names)}
    settings = cfg.model_dump(by_alias=True)
    # SIGTERM while the flow runs (`kill`, a cancelled deployment run) raises Prefect's TerminationSignal, not
    # KeyboardInterrupt: the stage is stopped all the same (repro_stage), and the run ends KILLED, not FAILED
    with lock or contextlib.nullcontext(), tracking.pipeline_run(
        cfg.tracking.experiment, uri, run_name=f"prefect pipeline [{cfg.profile}]", tags=tags, params=settings,
        interruptions=(TerminationSignal,),
    ):
        try:
            for name in names:
                began = None
                drift = settings_drift(rootp / "params.yaml", settings)  # DVC reads it afresh for each stage
                if drift:
                    raise StageFailed(settings_changed_outcome(name, drift))
                began = time.perf_counter()
                res = run_stage(name, str(rootp))
                outcomes.append(StageOutcome(name, res["returncode"], res["ran"], res["up_to_date"], res["failed"],
                                             seconds=time.perf_counter() - began))
        except StageFailed as err:
            if began is not None and err.outcome.seconds is None:  # the stage ran and failed (its retries included)
                err.outcome.seconds = time.perf_counter() - began
            outcomes.append(err.outcome)
            raise
        finally:
            summary = summarize(outcomes)
            ran = record_parent_run(outcomes, rootp, time.perf_counter() - start, order)["ran"]
            create_markdown_artifact(
                key="ardetect-pipeline-summary",
                markdown=f"# ardetect pipeline [{cfg.profile}]\n\n{summary}\n\nStages run: {', '.join(ran) or 'none (all up to date)'}\n",
                description="What each DVC stage did in this run",
            )
            logger.info("summary:\n%s", summary)
    return {"ran": ran, "stages": [o.stage for o in outcomes]}


if __name__ == "__main__":
    # SIGTERM (kill, a scheduler) and SIGHUP (the terminal closed) end the flow as Ctrl-C does: the stage is told and
    # ends cleanly, and the process unwinds, so Prefect's temporary API server stops with it; ended at once by the
    # signal, the flow left that server running for ever, an orphan holding the terminal's output
    try:
        with stop_signals_interrupt():
            pipeline()
    except PipelineStopped as stop:
        print(f"interrupted ({STOP_SIGNALS[stop.signum]}): run it again to go on from there", file=sys.stderr)
        sys.exit(128 + stop.signum)
