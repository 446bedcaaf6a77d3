#!/usr/bin/env bash
# The recipe study of docs/recipes.md: leave-one-subject-out cross-validation of every
# recipe in pipelines/study/recipes/ on a 6-subject synthetic cohort where every subject
# was scanned on its own scanner, then the table.
#
#   pipelines/study/run_study.sh [STUDY_DIR] [RECIPE ...]     (default: study/, every recipe)
#
# About 5-7 minutes per recipe on 2 CPU cores; finished recipes (and folds) are reused.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-study}"; shift || true
mkdir -p "$dir" && cd "$dir"
[ -f cohort/cohort.yaml ] || mrhscale synth cohort -n 6 --seed 18 --scanner-variation all -q
[ -f cohort.zarr/zarr.json ] || mrhscale ingest cohort/cohort.yaml -o cohort.zarr -q
names=("$@")
[ ${#names[@]} -gt 0 ] || names=($(cd "$here/recipes" && ls *.yaml | sed 's/\.yaml$//'))
for n in "${names[@]}"; do
  echo "== $n"
  mrhscale crossval cohort.zarr --target mbp --out "cv-$n" --recipe "$here/recipes/$n.yaml" --threads 2 -q
done
python "$here/table.py" .
