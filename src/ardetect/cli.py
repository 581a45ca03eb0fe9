"""The ``ard`` command."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from datetime import datetime, timezone
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


_terminal_gone = False


def _terminal_write(text: str) -> None:
    """Stage output as it comes, carriage returns kept: a progress bar redraws in place. A terminal that is gone
    (closed: SIGHUP) ends the writing, not the pipeline's clean-up."""
    global _terminal_gone
    if _terminal_gone:
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError:
        _terminal_gone = True


def _say(text: str, err: bool = False) -> None:
    """``typer.echo`` that a closed terminal does not turn into an error."""
    try:
        typer.echo(text, err=err)
    except OSError:
        pass


PARAMS_HELP = "params file; its folder is the repository root (default: params.yaml here, else in the nearest folder above)"


def _params_file(params: Path | None) -> Path:
    """The params file: as given; by default ``params.yaml`` in the working directory, else in the nearest folder
    above it that holds ``params.yaml`` beside ``dvc.yaml`` (as git and DVC find their repository from a subfolder)."""
    if params is not None:
        return params
    here = Path("params.yaml")
    if here.is_file():
        return here
    from ardetect.tracking import find_root

    root = find_root()
    return here if root is None else root / "params.yaml"


def _root(params: Path | None) -> Path:
    """The repository root: the params file's folder."""
    return _params_file(params).resolve().parent


@pipeline_app.command("run")
def pipeline_run(
    stage: list[str] = typer.Option(None, "--stage", "-s", help="run only up to these stages (default: all, in order)"),
    params: Path = typer.Option(None, help=PARAMS_HELP),
    retries: int = typer.Option(2, min=0, help="retries of a stage after a transient failure (a held DVC lock)"),
) -> None:
    """Run every DVC stage in order (`dvc repro <stage>` each); stale stages run, the rest are skipped."""
    from ardetect import tracking
    from ardetect.config import ConfigError, load_config
    from ardetect.pipeline import (
        STOP_SIGNALS, PipelineBusy, RepositoryError, ensure_repository, hold_pipeline_lock, record_parent_run, repro_with_retries,
        requested_stages, settings_changed_outcome, settings_drift, stages_in_order, step_banner, stop_signals_interrupt, summarize,
    )
    from ardetect.stages.check import preflight

    params = _params_file(params)
    root = params.resolve().parent
    try:
        if params.name != "params.yaml":  # the stages, under DVC, read params.yaml: another file would be logged, not run
            raise ValueError(f"--params {params}: the stages read params.yaml in the repository root, as DVC tracks it; give "
                             "a params.yaml (its folder is the repository), or change settings with `dvc exp run -S key=value`")
        cfg = load_config(params)
        preflight(cfg, root)
        if not (root / "dvc.yaml").is_file():  # checked before anything is made there (ensure_repository makes a git repo)
            raise ValueError(f"--params {params}: no dvc.yaml beside it in {root}: the pipeline runs in the repository that "
                             "holds both; give that repository's params.yaml, or run from inside it")
        lock = hold_pipeline_lock(root, "ard pipeline run")
        made = ensure_repository(root)
        if made:
            _say(made, err=True)
        tracking.require_enabled("ard pipeline run")
        uri = tracking.tracking_uri(cfg.tracking.tracking_uri, root)
        tracking.check_reachable(uri)
        order = stages_in_order(root)
        stages = requested_stages(stage, order)
        with _store_errors(uri):
            tracking.use_experiment(uri, cfg.tracking.experiment)  # a deleted experiment, a store MLflow refuses: said here
    except (ConfigError, ValueError, tracking.TrackingUnreachable, RepositoryError, PipelineBusy) as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    start = time.perf_counter()
    outcomes = []
    tags = {"ard.profile": cfg.profile, "ard.orchestrator": "cli", "ard.stages_requested": ",".join(stages)}
    settings = cfg.model_dump(by_alias=True)
    with lock or contextlib.nullcontext(), stop_signals_interrupt(), tracking.pipeline_run(
        cfg.tracking.experiment, uri, run_name=f"pipeline [{cfg.profile}]", tags=tags, params=settings
    ):
        for index, name in enumerate(stages, 1):
            drift = settings_drift(params, settings)  # DVC reads params.yaml afresh for each stage: edited mid-run, it stops
            if drift:
                outcomes.append(settings_changed_outcome(name, drift))
                break
            _say(step_banner(name, index, len(stages), time.perf_counter() - start))
            try:
                outcome = repro_with_retries(name, root, retries=retries, write=_terminal_write, notify=lambda m: _say(m, err=True))
            except KeyboardInterrupt as stop:  # the DVC child and its stage have ended (pipeline._stop_child)
                signum = getattr(stop, "signum", signal.SIGINT)
                record_parent_run(outcomes, root, time.perf_counter() - start, order)
                if outcomes:
                    _say(summarize(outcomes))
                _say(f"interrupted ({STOP_SIGNALS[signum]}) at `dvc repro {name}` after {time.perf_counter() - start:.1f} s: the "
                     "stages that finished are kept and nothing half-written is. Run the same command again to go on from there "
                     "(a training resumes from its last resume point); `dvc checkout` brings back the outputs DVC "
                     "cleared for the interrupted stage, as they were before it started", err=True)
                if signum == signal.SIGINT:
                    raise  # inside the run: it ends as KILLED; typer exits 130
                raise SystemExit(128 + signum) from None  # 143 or 129, the run KILLED as well
            outcomes.append(outcome)
            if not outcome.ok:
                break
        summary = summarize(outcomes)
        done = record_parent_run(outcomes, root, time.perf_counter() - start, order)
        tracking.log_dict({"summary": summary}, "pipeline_summary.json")
        _say(summary)
        ran = done["ran"]
        _say(f"pipeline wall time: {time.perf_counter() - start:.1f} s; stages run: {', '.join(ran) or 'none (all up to date)'}")
        if not all(o.ok for o in outcomes):
            failed = next(o for o in outcomes if not o.ok)
            _say(f"stage {failed.stage!r} failed: {failed.describe_failure()}", err=True)
            raise typer.Exit(1)  # inside the run: MLflow marks the parent run FAILED


