#!/usr/bin/env bash
# Wheels for bench/gpu_check.py on a GPU machine that has torch and some transformers but nothing
# else and no network: DeepSpeed (built here: PyPI has only its source), its dependencies, pydantic,
# typer/rich for fpm's command line, accelerate for transformers.Trainer. Compiled ones
# (pydantic-core, msgpack) for every CPython in $PYS; psutil (abi3) and ninja are version-free.
#
#   bench/gpu_wheels.sh            # -> bench/wheels/ (git-ignored, ~15 MB)
#
# Then carry bench/wheels with the checkout (the device tool's `carry`), and gpu_check.py installs
# them with `pip install --no-index --find-links bench/wheels --target bench/.gpu_deps` when
# `import deepspeed` (or pydantic, typer, rich, accelerate) fails there. fpm itself runs from the
# checkout (PYTHONPATH), so the GPU machine's torch and transformers are the ones tested.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
OUT=bench/wheels
PYS="${PYS:-3.10 3.11 3.12 3.13}"
PLAT=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)
mkdir -p "$OUT"
"$PIP" download --quiet --no-deps --only-binary=:all: -d "$OUT" \
  hjson==3.1.0 py-cpuinfo==9.0.0 einops==0.8.2 pydantic==2.14.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0 typer==0.29.2 click==8.5.1 rich==15.0.0 \
  shellingham==1.5.4 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 accelerate==1.15.0
"$PIP" download --quiet --no-deps --only-binary=:all: "${PLAT[@]}" -d "$OUT" psutil==7.2.2 ninja==1.13.2
for py in $PYS; do
  "$PIP" download --quiet --no-deps --only-binary=:all: "${PLAT[@]}" --python-version "$py" -d "$OUT" \
    pydantic-core==2.50.5 msgpack==1.2.4
done
# DeepSpeed's setup imports torch: build against the venv's (the wheel itself is pure Python, ops JIT-built)
[ -n "$(ls "$OUT"/deepspeed-0.19.8-*.whl 2>/dev/null)" ] || \
  "$PIP" wheel --quiet --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8
ls -la "$OUT" | awk '{s += $5} END {printf "bench/wheels: %.1f MB\n", s / 1e6}'
