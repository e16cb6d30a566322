#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a GPU check: puts into .whl/ (git-ignored) the wheels that the
# GPU machine lacks (it has torch, transformers, safetensors, tensorboard, ...; no network). Pure-Python
# wheels at this project's pinned versions, and pydantic-core built for the GPU machine's Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
pin() { grep -i "^$1==" constraints.txt | cut -d= -f3; }
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# DeepSpeed publishes only a source archive: build its wheel (pure Python; CUDA ops JIT-build there).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(pin deepspeed)"
"$PY" -m pip download -q --no-deps -d .whl "diffusers==$(pin diffusers)" "webdataset==$(pin webdataset)" \
    "peft==$(pin peft)" hjson==3.1.0 braceexpand==0.1.7 importlib_metadata==10.2.0 pydantic==2.14.4 \
    annotated_types typing_inspection
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic_core==2.50.5
ls -la .whl
du -sh .whl
