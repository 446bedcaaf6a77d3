#!/usr/bin/env bash
# Run a recipe end to end on one machine (or against a Dask cluster):
#   pipelines/run_recipe.sh RECIPE.yaml MANIFEST.yaml WORKDIR [--from-model AF_MODEL.pt]
# Environment: SCHEDULER=tcp://host:8786 joins a Dask cluster for the Dask stages;
# NPROC=N trains with torchrun on N local processes/GPUs; EXTRA_TRAIN="--epochs 1"
# and EXTRA_PATCHES="--stride 4" pass extra flags (they override the recipe).
set -euo pipefail
recipe=$1; manifest=$2; work=$3; shift 3
base_model=""
if [ "${1:-}" = "--from-model" ]; then base_model=$2; shift 2; fi
mrh=${MRHSCALE:-mrhscale}
sched=()
[ -n "${SCHEDULER:-}" ] && sched=(--scheduler "$SCHEDULER")
mkdir -p "$work"
$mrh ingest "$manifest" --out "$work/cohort.zarr" --config "$recipe" "${sched[@]}" ${EXTRA_INGEST:-}
$mrh patches "$work/cohort.zarr" --out "$work/patches.zarr" --config "$recipe" "${sched[@]}" ${EXTRA_PATCHES:-}
if [ -n "$base_model" ]; then
  stage=(finetune "$base_model" "$work/patches.zarr")
else
  stage=(train "$work/patches.zarr")
fi
if [ "${NPROC:-1}" -gt 1 ]; then
  torchrun --standalone --nproc_per_node="$NPROC" -m mrhscale "${stage[@]}" --out "$work/run" --config "$recipe" ${EXTRA_TRAIN:-}
else
  $mrh "${stage[@]}" --out "$work/run" --config "$recipe" ${EXTRA_TRAIN:-}
fi
$mrh predict "$work/run/model.pt" "$work/cohort.zarr" --out "$work/pred.zarr" --nifti "$work/nifti" --config "$recipe" "${sched[@]}" ${EXTRA_PREDICT:-}
echo "model: $work/run/model.pt  predictions: $work/pred.zarr  NIfTI: $work/nifti"
