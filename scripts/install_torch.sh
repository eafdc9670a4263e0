#!/bin/sh
# Install the right torch build into the virtual environment whose python is $1, before anything
# else asks for torch: PyPI's Linux wheels are CUDA builds of several GB, which a machine without an
# NVIDIA GPU does not want. A range such as torch>=2.5 in pyproject.toml is then already satisfied.
set -eu
PY="$1"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if [ "$(uname -s)" != "Linux" ] || nvidia-smi >/dev/null 2>&1; then
    echo "installing torch==$TORCH_VERSION (CUDA build on Linux with an NVIDIA GPU; the platform build elsewhere)"
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
elif "$PY" -m pip download -q --no-deps --no-index -d "${TMPDIR:-/tmp}/studio-torch-probe" "torch==$TORCH_VERSION" >/dev/null 2>&1 \
     && ls "${TMPDIR:-/tmp}/studio-torch-probe" | grep -q "torch-$TORCH_VERSION+cpu"; then
    echo "no NVIDIA GPU: installing the CPU build of torch==$TORCH_VERSION found locally"
    "$PY" -m pip install -q "torch==$TORCH_VERSION"
else
    echo "no NVIDIA GPU: installing the CPU build of torch==$TORCH_VERSION from the PyTorch CPU index"
    "$PY" -m pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi
