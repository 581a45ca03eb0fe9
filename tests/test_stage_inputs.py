"""How a stage input's change while the stage ran is told (``ardetect.stage_inputs``)."""

from __future__ import annotations

from types import SimpleNamespace

from ardetect.stage_inputs import InputState, changed_files, changed_keys, describe_change, watch_own_inputs


def _state(value, files=None) -> InputState:
    return InputState(None, SimpleNamespace(value=value), files)


def test_params_changes_are_named_by_their_dotted_keys():
    before = {"world": {"seed": 0, "n": 3}, "model": {"size": "T"}}
    after = {"world": {"seed": 10, "n": 3}, "model": {"size": "T", "extra": 1}}
    assert changed_keys(before, after) == ["model.extra", "world.seed"]
    assert describe_change("params.yaml", _state(before), _state(after)) == "params.yaml (model.extra, world.seed)"
    assert describe_change("params.yaml", _state(before), _state(before)) is None


def test_a_folder_names_the_files_edited_added_or_removed_in_it_three_at_most():
    before = {"a.py": "1", "b.py": "1", "c.py": "1", "d.py": "1", "sub/e.py": "1"}
    after = {"a.py": "2", "b.py": "1", "c.py": "1", "sub/e.py": "2", "new.py": "1"}
    assert changed_files(before, after) == ["a.py", "d.py", "new.py", "sub/e.py"]
    said = describe_change("src/pkg", _state("x.dir", before), _state("y.dir", after))
    assert said == "src/pkg (a.py, d.py, new.py, ... 1 more)"
    assert describe_change("src/pkg", _state("x.dir", before), None) == "src/pkg (removed)"
    assert describe_change("lib.py", _state("x"), _state("y")) == "lib.py"  # a file: its name says it


def test_only_a_stage_that_dvc_runs_outside_the_pipeline_watches_its_own_inputs(monkeypatch, tmp_path):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert watch_own_inputs() is None  # run by hand: no dvc.lock to keep right
    monkeypatch.setenv("DVC_STAGE", "made")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("ARDETECT_INPUTS_WATCHED", "1")
    assert watch_own_inputs() is None  # the pipeline's DVC child checks the stage itself
    monkeypatch.delenv("ARDETECT_INPUTS_WATCHED")
    assert watch_own_inputs() is None  # no DVC repository there: DVC itself says so when it runs the stage


def test_a_stage_that_dvc_runs_on_its_own_names_the_input_edited_while_it_ran(monkeypatch, tmp_path):
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True).close()
    (tmp_path / "dvc.yaml").write_text("stages:\n  made:\n    cmd: echo made\n    deps: [in.txt, lib]\n")
    (tmp_path / "in.txt").write_text("one")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.py").write_text("x = 1")
    monkeypatch.setenv("DVC_STAGE", "made")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("ARDETECT_INPUTS_WATCHED", raising=False)
    moved = watch_own_inputs()
    assert callable(moved) and moved() == []  # nothing edited yet
    (tmp_path / "in.txt").write_text("two")
    (tmp_path / "lib" / "a.py").write_text("x = 2")
    assert moved() == ["in.txt", "lib (a.py)"]
    monkeypatch.setenv("ARDETECT_INPUTS_WATCHED", "1")  # the same stage under the pipeline: its DVC child watches
    assert watch_own_inputs() is None
