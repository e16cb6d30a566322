#!/bin/bash
# Rerun stages of a finished run in a new folder, from the same start: what the run made before them (config,
# grid prompts, shards, the toy base, the teacher, the earlier stages' exports and their phases) is copied,
# then `trainer.run --jobs` trains the named stages with the given overrides. Kept phases (KEEP="stage5_1.0_mse")
# are copied too, so that only the phases after them run again.
#   [PY=.venv/bin/python] [KEEP="phase ..."] bash bench/rerun_stage.sh SRC DEST STAGE[,STAGE...] [--set key=value ...]
set -e
PY=${PY:-.venv/bin/python}
src=$1 dest=$2 stages=$3
shift 3
first=$(echo "${stages%%,*}" | sed -n 's/^stage\([0-9]*\)_.*/\1/p')
[ -n "$first" ] || { echo "rerun_stage.sh: '$stages' does not start with a stageN_... name" >&2; exit 2; }
rm -rf "$dest"
mkdir -p "$dest/exports" "$dest/jobs"
cp -a "$src"/{config.yaml,grid_prompts.safetensors} "$dest"/
for folder in shards base; do
  [ -d "$src/$folder" ] && cp -a "$src/$folder" "$dest/"
done
for made in "$src"/exports/* "$src"/jobs/*; do  # the teacher and every stage before the first rerun one
  name=$(basename "$made")
  number=$(echo "$name" | sed -n 's/^stage\([0-9]*\)_.*/\1/p')
  if [ -z "$number" ] || [ "$number" -lt "$first" ]; then
    cp -a "$made" "$dest/$(basename "$(dirname "$made")")/"
  fi
done
for phase in $KEEP; do  # e.g. stage5_1.0_mse: jobs/stage5_1/stage5_1.0_mse
  mkdir -p "$dest/jobs/${phase%%.*}"
  cp -a "$src/jobs/${phase%%.*}/$phase" "$dest/jobs/${phase%%.*}/"
done
exec "$PY" -m trainer.run --config "$src/config.yaml" --set run.out_dir="$dest" --jobs "$stages" "$@"
