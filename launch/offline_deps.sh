#!/usr/bin/env bash
# The project's dependencies that a GPU host image with JAX (CUDA), flax, optax, orbax, transformers,
# tokenizers, safetensors, scipy and pillow lacks, installed for that host's Python into build/devdeps.
# For a host without network access: build here, copy (or carry) build/devdeps there; gpu_check.sh puts it
# on PYTHONPATH.  Usage: bash launch/offline_deps.sh [python version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
rm -rf build/devdeps
python3 -m pip install -q --target build/devdeps --python-version "$PYVER" --only-binary=:all: --no-deps \
  grain array-record ml-collections portpicker tensorboardX
echo "build/devdeps for Python $PYVER: $(du -sh build/devdeps | cut -f1)"
