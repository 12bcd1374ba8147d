#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that a GPU box without them needs to run
# scripts/gpu_check.sh, into .whl/ (git-ignored; carry it to the box with the repository).
#
# Written for this project's H200 machines (.library/device/KINDS.md): Python 3.12 with torch 2.11,
# transformers 5.17, pyarrow, Pillow, PyYAML, fsspec and pytest, but no diffusers, pydantic or Ray.
# Other boxes: PYVER=3.11 scripts/gpu_wheels.sh, and check that the list below covers what they lack.
set -euo pipefail
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PIP=${PIP:-python3 -m pip}
platforms=()
for n in 2_28 2_27 2_17; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64)
rm -rf "$DEST" && mkdir -p "$DEST"
# The versions this repository is tested with (pyproject.toml and its lock of the test venv).
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}" \
    -d "$DEST" \
    diffusers==0.42.1 importlib-metadata==10.2.0 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
# torchao for the benchmark's fp8 mode (model.fp8): the release paired with the box's torch (2.11 there;
# TORCHAO=0.18.0 beside torch 2.13). Its float8 linear layers need only torch's _scaled_mm, not its C++ kernels.
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${platforms[@]}" \
    -d "$DEST" "torchao==${TORCHAO:-0.17.0}"
ls -l "$DEST"
du -sh "$DEST"
