"""MLflow helpers used at the stage level (models know nothing of MLflow).

One parent run per pipeline execution (``ard pipeline run`` or the Prefect flow)
and a child run per stage. The parent's id travels to the stage processes that
``dvc repro`` starts through the ``ARD_MLFLOW_PARENT_RUN_ID`` variable; a stage run
outside a pipeline execution (plain ``dvc repro``) logs a run without a parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ardetect.tmpdirs import HOST_TAG, process_gone, replaced_atomically

PARENT_ENV = "ARD_MLFLOW_PARENT_RUN_ID"


def find_root(start: Path | None = None) -> Path | None:
    """The repository root seen from ``start`` (the cwd by default): ``start`` itself when it holds
    ``params.yaml``, else the nearest folder above it that holds ``params.yaml`` beside ``dvc.yaml`` (as git
    and DVC find their repository from a subfolder); None when there is none. The CLI's default params file
    and the stages' MLflow store are found by this one rule."""
    here = (start or Path.cwd()).resolve()
    if (here / "params.yaml").is_file():
        return here
    for folder in here.parents:
        if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file():
            return folder
    return None


def repo_root(start: Path | None = None) -> Path:
    """``find_root(start)``, else ``start`` (the cwd) itself."""
    return find_root(start) or (start or Path.cwd()).resolve()


