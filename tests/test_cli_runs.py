"""`ard runs list` and `ard runs compare` on pipeline parent runs built directly in a temp store."""

from __future__ import annotations

import contextlib
import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from ardetect import tracking
from ardetect.cli import app
from ardetect.pipeline import StageOutcome, record_parent_run

from workspace import REPO

EXPERIMENT = "ardetect"
STAGES = ["exemplars", "generate", "tuples", "validate", "world2", "train_phase1", "train_phase2", "train_abc", "evaluate"]


def _methods(ard: float, abc: float) -> dict:
    return {
        "ARD": {"recall@1": ard / 2, "recall@5": ard - 0.1, "recall@10": ard, "box_accuracy": 0.625},
        "ARD-": {"recall@1": 0.05, "recall@5": 0.1, "recall@10": 0.2, "box_accuracy": 0.5},
        "AbC": {"recall@1": abc / 2, "recall@5": abc - 0.05, "recall@10": abc, "box_accuracy": None},
        "chance": {"recall@1": 0.01, "recall@5": 0.05, "recall@10": 0.1, "box_accuracy": None},
    }


def _pipeline_run(root, uri, seed: int, ard: float, abc: float, ran: list[str]) -> str:
    """A parent run as `ard pipeline run` leaves it: params, stage tags, headline metrics from metrics.json."""
    metrics = {"test": _methods(ard, abc), "world2": _methods(ard / 2, abc / 2), "bars": {"ARD Recall@10 >= 0.5": ard >= 0.5}}
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports/metrics.json").write_text(json.dumps(metrics))
    params = {"profile": "smoke", "world": {"seed": seed, "n_concepts": 20}, "evaluate": {"max_queries": None}}
    with tracking.pipeline_run(EXPERIMENT, uri, run_name="pipeline [smoke]", tags={"ard.profile": "smoke"}, params=params) as run:
        with tracking.stage_run("tuples", EXPERIMENT, uri):
            tracking.log_metrics({"tuples": 40, "stage_seconds": 1.5, "peak_memory_mib": 812.4, "peak_child_memory_mib": 350.2})
        up = [s for s in STAGES if s not in ran]
        record_parent_run([StageOutcome("evaluate", 0, ran=ran, up_to_date=up)], root, 100.0 + seed, STAGES)
    return run.info.run_id


