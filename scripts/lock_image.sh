#!/usr/bin/env bash
# Rewrite infra/docker/requirements.lock: the package's runtime dependencies (no test extras), as
# pip resolves them in a clean venv, pinned. torch is left out (the image installs its CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q ".[gcs]"   # the image reads gs:// too
{
  echo "# Runtime dependencies of the engine's image, pinned (infra/docker/Dockerfile installs these before"
  echo "# the package, in a layer of their own: a code change rebuilds only the package's layer)."
  echo "# Regenerate: scripts/lock_image.sh (a clean venv with the package installed, pip freeze)."
  echo "# torch is not here: the image takes its CUDA build from PyTorch's index."
  "$venv/bin/pip" freeze | grep -v -e "^kandinsky-engine @" -e "^torch=="
} > infra/docker/requirements.lock
echo "wrote infra/docker/requirements.lock"