@contextlib.contextmanager
def _store_errors(uri: str):
    """What MLflow or its database raise over the store (a filter it refuses, a database it cannot open): one line
    naming the store, exit 2, not a traceback. (Only raised once MLflow is imported: it is not imported here.)"""
    try:
        yield
    except Exception as err:
        if type(err).__module__.split(".")[0] not in ("mlflow", "sqlalchemy"):
            raise
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        typer.echo(f"error: the MLflow store {uri}: {first.strip()}", err=True)
        raise typer.Exit(2) from None


def _absent_store(uri: str) -> bool:
    """A sqlite store that is not there (a fresh checkout, a mistyped path): a registry command says so and makes
    none (MLflow's client would make the database file, and its folder)."""
    from ardetect import tracking

    db = tracking.sqlite_file(uri)
    if db is None or db.is_file():
        return False
    typer.echo(f"no MLflow store at {db}: nothing is registered there yet (`make run` registers the detector), or the "
               "path is mistyped (tracking.tracking_uri, MLFLOW_TRACKING_URI)", err=True)
    return True


def _tracking_target(params: Path) -> tuple[str, str]:
    from ardetect import tracking
    from ardetect.config import ConfigError, load_config

    params = _params_file(params)
    try:
        cfg = load_config(params)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    uri = tracking.tracking_uri(cfg.tracking.tracking_uri, params.resolve().parent)
    try:
        tracking.check_reachable(uri)  # a server that does not answer, a damaged sqlite store: said, not a traceback
    except tracking.TrackingUnreachable as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    return cfg.tracking.experiment, uri


# `ard runs list` columns of pipeline parent runs: (two-line header, metric, format)
PIPELINE_COLUMNS = (
    ("ARD\nR@1", "test.ARD.recall_at_1", "{:.3f}"),
    ("ARD\nR@5", "test.ARD.recall_at_5", "{:.3f}"),
    ("ARD\nR@10", "test.ARD.recall_at_10", "{:.3f}"),
    ("AbC\nR@1", "test.AbC.recall_at_1", "{:.3f}"),
    ("AbC\nR@5", "test.AbC.recall_at_5", "{:.3f}"),
    ("AbC\nR@10", "test.AbC.recall_at_10", "{:.3f}"),
    ("ARD\nbox", "test.ARD.box_accuracy", "{:.3f}"),
    ("secs", "pipeline_seconds", "{:.0f}"),
)
PIPELINE_CAPTION = "R@k: Recall@k on the test split; ARD box: its box accuracy (test); secs: pipeline wall time"


