#!/usr/bin/env bash
# The GPU checks and measurements in one command, for a CUDA machine held for a few minutes:
#   1. tests/train/test_device.py (its GPU tests: the whole training on cuda, and one step against the CPU's);
#   2. bench/bench_train_gpu.py: the README's GPU recipe (T-B fp32 and bf16 at batches 16 and 64, B-B bf16
#      at 16 and fp32 at 64);
#   3. bench/bench_model_gpu.py: B-B at 800x1333 against transformers' GroundingDINO;
#   4. bench/bench_customize_gpu.py: the customization steps at Stable Diffusion 2.1-base size.
# CHECKS="name ..." runs only those named (the names below). Each runs under its own time limit, the
# whole within BUDGET_S seconds (default 480); one that would not fit the time left is skipped and
# says so. Each one's whole output goes to OUTDIR/<name>.log, and the lines that carry its figures
# are printed.
#
# Usage: bench/gpu_checks.sh [OUTDIR]   with python3 (or $PYTHON) holding the project's packages
# and src/ on PYTHONPATH, e.g. `PYTHONPATH=src bench/gpu_checks.sh gpu-checks`.
set -u
out=${1:-gpu-checks}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
deadline=$(( $(date +%s) + ${BUDGET_S:-480} ))

run() {  # run NAME LIMIT_S PATTERN COMMAND...: PATTERN picks the lines printed from its log
  local name=$1 limit=$2 pattern=$3 left start rc
  shift 3
  if [[ -n "${CHECKS:-}" && " $CHECKS " != *" $name "* ]]; then return; fi
  left=$(( deadline - $(date +%s) ))
  if (( left < 20 )); then echo "== $name: skipped, ${left} s of the budget left"; return; fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit} s): $*"
  start=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s$( ((rc == 124)) && echo ' (its limit)')"
  grep -E "$pattern" "$out/$name.log" | tail -n 25
  ((rc == 0)) || tail -n 15 "$out/$name.log"
}

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
exit 0