@pytest.fixture()
def store(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    a = _pipeline_run(root, uri, seed=1, ard=0.5, abc=0.25, ran=STAGES)
    b = _pipeline_run(root, uri, seed=7, ard=0.625, abc=0.25, ran=["exemplars", "generate", "evaluate"])
    return uri, a, b


def ard(*args: str, columns: int = 100):
    result = CliRunner().invoke(app, [*args], env={"COLUMNS": str(columns)}, catch_exceptions=False)
    return result


def _row(output: str, key: str) -> str:
    rows = [line for line in output.splitlines() if re.search(rf"(^|\s){re.escape(key)}(\s|$)", line)]
    assert len(rows) == 1, (key, output)
    return rows[0]


def test_parent_run_carries_params_tags_and_headline_metrics(store):
    uri, a, b = store
    run = tracking.get_run(uri, b)
    assert run.data.params["world.seed"] == "7" and run.data.params["evaluate.max_queries"] == "null"
    assert run.data.tags["ard.stages_ran"] == "exemplars,generate,evaluate"
    assert run.data.tags["ard.stages_up_to_date"] == "tuples,validate,world2,train_phase1,train_phase2,train_abc"
    assert run.data.tags["ard.bars_met"] == "1/1"
    m = run.data.metrics
    assert m["test.ARD.recall_at_10"] == 0.625 and m["test.AbC.recall_at_1"] == 0.125
    assert m["world2.ARD-.recall_at_5"] == pytest.approx(0.1)
    assert "test.AbC.box_accuracy" not in m  # null: skipped
    assert m["pipeline_seconds"] == 107.0 and m["stages_run"] == 3


def test_compare_marks_differences_and_hides_equal_rows(store):
    _, a, b = store
    result = ard("runs", "compare", a[:10], b[:10], "--params", str(REPO / "params.yaml"))
    assert result.exit_code == 0, result.output
    out = result.output
    seed = _row(out, "world.seed")
    assert seed.lstrip().startswith("*") and re.search(r"\b1\b.*\b7\b", seed)
    ard10 = _row(out, "test.ARD.recall_at_10")
    assert ard10.lstrip().startswith("*") and "0.5" in ard10 and "0.625" in ard10
    assert _row(out, "ard.stages_ran").lstrip().startswith("*")
    for equal in ("world.n_concepts", "test.AbC.recall_at_10", "ard.profile"):
        assert not re.search(rf"\s{re.escape(equal)}\s", out), equal  # equal rows hidden by default
    assert a in out and b in out  # both runs named in full above the table
    assert re.search(r"\d+ of \d+ params, metrics and tags differ", out)

    full = ard("runs", "compare", a, b, "--all", "--params", str(REPO / "params.yaml")).output
    n_concepts = _row(full, "world.n_concepts")
    assert not n_concepts.lstrip().startswith("*") and n_concepts.count("20") == 2
    assert _row(full, "world.seed").lstrip().startswith("*")


def test_compare_names_a_missing_or_ambiguous_run(store):
    _, a, b = store
    result = CliRunner().invoke(app, ["runs", "compare", a[:8], "feedbeef", "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 2
    assert "feedbeef" in result.output and "no run" in result.output
    assert "Traceback" not in result.output
    # a one-character prefix shared by two runs is ambiguous (16 hex digits: 17 runs always share one)
    import mlflow

    while True:
        ids = set(tracking.find_runs(EXPERIMENT, store[0], max_results=1000)["run_id"])
        shared = next((c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) > 1), None)
        if shared is not None:
            break
        with mlflow.start_run(run_name="filler"):
            pass
    amb = CliRunner().invoke(app, ["runs", "compare", shared, b, "--params", str(REPO / "params.yaml")])
    assert amb.exit_code == 2 and "ambiguous" in amb.output and repr(shared) in amb.output


@pytest.mark.parametrize("columns", [80, 120])
def test_list_shows_the_comparison_columns_only(store, columns):
    _, a, b = store
    result = ard("runs", "list", "--params", str(REPO / "params.yaml"), columns=columns)
    assert result.exit_code == 0, result.output
    out = result.output
    assert max(len(line) for line in out.splitlines()) <= columns
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.split()[:1] == ["run"])
    assert re.findall(r"\S+", lines[i - 1]) == ["ARD", "ARD", "ARD", "AbC", "AbC", "AbC", "ARD"]
    assert re.findall(r"\S+", lines[i]) == ["run", "name", "start", "status", "R@1", "R@5", "R@10",
                                            "R@1", "R@5", "R@10", "box", "secs"]
    rows = [line for line in out.splitlines() if line.startswith((a[:8], b[:8]))]
    assert [r[:8] for r in rows] == [b[:8], a[:8]]  # newest first; the stage child runs are not listed
    newest = re.findall(r"\S+", rows[0])
    assert newest[-8:] == ["0.312", "0.525", "0.625", "0.125", "0.200", "0.250", "0.625", "107"]
    assert "FINISHED" in rows[0]
    for unrelated in ("stages_run", "world2", "ARD-", "chance", "tuples"):
        assert unrelated not in out, unrelated


def test_list_stage_runs_and_limit(store):
    _, a, b = store
    out = ard("runs", "list", "--stage", "tuples", "--params", str(REPO / "params.yaml")).output
    header = next(line for line in out.splitlines() if "stage" in line and "secs" in line)
    assert re.findall(r"\S+", header) == ["run", "stage", "status", "start", "secs", "MiB", "worker", "parent"]
    rows = [line for line in out.splitlines() if " tuples " in line]
    assert len(rows) == 2 and all(r.split()[-4:-1] == ["1.5", "812", "350"] for r in rows)
    assert {r.split()[-1] for r in rows} == {a[:8], b[:8]}  # each under its parent run
    one = ard("runs", "list", "--limit", "1", "--params", str(REPO / "params.yaml")).output
    assert b[:8] in one and a[:8] not in one
    none = ard("runs", "list", "--stage", "evaluate", "--params", str(REPO / "params.yaml"))
    assert none.exit_code == 0 and "no runs of stage 'evaluate' yet" in none.output  # a stage of dvc.yaml, not run yet
    for typo in ("pretrian", "x'y"):  # a mistyped stage is named with the pipeline's; a quote once broke MLflow's filter
        wrong = ard("runs", "list", "--stage", typo, "--params", str(REPO / "params.yaml"))
        assert wrong.exit_code == 2 and (f"--stage {typo!r}: no runs, and not a stage of the pipeline (its stages: check, "
                                         "exemplars, generate,") in wrong.output, wrong.output


def test_listing_or_comparing_before_any_run_makes_no_store(tmp_path, monkeypatch):
    """A fresh checkout (or a mistyped store path) has nothing to list: said so, and no empty mlflow.db, no experiment
    and no mlruns/ are left behind by a command that only reads."""
    uri = f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    listed = ard("runs", "list", "--params", str(REPO / "params.yaml"))
    assert listed.exit_code == 0 and "no pipeline runs yet" in listed.output, listed.output
    compared = CliRunner().invoke(app, ["runs", "compare", "abc", "def", "--params", str(REPO / "params.yaml")])
    assert compared.exit_code == 2 and "no run with id or id prefix 'abc'" in compared.output, compared.output
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "mlruns").exists()
    # a store that exists but holds another experiment only: read, not given the experiment
    other = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.stage_run("tuples", "another", other):
        pass
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert ard("runs", "list", "--params", str(REPO / "params.yaml")).exit_code == 0
    import mlflow

    mlflow.set_tracking_uri(other)
    assert mlflow.get_experiment_by_name(EXPERIMENT) is None and mlflow.get_experiment_by_name("another") is not None