def tracking_uri(configured: str | None = None, root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the configured URI, else an absolute sqlite URI at the root.

    A configured sqlite URI with a relative path (``sqlite:///mlflow.db``, as MLflow's docs write it) is taken
    relative to the root, as the default is: every command and stage, from whichever folder, opens the same store.
    ``MLFLOW_TRACKING_URI`` is the caller's own, and relative to the working directory as MLflow reads it."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if configured:
        head = "sqlite:///"
        path, sep, query = configured[len(head):].partition("?")
        if configured.startswith(head) and path and not path.startswith("/") and path != ":memory:":
            return f"{head}{(root or repo_root()) / path}{sep}{query}"
        return configured
    return f"sqlite:///{(root or repo_root()) / 'mlflow.db'}"


def is_primary() -> bool:
    """Only the first process of a distributed (torchrun) job tracks; the others stay silent."""
    return os.environ.get("RANK", "0") == "0"


TRACKING_ENV = "ARD_TRACKING"


def enabled() -> bool:
    """MLflow tracking is on unless ``ARD_TRACKING=off``: a stage run alone (``python -m
    ardetect.stages.<name>``) on a machine without MLflow or its store still writes every output,
    and logs nothing (``export`` then registers nothing). Any other value than on/off is refused."""
    value = os.environ.get(TRACKING_ENV, "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{TRACKING_ENV}={os.environ[TRACKING_ENV]!r}: use 'on' or 'off'")
    return value == "on"


def tracks() -> bool:
    """Whether this process logs to MLflow: the first process of a job, with tracking on."""
    return is_primary() and enabled()


def require_enabled(what: str) -> None:
    """``what`` records to MLflow throughout: refuse it, saying what to do, when tracking is off."""
    if not enabled():
        raise ValueError(f"{TRACKING_ENV}=off, but {what} records every run to MLflow: unset {TRACKING_ENV}, or run the "
                         f"stages one by one (python -m ardetect.stages.<name>)")


class TrackingUnreachable(ConnectionError):
    """The configured MLflow tracking server does not answer."""


class TrackingStoreDamaged(TrackingUnreachable):
    """The sqlite file of the MLflow store is not a readable database."""


class TrackingStoreRefused(TrackingUnreachable):
    """The MLflow store cannot be used as it is set: a folder at its path, a file store MLflow 3 refuses, the
    experiment deleted."""


# a store up to this size gets SQLite's whole ``quick_check`` (about 3 ms a MB); a larger one its header only,
# so that a stage's start stays within milliseconds however many runs the store holds
STORE_FULL_CHECK_MAX_BYTES = 64 * 2**20
SQLITE_MAGIC = b"SQLite format 3\x00"
# stores this process found sound, each with the file's identity, change stamps and header then: a command that reads the
# store through several calls (`ard runs compare`: the target, then each run it resolves) checks an unchanged file once
_SOUND_STORES: dict[Path, tuple] = {}


def _store_stamp(db: Path) -> tuple:
    """What says a store file changed: its inode, size, modification and change times, and its 100-byte header (SQLite
    counts every committed write there, and a file written over has another one), since a file system whose clock
    ticks coarsely gives two writes within a tick the same times."""
    st = db.stat()
    with db.open("rb") as f:
        head = f.read(100)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, head


def store_header_problem(db: Path) -> str | None:
    """What the first 100 bytes of an SQLite file say is wrong with it, in constant time: not SQLite at all, or
    shorter than the pages its header counts (a copy or a write cut short). None when the header holds."""
    size = db.stat().st_size
    if size == 0:
        return None  # SQLite makes an empty file a new database
    with db.open("rb") as f:
        head = f.read(100)
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        return "file is not a database"
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages, changes, valid_for = (int.from_bytes(head[i:i + 4], "big") for i in (28, 24, 92))
    if pages and changes == valid_for and size < pages * page_size:  # the header's count is current (SQLite >= 3.7)
        return f"the file holds {size} bytes, its header counts {pages} pages of {page_size} bytes: it was cut short"
    return None


def check_store(db: Path, timeout: float = 5.0) -> None:
    """A sqlite MLflow store that exists must be a sound SQLite database, else ``TrackingStoreDamaged`` says so and
    what to do. MLflow met a damaged file (a disk that filled mid-write, a file copied in part, another file at that
    path) with an SQLAlchemy traceback. Every store's header is checked (``store_header_problem``); one up to
    ``STORE_FULL_CHECK_MAX_BYTES`` gets ``PRAGMA quick_check`` too, read-only. A store that another process holds
    locked is not damaged: MLflow waits for it as before."""
    import sqlite3

    if db.exists() and not db.is_file():
        raise TrackingStoreRefused(f"the MLflow store {db} ({_uri_source()}) is a folder, not a database file: give the "
                                   "path of a file (made on the first run), e.g. sqlite:///<folder>/mlflow.db")
    if not db.is_file():
        return
    key, stamp = db.resolve(), _store_stamp(db)
    if _SOUND_STORES.get(key) == stamp:  # found sound before, and not written since
        return
    problem = store_header_problem(db)
    try:
        if problem is None:
            every_page = db.stat().st_size <= STORE_FULL_CHECK_MAX_BYTES
            with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)) as con:
                rows = con.execute("PRAGMA quick_check" if every_page else "PRAGMA schema_version").fetchall()
            if every_page and [tuple(r) for r in rows] != [("ok",)]:
                problem = "; ".join(str(r[0]) for r in rows[:3])
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            return
        if "unable to open" in str(err):
            raise TrackingUnreachable(f"the MLflow store {db} cannot be opened ({err}): check that this process may read "
                                      "and write it and its folder") from None
        problem = str(err)
    except sqlite3.DatabaseError as err:
        problem = str(err)
    if problem is not None:
        raise TrackingStoreDamaged(
            f"the MLflow store {db} is not a readable SQLite database ({problem}). Move it aside (`mv {db} "
            f"{db}.damaged`) and run again to start a new store, or put a copy of it back; the pipeline's outputs are "
            "DVC's and stay as they are: only the runs the store listed are no longer listed"
        )
    _SOUND_STORES[key] = stamp


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """An http(s) tracking server must answer within ``timeout`` seconds, else ``TrackingUnreachable``
    names it at once (MLflow itself retries for minutes, then fails with a traceback). A sqlite store that
    exists must be readable (``check_store``); another file or database URI has nothing to reach."""
    db = sqlite_file(uri)
    if db is not None:
        check_store(db, timeout)
        return
    if _is_file_store(uri) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
        raise TrackingStoreRefused(
            f"the MLflow store {uri} ({_uri_source()}) is a folder store, which MLflow 3 refuses (its file backend is in "
            "maintenance mode): use a sqlite file, e.g. sqlite:///<folder>/mlflow.db (`mlflow migrate-filestore` moves old "
            "runs into one), or set MLFLOW_ALLOW_FILE_STORE=true to use it anyway")
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:  # it answered (a proxy asking for credentials, a server without /health): MLflow takes it from here
        return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        source = _uri_source()
        raise TrackingUnreachable(
            f"the MLflow tracking server {uri} ({source}) does not answer within {timeout:g} s ({reason}); start it, or set "
            f"{source} to a server that runs{'' if source == 'MLFLOW_TRACKING_URI' else ' (null: the sqlite mlflow.db at the repository root)'}"
        ) from None


def _uri_source() -> str:
    """Which setting the tracking URI came from, for a message."""
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.tracking_uri"