def _cell(row, column: str, fmt: str = "{}") -> str:
    import math

    value = row.get(column) if hasattr(row, "get") else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _start(value, short: bool = False) -> str:
    """A run's start in local time; ``short``: ``MM-DD HH:MM`` this year, ``YYYY-MM-DD`` before."""
    import pandas as pd

    if value is None or pd.isna(value):
        return "-"
    ts = pd.Timestamp(value)
    now = datetime.now().astimezone()
    if ts.tzinfo is not None:
        ts = ts.tz_convert(now.tzinfo)
    if short:
        return ts.strftime("%m-%d %H:%M" if ts.year == now.year else "%Y-%m-%d")
    return ts.strftime("%Y-%m-%d %H:%M")


@runs_app.command("list")
def runs_list(
    stage: str = typer.Option(None, help="list this stage's child runs instead of the pipeline runs"),
    limit: int = typer.Option(20, min=1, help="at most this many runs, newest first"),
    params: Path = typer.Option(None, help=PARAMS_HELP),
) -> None:
    """Pipeline runs, newest first, with the figures to compare them by (or one stage's runs with --stage)."""
    import pandas as pd
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ardetect import tracking
    from ardetect.pipeline import stages_in_order

    experiment, uri = _tracking_target(params)
    dvc_yaml = _root(params) / "dvc.yaml"
    known = stages_in_order(dvc_yaml.parent) if stage and dvc_yaml.is_file() else []
    flt = f"tags.`ard.stage` = '{stage}'" if stage else "tags.`ard.kind` = 'pipeline'"
    with _store_errors(uri):
        df = tracking.find_runs(experiment, uri, flt, max_results=limit) if "'" not in (stage or "") else pd.DataFrame()
    console = Console()
    if df.empty and stage and stage not in known:  # runs of a stage no longer in dvc.yaml are still listed
        typer.echo(f"--stage {stage!r}: no runs, and not a stage of the pipeline"
                   + (f" (its stages: {', '.join(known)})" if known else ""), err=True)
        raise typer.Exit(2)
    if df.empty:
        typer.echo(f"no {'runs of stage ' + repr(stage) if stage else 'pipeline runs'} yet in experiment {experiment!r}")
        return
    # one space between columns, so the pipeline table fits 80 columns (name and start wrap there)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False, show_edge=False)
    table.add_column("run", no_wrap=True, style="cyan")
    if stage:
        for name in ("stage", "status", "start"):
            table.add_column(name, no_wrap=name != "start")
        table.add_column("secs", justify="right", no_wrap=True)
        table.add_column("MiB", justify="right", no_wrap=True)  # the stage process's peak resident memory
        table.add_column("worker", justify="right", no_wrap=True)  # its largest worker process's, MiB ("-": none)
        table.add_column("parent", no_wrap=True)
        for _, row in df.iterrows():
            parent = row.get("tags.mlflow.parentRunId")
            cells = (
                row["run_id"][:8], _cell(row, "tags.ard.stage"), _cell(row, "status"), _start(row.get("start_time")),
                _cell(row, "metrics.stage_seconds", "{:.1f}"), _cell(row, "metrics.peak_memory_mib", "{:.0f}"),
                _cell(row, "metrics.peak_child_memory_mib", "{:.0f}"), parent[:8] if isinstance(parent, str) and parent else "-",
            )
            table.add_row(*(Text(c) for c in cells))  # Text: a name like "pipeline [smoke]" is not markup
    else:
        rows = []
        for _, row in df.iterrows():
            rows.append((
                row["run_id"][:8], _cell(row, "tags.mlflow.runName"), _start(row.get("start_time"), short=True),
                _cell(row, "status"), *(_cell(row, f"metrics.{metric}", fmt) for _, metric, fmt in PIPELINE_COLUMNS),
            ))
        headers = ["run", "name", "start", "status", *(h for h, _, _ in PIPELINE_COLUMNS)]
        widths = [max(max(len(part) for part in h.split("\n")), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        # name and start wrap (at spaces) when the terminal is too narrow for one line a run
        spare = console.width - (len(headers) - 1) - sum(w for i, w in enumerate(widths) if i not in (1, 2))
        start_w = widths[2] if spare >= widths[1] + widths[2] else min(widths[2], 5)
        name_w = max(8, min(widths[1], spare - start_w))
        table.add_column("name", overflow="fold", width=name_w)
        table.add_column("start", width=start_w)
        table.add_column("status", no_wrap=True)
        for header, _, _ in PIPELINE_COLUMNS:
            table.add_column(header, justify="right", no_wrap=True)
        table.caption = PIPELINE_CAPTION
        for cells in rows:
            table.add_row(*(Text(c) for c in cells))  # Text: a name like "pipeline [smoke]" is not markup
    console.print(table)


def _fmt_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def compare_rows(a, b) -> list[tuple[str, str, object, object, bool]]:
    """(kind, key, value in A, value in B, differ) for every param, metric and ``ard.*`` tag of two runs."""
    rows = []
    sections = (
        ("param", a.data.params, b.data.params),
        ("metric", a.data.metrics, b.data.metrics),
        ("tag", {k: v for k, v in a.data.tags.items() if k.startswith("ard.")},
         {k: v for k, v in b.data.tags.items() if k.startswith("ard.")}),
    )
    for kind, left, right in sections:
        for key in sorted(set(left) | set(right)):
            va, vb = left.get(key), right.get(key)
            rows.append((kind, key, va, vb, va != vb))
    return rows


@runs_app.command("compare")
def runs_compare(
    run_a: str = typer.Argument(..., help="a run id or a unique prefix of one"),
    run_b: str = typer.Argument(..., help="another run id or prefix"),
    show_all: bool = typer.Option(False, "--all", help="every param, metric and tag, not only those that differ"),
    params: Path = typer.Option(None, help=PARAMS_HELP),
) -> None:
    """Two runs' params, metrics and ard.* tags side by side; differing rows are marked '*'."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ardetect import tracking

    experiment, uri = _tracking_target(params)
    runs = []
    for ref in (run_a, run_b):
        try:
            with _store_errors(uri):
                runs.append(tracking.get_run(uri, tracking.resolve_run(experiment, uri, ref)))
        except tracking.RunNotFound as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
    a, b = runs
    console = Console()
    for label, run in (("A", a), ("B", b)):
        start = _start(datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc)) if run.info.start_time else "-"
        console.print(f"{label}  {run.info.run_id}  {run.info.run_name or '-'}  {start}  {run.info.status}", markup=False, highlight=False)
    rows = compare_rows(a, b)
    differing = sum(1 for r in rows if r[4])
    shown = rows if show_all else [r for r in rows if r[4]]
    if shown:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        table.add_column("", no_wrap=True, width=1)
        table.add_column("kind", no_wrap=True)
        table.add_column("key", overflow="fold")
        table.add_column(f"A {a.info.run_id[:8]}", overflow="fold")
        table.add_column(f"B {b.info.run_id[:8]}", overflow="fold")
        for kind, key, va, vb, differ in shown:
            cells = ("*" if differ else "", kind, key, _fmt_value(va), _fmt_value(vb))
            table.add_row(*(Text(c) for c in cells), style="bold yellow" if differ else None)
        console.print(table)
    hint = "" if show_all else " (--all shows every row)"
    console.print(f"{differing} of {len(rows)} params, metrics and tags differ{hint}", highlight=False)


@config_app.command("show")
def config_show(params: Path = typer.Option(None, help=PARAMS_HELP)) -> None:
    """Print the effective configuration (profile overlay applied), validated."""
    from ardetect.config import ConfigError, load_config

    try:
        cfg = load_config(_params_file(params))
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(cfg.model_dump(by_alias=True), indent=2))


models_app = typer.Typer(help="The registered detector: versions, aliases, promotion.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(
    params: Path = typer.Option(None, help=PARAMS_HELP),
    name: str = typer.Option(None, help="registered model name (default: export.model_name)"),
) -> None:
    """Every registered version: its aliases (champion, challenger) and the metrics it earned."""
    from rich.console import Console
    from rich.table import Table

    from ardetect.export.registry import RegistryError, list_versions

    _, uri = _tracking_target(params)
    name = name or _model_name(params)
    if _absent_store(uri):
        raise typer.Exit(1)
    try:
        with _store_errors(uri):
            rows = list_versions(uri, name)
    except RegistryError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    table = Table(title=f"{name} ({uri})")
    for col in ("version", "aliases", "test R@10", "test R@10 (paper score)", "run", "created"):
        table.add_column(col)
    for r in rows.itertuples(index=False):
        table.add_row(str(r.version), r.aliases, r.test_recall_at_10, r.paper_recall_at_10, r.run_id[:12], r.created)
    Console(width=160).print(table)


@models_app.command("promote")
def models_promote(
    version: str = typer.Argument(..., help="the version to make champion"),
    params: Path = typer.Option(None, help=PARAMS_HELP),
    name: str = typer.Option(None, help="registered model name (default: export.model_name)"),
) -> None:
    """Move the alias ``champion`` to VERSION by hand."""
    from ardetect.export.registry import RegistryError, promote

    _, uri = _tracking_target(params)
    name = name or _model_name(params)
    if _absent_store(uri):
        raise typer.Exit(1)
    try:
        with _store_errors(uri):
            reason = promote(uri, version, name)
    except RegistryError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{name} version {version} is champion: {reason}")


def _model_name(params: Path) -> str:
    from ardetect.config import ConfigError, load_config

    try:
        return load_config(_params_file(params)).export.model_name
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None


@app.command("export")
def export_cmd(
    phase2: Path = typer.Option(..., "--phase2", help="the phase-2 (ARD) checkpoint: a model.pt written by train_phase2"),
    out: Path = typer.Option(..., "--out", help="folder to write the graphs, tokenizer and manifest to"),
    phase1: Path = typer.Option(None, "--phase1", help="its phase-1 checkpoint: checked to be the same training, digest recorded"),
    identity_weight: float = typer.Option(None, "--identity-weight", min=0.0, help="re-ranking weight (default: reports/details.json's fit for ARD)"),
    grid: int = typer.Option(None, "--grid", min=1, help="re-ranking pooling grid (default: as the weight)"),
    class_weight: float = typer.Option(None, "--class-weight", min=0.0, help="re-ranking class-match exponent (default: as the weight)"),
    top_k: int = typer.Option(5, "--top-k", min=1, help="boxes per candidate the re-ranking chooses among"),
    details: Path = typer.Option(None, help="evaluate's details, for the fitted weight and grid (default: reports/details.json at the repository root)"),
    parity: bool = typer.Option(True, help="check parity on the pipeline's first test tuples (needs data/tuples)"),
    queries: int = typer.Option(32, min=1, help="test tuples the parity check scores"),
    variant_queries: int = typer.Option(8, "--variant-queries", min=1, help="the first of those the fp16 scorer is compared on"),
    int8_queries: int = typer.Option(None, "--int8-queries", min=1, help="the first of those the int8 scorer is compared on (default: all)"),
    tie_rechecks: int = typer.Option(32, "--tie-rechecks", min=0, help="fp32 pairs beyond the bounds re-checked for a selection-order tie (0 = none)"),
    fp16: bool = typer.Option(True, help="also write the fp16 scorer"),
    int8: bool = typer.Option(True, help="also write the int8 scorer"),
    data: Path = typer.Option(None, help="data root of the tuples' image paths (default: data/ at the repository root)"),
) -> None:
    """Export any phase-2 checkpoint to ONNX (the export stage's code), optionally with its parity check."""
    from ardetect.export.build import ExportOptions, build_export, identity_of, variant_line
    from ardetect.export.onnx_export import ExportError

    root = _root(None)
    details = root / "reports" / "details.json" if details is None else details
    data = root / "data" if data is None else data
    try:
        if identity_weight is None or grid is None or class_weight is None:
            w, g, a = identity_of(details)
            identity_weight = w if identity_weight is None else identity_weight
            grid = g if grid is None else grid
            if class_weight is None:  # the fit's class weight, unless this detector has no region classifier to weigh with
                import torch

                try:
                    ck = torch.load(phase2, map_location="cpu", weights_only=False)
                except Exception:  # noqa: BLE001 - missing or no checkpoint: the export below says which, naming the path
                    ck = {}
                config = ck.get("model_config") if isinstance(ck, dict) else None
                class_weight = a if (config or {}).get("region_classes") else 0.0
        tuples = negatives = None
        if parity:
            from ardetect.data.schema import NEGATIVE_COLUMNS, TUPLE_COLUMNS, read_table

            tuples = read_table(data / "tuples" / "tuples.parquet", TUPLE_COLUMNS, "tuples")
            negatives = read_table(data / "tuples" / "negatives.parquet", NEGATIVE_COLUMNS, "negatives")
        opts = ExportOptions(identity_weight, grid, top_k, fp16=fp16, int8=int8, parity_queries=queries, variant_queries=variant_queries,
                             tie_rechecks=tie_rechecks, int8_queries=int8_queries, class_weight=class_weight)
        done = build_export(phase2, out, opts, phase1=phase1, tuples=tuples, negatives=negatives, data_root=data, progress=True)
    except (ExportError, ValueError, FileNotFoundError) as err:
        typer.echo(f"export failed: {err}", err=True)
        raise typer.Exit(1) from None
    m = done["manifest"]
    typer.echo(f"wrote {out}: {', '.join(sorted(m['sha256']))} ({m['model_config']['size']}, {m['image_size']} px; "
               f"identity weight {identity_weight:g}, grid {grid}, class weight {class_weight:g})")
    if done["parity"] is not None:
        f = done["parity"]["fp32"]
        typer.echo(f"parity on {done['parity']['queries']} test tuples: score diff {f['score_max_abs_diff']:.2e}, "
                   f"box diff {f['box_max_abs_diff_px']:.2e} px, recalls equal: {f['recalls_equal']}")
        for p in ("fp16", "int8"):
            r = done["parity"].get(p)
            if r:
                typer.echo(f"{p} scorer: " + (variant_line(r) if r["run"] else f"not run here ({r['reason']})"))
    typer.echo("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in done["seconds"].items()))


index_app = typer.Typer(help="The candidate index the service searches.", no_args_is_help=True)
app.add_typer(index_app, name="index")


def _serve_settings(params: Path):
    """(serve section, tracking URI, repository root) from ``params``; the defaults when the file is absent."""
    from ardetect import tracking
    from ardetect.config import Config, ConfigError, load_config

    params = _params_file(params)
    root = params.resolve().parent
    try:
        cfg = load_config(params) if params.is_file() else Config()
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    return cfg.serve, tracking.tracking_uri(cfg.tracking.tracking_uri, root), root


def _serve_path(root: Path, given, configured: str) -> str:
    """A path given on the command line as it is (relative to the working directory); else the configured
    one, relative to the repository root (the params file's folder). Registry URIs are left as they are."""
    if given is not None:
        return str(given)
    text = str(configured)
    if text.startswith("models:/") or Path(text).is_absolute():
        return text
    return str(root / text)


@index_app.command("build")
def index_build(
    out: Path = typer.Option(None, "--out", help="index folder (default: serve.index)"),
    model: str = typer.Option(None, "--model", help="export folder or models:/name@alias (default: serve.model)"),
    data: Path = typer.Option(None, help="the pipeline's data root, whose training images are indexed (default: data/ at the repository root)"),
    split: str = typer.Option("all", help="the tuples' split whose training images to index: train, val, test or all"),
    images: Path = typer.Option(None, "--images", help="index every image under this folder instead of the pipeline's"),
    fresh: bool = typer.Option(False, "--fresh", help="discard a partial build instead of resuming it"),
    batch: int = typer.Option(None, min=1, help="images encoded a batch (a resume point each; default: serve.batch)"),
    params: Path = typer.Option(None, help=PARAMS_HELP),
) -> None:
    """Encode training images once into an on-disk index (resumes after a kill; refuses another model's partial build)."""
    from ardetect.export.onnx_export import ExportError
    from ardetect.images import ImageRejected
    from ardetect.serve import IndexUnusable, ModelNotFound, build_index, load_model
    from ardetect.serve.index import folder_entries, pipeline_entries

    cfg, uri, root = _serve_settings(params)
    out = Path(_serve_path(root, out, cfg.index))
    data = root / "data" if data is None else data
    try:
        m = load_model(_serve_path(root, model, cfg.model), providers=cfg.providers, threads=cfg.threads, tracking_uri=uri)
        if images is not None:
            entries, examples, image_root, source = folder_entries(images), None, images, "folder"
        else:
            entries, examples = pipeline_entries(data, split)
            image_root, source = data, f"pipeline:{split}"
        typer.echo(f"model {m.source} ({m.name or 'folder'}{' v' + m.version if m.version else ''}; providers "
                   f"{sorted(set(m.providers.values()))}); {len(entries)} images from {image_root} -> {out}")
        meta = build_index(m, image_root, entries, out, examples=examples, chunk=batch or cfg.batch, source=source, fresh=fresh)
    except (ModelNotFound, IndexUnusable, ExportError, ImageRejected, FileNotFoundError, ValueError) as err:
        typer.echo(f"index build failed: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {out}: {meta['count']} images, features {meta['feature_shape']}, encoded in {meta['encode_seconds']:.1f} s")
    if meta.get("skipped"):
        first = json.loads((out / "skipped.json").read_text())[0]
        typer.echo(f"{meta['skipped']} image file(s) could not be read and are not in the index (listed in {out / 'skipped.json'}); "
                   f"the first: {first['path']}: {first['reason']}", err=True)


@app.command("serve")
def serve_cmd(
    host: str = typer.Option(None, help="address to bind (default: serve.host, 127.0.0.1)"),
    port: int = typer.Option(None, min=1, max=65535, help="port (default: serve.port)"),
    model: str = typer.Option(None, "--model", help="export folder or models:/name@alias (default: serve.model)"),
    index: Path = typer.Option(None, "--index", help="index folder (default: serve.index)"),
    params: Path = typer.Option(None, help=PARAMS_HELP),
) -> None:
    """Start the HTTP service (POST /attribute, the web page at /, docs at /docs)."""
    import uvicorn

    from ardetect.export.onnx_export import ExportError
    from ardetect.serve import IndexUnusable, ModelNotFound, open_attributor
    from ardetect.serve.app import create_app, token_from_env, uvicorn_log_config

    cfg, uri, root = _serve_settings(params)
    host, port = host or cfg.host, port or cfg.port
    sock = _listening_socket(host, port)  # before the model loads: a port in use is said at once, not after it
    try:
        try:
            attributor = open_attributor(cfg, _serve_path(root, model, cfg.model), _serve_path(root, index, cfg.index),
                                         tracking_uri=uri)
        except (ModelNotFound, IndexUnusable, ExportError) as err:
            typer.echo(f"serve failed: {err}", err=True)
            raise typer.Exit(1) from None
        token = token_from_env(cfg)
        d = attributor.describe()
        typer.echo(f"serving {d['source']} ({d['name'] or 'folder'}{' v' + d['version'] if d['version'] else ''}) on "
                   f"{sorted(set(d['providers'].values()))}, index of {d['index_size']} images, at "
                   f"http://{f'[{host}]' if ':' in host else host}:{port}/ "
                   f"({'bearer token required: $' + cfg.token_env if token else 'no token'})")
        config = uvicorn.Config(create_app(attributor, cfg, token), host=host, port=port, log_level="info",
                                timeout_keep_alive=5, log_config=uvicorn_log_config())
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def _listening_socket(host: str, port: int):
    """The service's socket, bound here (as uvicorn binds it) so that a port in use or an address this machine does
    not have is refused with the option to change, before the model is loaded; uvicorn then serves on it."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (socket.gaierror, UnicodeError) as err:  # a host name that does not resolve
        sock.close()
        typer.echo(f"serve failed: cannot listen on {host}:{port}: --host {host!r} does not resolve ({err})", err=True)
        raise typer.Exit(1) from None
    except OSError as err:
        sock.close()
        why = {errno.EADDRINUSE: "the port is in use (another `ard serve`, or another service): choose one with --port",
               errno.EADDRNOTAVAIL: "this machine has no such address: choose one with --host (127.0.0.1 or 0.0.0.0)",
               errno.EACCES: "not allowed (ports below 1024 need privileges): choose another with --port"}
        typer.echo(f"serve failed: cannot listen on {host}:{port}: {why.get(err.errno, err.strerror or str(err))}", err=True)
        raise typer.Exit(1) from None
    return sock


@app.command("attribute")
def attribute_cmd(
    image: Path = typer.Argument(..., help="the generated image"),
    box: str = typer.Option(..., "--box", help="the object's box in the image, pixels: x0,y0,x1,y1"),
    prompt: str = typer.Option(..., "--prompt", help="the prompt the image was generated from"),
    phrase: str = typer.Option(..., "--phrase", help="the concept phrase, as it occurs in the prompt"),
    top_k: int = typer.Option(None, "--top-k", min=1, help="results (default: serve.top_k)"),
    shortlist: int = typer.Option(None, "--shortlist", min=1, help="images the embedding search passes to the scorer (default: serve.shortlist)"),
    candidates: str = typer.Option(None, "--candidates", help="comma-separated image ids to score instead of the index's shortlist"),
    grid: Path = typer.Option(None, "--grid", help="write the query and its results as a PNG grid here"),
    truth: str = typer.Option(None, "--truth", help="id of the query's true training image, when known: marked in the output"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    model: str = typer.Option(None, "--model", help="export folder or models:/name@alias (default: serve.model)"),
    index: Path = typer.Option(None, "--index", help="index folder (default: serve.index)"),
    params: Path = typer.Option(None, help=PARAMS_HELP),
) -> None:
    """Attribute an object of a generated image in-process, as POST /attribute does."""
    from ardetect.export.onnx_export import ExportError
    from ardetect.images import ImageRejected, decode_image
    from ardetect.serve import IndexUnusable, ModelNotFound, open_attributor
    from ardetect.serve.requests import Limits, RequestError, check_prompt, check_shortlist, check_top_k, parse_box, parse_candidates

    cfg, uri, root = _serve_settings(params)
    limits = Limits.of(cfg)
    try:
        if not image.is_file():
            raise RequestError("image", f"{image}: {'a folder, not an image file' if image.is_dir() else 'no such file'}")
        try:
            img = decode_image(image.read_bytes(), limits.max_pixels)
        except ImageRejected as err:
            raise RequestError("image", f"{image}: {err}") from None
        if grid is not None and grid.is_dir():
            raise RequestError("grid", f"{grid}: a folder; give the PNG file to write (e.g. {grid / 'grid.png'})")
        if grid is not None and grid.suffix.lower() not in ("", ".png"):
            raise RequestError("grid", f"{grid}: the grid is written as a PNG; name it .png")
        q_box = parse_box(box)
        q_prompt, q_phrase = check_prompt(prompt, phrase, limits.max_prompt_chars)
        k = check_top_k(top_k or cfg.top_k, limits)
        check_shortlist(shortlist, limits)
        ids = parse_candidates(candidates, limits)
        attributor = open_attributor(cfg, _serve_path(root, model, cfg.model), _serve_path(root, index, cfg.index), tracking_uri=uri)
        result = attributor.attribute(img, q_box, q_prompt, q_phrase, top_k=k, shortlist=shortlist, candidates=ids)
    except RequestError as err:
        typer.echo(f"attribute: {err}", err=True)
        raise typer.Exit(2) from None
    except (ModelNotFound, IndexUnusable, ExportError) as err:
        typer.echo(f"attribute failed: {err}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        scope = f"shortlist of {result.shortlist}" if result.shortlist else f"{result.scored} candidates"
        typer.echo(f"{scope} scored in {result.timing_ms['total']:.0f} ms")
        for r in result.results:
            mark = "  <- the true training image" if truth is not None and r["id"] == truth else ""
            typer.echo(f"{r['rank']:>3}  {r['id']:<24} score {r['score']:.4f}  box {r['box']}{mark}")
    if grid is not None:
        from ardetect.serve.figures import result_grid

        try:
            result_grid(img, q_box, result.results, attributor.index, grid, truth=truth)
        except (ImageRejected, OSError) as err:  # a training image gone from the index's root, a folder not writable
            typer.echo(f"attribute: grid: {grid} not written: {err}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"wrote {grid}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