def test_a_damaged_store_is_named_with_what_to_do_and_left_as_it_was(tmp_path, monkeypatch):
    """A store file that is not a database, or one cut short (a disk that filled mid-write), is said to be so, with
    the command that moves it aside, by every command that opens it; none of them changes the file. MLflow met
    both with an SQLAlchemy traceback."""
    from ardetect.serve.loader import ModelNotFound, load_model

    sound = tmp_path / "sound.db"
    with tracking.stage_run("tuples", EXPERIMENT, f"sqlite:///{sound}"):
        tracking.log_metrics({"tuples": 40})
    tracking.check_reachable(f"sqlite:///{sound}")  # a sound store passes
    data = sound.read_bytes()
    damaged = {"not-a-database.db": b"garbage\n" * 100, "cut-short.db": data[: len(data) // 3]}
    monkeypatch.chdir(tmp_path)
    for name, content in damaged.items():
        db = tmp_path / name
        db.write_bytes(content)
        uri = f"sqlite:///{db}"
        with pytest.raises(tracking.TrackingStoreDamaged, match=rf"the MLflow store {re.escape(str(db))} is not a readable SQLite"):
            tracking.check_reachable(uri)
        with pytest.raises(tracking.TrackingUnreachable, match=re.escape(f"mv {db} {db}.damaged")):
            tracking.find_runs(EXPERIMENT, uri)
        with pytest.raises(tracking.TrackingStoreDamaged):
            with tracking.stage_run("tuples", EXPERIMENT, uri):
                pass
        with pytest.raises(ModelNotFound, match="is not a readable SQLite database"):
            load_model("models:/ardetect-detector@champion", tracking_uri=uri)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        for args in (["runs", "list"], ["runs", "list", "--stage", "tuples"], ["runs", "compare", "abc", "def"]):
            out = CliRunner().invoke(app, [*args, "--params", str(REPO / "params.yaml")])
            assert out.exit_code == 2 and "is not a readable SQLite database" in out.output, (name, args, out.output)
            assert "Traceback" not in out.output and "sqlalchemy" not in out.output.lower(), out.output
        assert db.read_bytes() == content, name  # read only


def test_a_command_checks_an_unchanged_store_once_and_a_store_written_since_again(store, monkeypatch):
    """`ard runs compare` read the store through three calls (the target, then each run it resolves), and each
    checked every page of it again. An unchanged file is now checked once a process; one written since, again."""
    import sqlite3

    uri, a, b = store
    db = tracking.sqlite_file(uri)
    checked = []
    real = tracking.store_header_problem
    monkeypatch.setattr(tracking, "store_header_problem", lambda path: checked.append(path) or real(path))
    tracking._SOUND_STORES.clear()
    result = ard("runs", "compare", a[:10], b[:10], "--params", str(REPO / "params.yaml"))
    assert result.exit_code == 0 and "params, metrics and tags differ" in result.output, result.output
    assert checked == [db]
    assert ard("runs", "list", "--params", str(REPO / "params.yaml")).exit_code == 0
    assert checked == [db]
    with contextlib.closing(sqlite3.connect(db)) as con:  # another process writes the store: its stamps move
        con.execute("CREATE TABLE written_since (a INTEGER)")
        con.commit()
    tracking.check_store(db)
    assert checked == [db, db]
    data = db.read_bytes()
    db.write_bytes(b"x" * len(data))  # the same size, damaged since its last check: still found
    with pytest.raises(tracking.TrackingStoreDamaged, match="file is not a database"):
        tracking.check_store(db)


def test_a_large_store_gets_its_header_checked_and_a_small_one_every_page(tmp_path, monkeypatch):
    """The whole check reads every page (about 3 ms a MB, at each stage's start): a store above
    STORE_FULL_CHECK_MAX_BYTES gets its header checked only, which still names a file that is no database or one
    cut short. A page damaged inside a small store is found; inside a large one it is left to MLflow."""
    import sqlite3

    sound = tmp_path / "sound.db"
    with contextlib.closing(sqlite3.connect(sound)) as con:
        con.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT)")
        con.execute("CREATE INDEX ib ON t (b)")
        con.executemany("INSERT INTO t (b) VALUES (?)", [(f"{i:032x}" * 2,) for i in range(20000)])
        con.commit()
    data = sound.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    inner = tmp_path / "inner-page.db"
    inner.write_bytes(data[: 4 * page] + b"\xff" * 8 + data[4 * page + 8:])  # page 5's b-tree header
    cut = tmp_path / "cut.db"
    cut.write_bytes(data[: len(data) // 2])
    other = tmp_path / "other.db"
    other.write_bytes(b"x" * len(data))
    assert len(data) > 1_000_000
    tracking.check_store(sound)
    with pytest.raises(tracking.TrackingStoreDamaged, match="inner-page.db is not a readable SQLite database"):
        tracking.check_store(inner)
    monkeypatch.setattr(tracking, "STORE_FULL_CHECK_MAX_BYTES", 100_000)
    tracking.check_store(sound)
    tracking.check_store(inner)  # beyond the bound: the header holds, the page is not read
    with pytest.raises(tracking.TrackingStoreDamaged, match=rf"holds {len(data) // 2} bytes, its header counts {len(data) // page} pages"):
        tracking.check_store(cut)
    with pytest.raises(tracking.TrackingStoreDamaged, match=r"file is not a database\). Move it aside"):
        tracking.check_store(other)


def test_a_store_another_process_holds_locked_is_not_called_damaged(tmp_path):
    import sqlite3

    db = tmp_path / "mlflow.db"
    with tracking.stage_run("tuples", EXPERIMENT, f"sqlite:///{db}"):
        pass
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # a writer mid-transaction: readers wait, and here give up
        tracking.check_store(db, timeout=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.parametrize("uri, said", [
    ("file:///{tmp}/mlruns", "is a folder store, which MLflow 3 refuses"),
    ("{tmp}/mlruns", "is a folder store, which MLflow 3 refuses"),  # a bare path: MLflow's old default form
    ("sqlite:///{tmp}/a_folder", "is a folder, not a database file"),
])
def test_a_store_mlflow_cannot_use_is_one_line_not_a_traceback(tmp_path, monkeypatch, uri, said):
    (tmp_path / "a_folder").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for args in (["runs", "list"], ["runs", "compare", "abc", "def"], ["models", "list"]):
        r = CliRunner().invoke(app, [*args, "--params", str(REPO / "params.yaml")])
        assert r.exit_code == 2, (args, r.output)
        assert said in r.output and "MLFLOW_TRACKING_URI" in r.output and "Traceback" not in r.output, (args, r.output)
    assert not (tmp_path / "mlruns").exists()


def test_registry_commands_make_no_store_where_there_is_none(tmp_path, monkeypatch):
    """`ard models list` and `promote` built an MLflow client, which made the database (and its folder) at a fresh
    checkout's or a mistyped path."""
    db = tmp_path / "nodir" / "m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    for args in (["models", "list"], ["models", "promote", "3"]):
        r = CliRunner().invoke(app, [*args, "--params", str(REPO / "params.yaml")])
        assert r.exit_code == 1 and f"no MLflow store at {db}" in r.output, (args, r.output)
    assert not (tmp_path / "nodir").exists()


def test_an_empty_store_file_is_read_as_no_store_and_left_empty(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    db.touch()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    r = ard("runs", "list", "--params", str(REPO / "params.yaml"))
    assert r.exit_code == 0 and "no pipeline runs yet" in r.output, r.output
    assert db.stat().st_size == 0 and not (tmp_path / "mlruns").exists()


def test_a_deleted_experiment_and_a_refused_filter_are_named(store, monkeypatch):
    import mlflow

    uri, _, _ = store
    r = CliRunner().invoke(app, ["models", "list", "--name", "x'y", "--params", str(REPO / "params.yaml")])
    assert r.exit_code == 2 and r.output.startswith(f"error: the MLflow store {uri}:") and "Traceback" not in r.output, r.output
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    mlflow.delete_experiment(experiment.experiment_id)
    with pytest.raises(tracking.TrackingStoreRefused, match=rf"experiment 'ardetect' in the MLflow store {re.escape(uri)} was "
                       rf"deleted .*--experiment-id {experiment.experiment_id}"):
        tracking.use_experiment(uri, EXPERIMENT)
