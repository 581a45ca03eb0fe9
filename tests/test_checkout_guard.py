"""The suite's guard against tests that write into the checkout (tests/checkout.py, used by tests/conftest.py)."""

import subprocess

from checkout import allowed_folders, checkout_extras, left_in_checkout


def test_what_a_run_left_in_a_checkout_is_named_less_caches_and_allowed_folders(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/mlruns/\n/.ci/out/\n__pycache__/\n")
    for tracked in ("kept.txt", ".ci/run", "src/m.py"):  # folders git knows, as in the project's checkout
        (repo / tracked).parent.mkdir(parents=True, exist_ok=True)
        (repo / tracked).write_text("tracked")
    subprocess.run(["git", "-C", str(repo), "add", "."], check=True)
    (repo / "mine.txt").write_text("there before the run")
    before = checkout_extras(repo)
    assert before == {"mine.txt"}
    for made in ("mlruns/1/a.json", "reports/.evaluate-work/x.pt", "src/__pycache__/m.pyc", ".ci/out/page.png"):
        (repo / made).parent.mkdir(parents=True, exist_ok=True)
        (repo / made).write_text("x")
    after = checkout_extras(repo)
    allowed = allowed_folders(str(repo / ".ci" / "out"), str(tmp_path / "elsewhere"), None, root=repo)
    assert allowed == (".ci/out/",)
    assert left_in_checkout(before, after, allowed) == ["mlruns/", "reports/"]
    assert left_in_checkout(after, after) == []
    assert checkout_extras(tmp_path / "no-repo-here") is None
