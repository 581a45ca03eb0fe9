#!/usr/bin/env bash
# The README's GPU recipe, stage by stage, each stage timed: for a lent GPU machine that has neither DVC
# nor MLflow. The stages run as DVC runs them (python -m ardetect.stages.<name>, in dvc.yaml's order),
# with tracking off (ARD_TRACKING=off: every output written, nothing logged) and the recipe's settings
# written into params.yaml for the run; params.yaml is put back as it was when the script ends.
#
# Usage: PYTHONPATH=src bench/gpu_recipe.sh OUTDIR [STAGE...]   (default: exemplars through evaluate; name export
#   to run it too: with tracking off it writes the ONNX graphs and registers nothing)
#   RECIPE="key=value ..."  the settings (default: the README's recipe, "On a GPU"); a value is YAML
#   STOP_AFTER_S=N          start no stage after N seconds; a second call with the same OUTDIR goes on from there
#                           (a stage that finished in OUTDIR/times.tsv is not run again; a stopped pretrain resumes;
#                           a call killed outright left params.yaml with the recipe: the next call puts it back first)
# Writes OUTDIR/<stage>.log, OUTDIR/times.tsv (stage, exit code, seconds) and, after evaluate, a copy of
# reports/results.md and reports/metrics.json. Stops at the first stage that fails.
set -u
out=${1:?usage: bench/gpu_recipe.sh OUTDIR [STAGE...]}
shift
stages=("$@")
((${#stages[@]})) || stages=(exemplars generate tuples validate world2 pretrain train_phase1 train_phase2 train_abc train_abc_ard evaluate)
RECIPE=${RECIPE:-"model.size=T-B model.image_size=null model.overrides.num_queries=300 model.device=cuda pretrain.batch_size=64 pretrain.precision=bf16 pretrain.lr=0.0001 pretrain.lr_backbone=0.0001 pretrain.classify_lr=0.0003 pretrain.loader_workers=4 train_phase1.batch_size=32 train_phase1.lr=0.0001 train_phase1.lr_backbone=0.0001 train_phase1.loader_workers=4 train_phase2.loader_workers=4"}
py=${PYTHON:-python3}
mkdir -p "$out"
if [[ -f "$out/recipe.txt" && "$(cat "$out/recipe.txt")" != "$RECIPE" ]]; then
  echo "$out holds a run of another recipe ($(cat "$out/recipe.txt")): give this one another OUTDIR" >&2; exit 1
fi
export ARD_TRACKING=off HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 GX_ANALYTICS_ENABLED=False

# a call killed outright (kill -9, the machine taken back) could not put params.yaml back: it still holds that
# call's recipe file, and the file saved before it is the user's, which must not be overwritten with the recipe's
if [[ -f "$out/params.yaml.orig" && -f "$out/params.yaml.recipe" ]] && cmp -s params.yaml "$out/params.yaml.recipe"; then
  echo "params.yaml holds the recipe of a call that did not end: putting back $out/params.yaml.orig first"
  cp "$out/params.yaml.orig" params.yaml || exit 1
fi
cp params.yaml "$out/params.yaml.orig" || exit 1
trap 'cp "$out/params.yaml.orig" params.yaml' EXIT
trap 'exit 143' TERM  # a stopped run puts params.yaml back too (the stage itself exits cleanly on SIGTERM)
trap 'exit 130' INT
# shellcheck disable=SC2086
"$py" - $RECIPE <<'EOF' || exit 1
import sys, yaml
from ardetect.config import load_config
params = yaml.safe_load(open("params.yaml"))
for item in sys.argv[1:]:
    key, sep, value = item.removeprefix("++").partition("=")
    if not sep:
        sys.exit(f"RECIPE: {item!r} is not key=value")
    *parents, leaf = key.split(".")
    node = params
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)
with open("params.yaml", "w") as f:
    yaml.safe_dump(params, f, sort_keys=False)
load_config("params.yaml")  # a setting the configuration refuses stops here, naming it
print("recipe:", " ".join(sys.argv[1:]))
EOF
echo "$RECIPE" >"$out/recipe.txt"  # the stages in times.tsv are this recipe's
cp params.yaml "$out/params.yaml.recipe" || exit 1

start_all=$(date +%s)
for stage in "${stages[@]}"; do
  if [[ -f "$out/times.tsv" ]] && awk -F'\t' -v s="$stage" '$1 == s && $2 == 0 {f = 1} END {exit !f}' "$out/times.tsv"; then
    echo "== $stage: done in an earlier call ($out/times.tsv)"; continue
  fi
  if [[ -n "${STOP_AFTER_S:-}" ]] && (( $(date +%s) - start_all >= STOP_AFTER_S )); then
    echo "== $stage: not started, ${STOP_AFTER_S} s spent"; exit 0
  fi
  start=$(date +%s)
  "$py" -m "ardetect.stages.$stage" >"$out/$stage.log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  printf '%s\t%s\t%s\n' "$stage" "$rc" "$secs" >>"$out/times.tsv"
  echo "== $stage: exit $rc after $secs s"
  if ((rc != 0)); then tail -n 20 "$out/$stage.log"; exit "$rc"; fi
done
if [[ -f reports/results.md && " ${stages[*]} " == *" evaluate "* ]]; then
  cp reports/results.md reports/metrics.json "$out/"
  head -n 40 reports/results.md
fi
