"""Test helpers: isolated git + DVC workspaces on a chosen profile, and the tools run inside them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=ardetect-tests", "-c", "user.email=tests@ardetect.invalid", *args],
        cwd=cwd, check=True, capture_output=True,
    )


def make_workspace(dest: Path, profile: str = "smoke", overrides: dict | None = None) -> Path:
    """Copy the pipeline definition into ``dest`` as a fresh git + DVC repository."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", "params.yaml"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("src", "profiles", "flows"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (dest / ".dvc").mkdir(exist_ok=True)
    shutil.copy2(REPO / ".dvc" / "config", dest / ".dvc" / "config")
    shutil.copy2(REPO / ".dvc" / ".gitignore", dest / ".dvc" / ".gitignore")
    shutil.copy2(REPO / ".gitignore", dest / ".gitignore")
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["profile"] = profile
    for dotted, value in (overrides or {}).items():
        node = params
        *path, last = dotted.split(".")
        for key in path:
            node = node[key]
        node[last] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "workspace")
    return dest


def run_env(ws: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{ws / 'mlflow.db'}"
    env.pop("MLFLOW_REGISTRY_URI", None)  # (mlflow.set_registry_uri in an earlier test exports it)
    env["PREFECT_HOME"] = str(ws / ".prefect")
    env.pop("ARD_MLFLOW_PARENT_RUN_ID", None)
    return env


def dvc(ws: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=ws, env=run_env(ws), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# A stage that waits to be stopped: it writes `started`, sleeps, and on Ctrl-C writes `interrupted` and exits 130.
SLEEPY = textwrap.dedent("""
    import sys, time
    open("started", "w").write("1")
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        open("interrupted", "w").write("1")
        sys.exit(130)
""")


def add_sleepy_stage(ws: Path, alone: bool = False) -> None:
    """Add the stage ``sleepy`` (``SLEEPY``) to the workspace's ``dvc.yaml``; ``alone``: the only stage there."""
    (ws / "sleepy.py").write_text(SLEEPY)
    pipeline = yaml.safe_load((ws / "dvc.yaml").read_text())
    stage = {"cmd": "python sleepy.py", "deps": ["sleepy.py"]}
    pipeline["stages"] = {"sleepy": stage} if alone else {**pipeline["stages"], "sleepy": stage}
    if alone:
        pipeline.pop("plots", None)
    (ws / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))


def probe_stage_script(name: str, clean_up: str, preamble: str = "") -> str:
    """A stage's script through ``run_stage`` (its own MLflow run, the stop signals handled): it writes a
    half-written output into a temp folder, then `started`, sleeps, and runs ``clean_up`` (Python lines) in a
    ``finally`` as it ends; ``preamble`` runs first (module level)."""
    return textwrap.dedent("""
        import threading, time
        from pathlib import Path
        from ardetect.stages import common
        from ardetect.stages.common import atomic_dir, run_stage
    """) + textwrap.dedent(preamble) + textwrap.dedent("""

        def body(cfg):
            try:
                with atomic_dir(Path("out")) as tmp:
                    (tmp / "half.txt").write_text("half-written")
                    Path("started").write_text("1")
                    time.sleep(120)
            finally:
        """) + textwrap.indent(textwrap.dedent(clean_up).strip(), " " * 8) + textwrap.dedent(f"""
            return {{}}

        run_stage({name!r}, body, lambda cfg: {{}})
    """)