def _is_file_store(uri: str) -> bool:
    """A URI MLflow reads as its folder store: ``file:`` or a plain path (no scheme; ``databricks`` alone is not one)."""
    from urllib.parse import urlparse

    return uri.strip() != "databricks" and urlparse(uri).scheme in ("", "file")


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a sqlite database keeps its artifacts: ``mlruns`` beside the database file.
    MLflow would put them in ``mlruns`` of whatever folder the process that made the experiment ran in (a
    command run from a subfolder, a test run from the checkout); a server's or another store's URI: None (the
    store decides)."""
    db = sqlite_file(uri)
    return None if db is None else (db.resolve().parent / "mlruns").as_uri()


def sqlite_file(uri: str) -> Path | None:
    """The database file a ``sqlite:///`` URI names (relative: to the working directory); None for any other store."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + ":memory:"):
        return None
    return Path(uri[len(prefix):].split("?", 1)[0])


def use_experiment(uri: str, experiment: str):
    """MLflow pointed at ``uri`` with ``experiment`` active (made if missing, its artifacts beside a sqlite database)."""
    check_reachable(uri)
    import mlflow  # imported lazily: it takes seconds
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    location = artifact_location(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingStoreRefused(
            f"the experiment {experiment!r} in the MLflow store {uri} was deleted (in the MLflow UI, or `mlflow experiments "
            f"delete`): restore it (`MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id "
            f"{found.experiment_id}`), or set tracking.experiment to another name")
    if location is not None and found is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except MlflowException as err:  # another process made it first: theirs holds
            if mlflow.get_experiment_by_name(experiment) is None:
                raise err
    mlflow.set_experiment(experiment)
    return mlflow


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into ``a.b.c`` keys (lists become their JSON)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        else:
            out[name] = value
    return out


@contextmanager
def pipeline_run(
    experiment: str,
    uri: str,
    run_name: str = "pipeline",
    tags: dict[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    interruptions: tuple[type[BaseException], ...] = (),
) -> Iterator[Any]:
    """Open the parent run of one pipeline execution and export its id to child processes.

    ``params`` (the effective configuration, nested) is logged flattened, so parent
    runs compare param by param (``world.seed``, ``train_phase1.epochs``, ...).
    ``interruptions``: exceptions that end the run KILLED as Ctrl-C does (an orchestrator's own stop signal).
    """
    require_enabled("a pipeline run")
    mlflow = use_experiment(uri, experiment)
    close_abandoned_runs(uri, experiment)
    previous = os.environ.get(PARENT_ENV)
    with mlflow.start_run(run_name=run_name, tags={"ard.kind": "pipeline", **process_tags(), **(tags or {})}) as run:
        os.environ[PARENT_ENV] = run.info.run_id
        if params:
            log_params(params)
        try:
            with _killed_on_interrupt(mlflow, interruptions):
                yield run
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


@contextmanager
def stage_run(
    stage: str, experiment: str, uri: str, params: Mapping[str, Any] | None = None, system_metrics: bool = False
) -> Iterator[Any]:
    """A child run for one stage (nested under the pipeline's parent run when there is one); none when
    this process does not track (``tracks``)."""
    if not tracks():
        yield None
        return
    mlflow = use_experiment(uri, experiment)
    close_abandoned_runs(uri, experiment)
    parent = os.environ.get(PARENT_ENV)
    tags = {"ard.kind": "stage", "ard.stage": stage, **process_tags()}
    nested = mlflow.active_run() is not None  # in-process (the parent is this process's active run)
    with mlflow.start_run(
        run_name=stage, parent_run_id=parent, nested=nested, tags=tags, log_system_metrics=system_metrics or None
    ) as run:
        if params:
            log_params(params)
        with _killed_on_interrupt(mlflow):
            yield run


def process_tags() -> dict[str, str]:
    """Which process holds a run open: read back by :func:`close_abandoned_runs`."""
    return {"ard.host": HOST_TAG, "ard.pid": str(os.getpid())}


def close_abandoned_runs(uri: str, experiment: str | None = None, experiment_id: str | None = None) -> list[str]:
    """End as KILLED the experiment's runs still RUNNING whose process ran on this host and runs no more.

    A process killed without its clean-up (``kill -9``, the kernel's out-of-memory killer, a power cut) cannot
    close its run, which would read RUNNING for ever. Each run closed gets the tag ``ard.abandoned`` saying so;
    its end time is when it was found. Returns the run ids closed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if experiment_id is None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        experiment_id = found.experiment_id
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`ard.host` = '{HOST_TAG}'", max_results=1000
    )
    closed = []
    for run in runs:
        pid = run.data.tags.get("ard.pid", "")
        if not pid.isdigit() or int(pid) == os.getpid() or not process_gone(int(pid)):
            continue
        client.set_tag(run.info.run_id, "ard.abandoned", f"process {pid} ended without closing this run (killed: kill -9, out of "
                       f"memory or a power cut); found and closed by process {os.getpid()}")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


# exit codes of a process ended by SIGHUP, SIGINT or SIGTERM (the stages turn SIGTERM into SystemExit(143))
_SIGNAL_EXITS = (128 + 1, 128 + 2, 128 + 15)


@contextmanager
def _killed_on_interrupt(mlflow, interruptions: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """End the active run as KILLED, not FAILED, when Ctrl-C, SIGTERM or SIGHUP (or one of ``interruptions``) stops
    the block: nothing in the run went wrong, and running the pipeline again goes on from there."""
    try:
        yield
    except (KeyboardInterrupt, *interruptions):
        mlflow.end_run("KILLED")
        raise
    except SystemExit as stop:
        if stop.code in _SIGNAL_EXITS:
            mlflow.end_run("KILLED")
        raise


def metric_key(key: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / space``: ``recall@5`` becomes ``recall_at_5``."""
    return re.sub(r"[^\w\-. /]", "_", key.replace("@", "_at_"))


def log_params(params: Mapping[str, Any]) -> None:
    if not tracks():
        return
    import mlflow

    flat = {k: ("null" if v is None else v) for k, v in flatten(params).items()}
    items = list(flat.items())
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        mlflow.log_params(dict(items[i : i + 100]))


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    if not tracks():
        return
    import mlflow

    clean = {
        metric_key(k): float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if clean:
        mlflow.log_metrics(clean, step=step)


def set_tags(tags: Mapping[str, Any]) -> None:
    if not tracks():
        return
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    if not tracks():
        return
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dict(data: Mapping[str, Any], name: str) -> None:
    if not tracks():
        return
    import mlflow

    mlflow.log_dict(dict(data), name)


def write_json_atomic(data: Any, path: str | Path) -> Path:
    """Write JSON through a temp file in the same folder, then rename."""
    path = Path(path)
    with replaced_atomically(path) as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    return path


def _reader(uri: str, experiment: str):
    """MLflow pointed at ``uri`` to read ``experiment``, or None where there is nothing to read: a sqlite database
    file that does not exist, or a store without the experiment. A read makes neither (listing runs in a fresh
    checkout, or at a mistyped path, leaves no empty database and no experiment behind)."""
    check_reachable(uri)
    db = sqlite_file(uri)
    if db is not None and (not db.is_file() or db.stat().st_size == 0):  # an empty file: SQLite's empty database
        return None
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow if mlflow.get_experiment_by_name(experiment) is not None else None


def find_runs(experiment: str, uri: str, filter_string: str = "", max_results: int = 100):
    """Runs of the experiment as a DataFrame (``mlflow.search_runs``), newest first (empty where the store or the
    experiment does not exist yet)."""
    mlflow = _reader(uri, experiment)
    if mlflow is None:
        import pandas as pd

        return pd.DataFrame()
    return mlflow.search_runs(
        experiment_names=[experiment], filter_string=filter_string, max_results=max_results, order_by=["start_time DESC"]
    )


class RunNotFound(LookupError):
    """No run, or more than one, matches a run id or prefix; the message says which."""


def resolve_run(experiment: str, uri: str, ref: str) -> str:
    """The full id of the run ``ref`` names: a whole run id, or a prefix unique in the experiment."""
    mlflow = _reader(uri, experiment)
    ref = ref.strip().lower()
    if not ref:
        raise RunNotFound("an empty run id")
    runs = [] if mlflow is None else mlflow.search_runs(experiment_names=[experiment], max_results=100_000, output_format="list")
    ids = sorted({r.info.run_id for r in runs if r.info.run_id.startswith(ref)})
    if ref in ids:
        return ref
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise RunNotFound(f"no run with id or id prefix {ref!r} in experiment {experiment!r} at {uri}")
    shown = ", ".join(i[:12] for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
    raise RunNotFound(f"run id prefix {ref!r} is ambiguous: {len(ids)} runs match ({shown}); give more characters")


def get_run(uri: str, run_id: str):
    """An MLflow ``Run`` (info, params, metrics, tags) by its full id."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id)

