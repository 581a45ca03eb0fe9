"""The ``ard`` command."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

app = typer.Typer(help="ardetect: region-level data attribution for text-to-image models.", no_args_is_help=True)
pipeline_app = typer.Typer(help="Run the DVC pipeline under one MLflow parent run.", no_args_is_help=True)
runs_app = typer.Typer(help="List and compare MLflow runs.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the configuration.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(runs_app, name="runs")
app.add_typer(config_app, name="config")

try:  # the detector's commands (`ard model info <size>`)
    from ardetect.model.cli import app as model_app

    app.add_typer(model_app, name="model")
except ImportError:  # pragma: no cover - only while the model package is absent
    pass


@pipeline_app.command("run")
def pipeline_run(
    stage: list[str] = typer.Option(None, "--stage", "-s", help="run only up to these stages (default: all, in order)"),
    params: Path = typer.Option(Path("params.yaml"), help="params file (its folder is the repository root)"),
) -> None:
    """Run every DVC stage in order (`dvc repro <stage>` each); stale stages run, the rest are skipped."""
    from ardetect import tracking
    from ardetect.config import ConfigError, load_config
    from ardetect.pipeline import repro_stage, stages_in_order, summarize

    root = params.resolve().parent
    try:
        cfg = load_config(params)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    stages = stage or stages_in_order(root)
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri, root)
    start = time.perf_counter()
    outcomes = []
    with tracking.pipeline_run(cfg.tracking.experiment, uri, run_name=f"pipeline [{cfg.profile}]", tags={"ard.profile": cfg.profile}):
        tracking.log_params({"profile": cfg.profile, "stages": ",".join(stages)})
        for name in stages:
            typer.echo(f"==> dvc repro {name}")
            outcome = repro_stage(name, root, echo=typer.echo)
            outcomes.append(outcome)
            if not outcome.ok:
                break
        summary = summarize(outcomes)
        ran = sorted({s for o in outcomes for s in o.ran})
        tracking.log_metrics({"pipeline_seconds": time.perf_counter() - start, "stages_run": len(ran)})
        tracking.log_dict({"ran": ran, "stages": [o.stage for o in outcomes], "ok": all(o.ok for o in outcomes)}, "pipeline.json")
        tracking.log_dict({"summary": summary}, "pipeline_summary.json")
    typer.echo(summary)
    typer.echo(f"pipeline wall time: {time.perf_counter() - start:.1f} s; stages run: {', '.join(ran) or 'none (all up to date)'}")
    if not all(o.ok for o in outcomes):
        raise typer.Exit(1)


@runs_app.command("list")
def runs_list(
    stage: str = typer.Option(None, help="only the child runs of this stage"),
    limit: int = typer.Option(20, min=1),
    params: Path = typer.Option(Path("params.yaml")),
) -> None:
    """Newest runs first: run name, status, parent, key metrics."""
    from ardetect import tracking
    from ardetect.config import load_config

    cfg = load_config(params)
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri, params.resolve().parent)
    flt = f"tags.`ard.stage` = '{stage}'" if stage else ""
    df = tracking.find_runs(cfg.tracking.experiment, uri, flt, max_results=limit)
    if df.empty:
        typer.echo("no runs yet")
        return
    cols = [c for c in ("run_id", "tags.mlflow.runName", "status", "tags.mlflow.parentRunId", "start_time") if c in df]
    metric_cols = [c for c in df.columns if c.startswith("metrics.")][:8]
    with_metrics = df[cols + metric_cols].copy()
    with_metrics["run_id"] = with_metrics["run_id"].str[:8]
    if "tags.mlflow.parentRunId" in with_metrics:
        with_metrics["tags.mlflow.parentRunId"] = with_metrics["tags.mlflow.parentRunId"].fillna("").str[:8]
    typer.echo(with_metrics.to_string(index=False))


@config_app.command("show")
def config_show(params: Path = typer.Option(Path("params.yaml"))) -> None:
    """Print the effective configuration (profile overlay applied), validated."""
    from ardetect.config import ConfigError, load_config

    try:
        cfg = load_config(params)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(cfg.model_dump(by_alias=True), indent=2))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
