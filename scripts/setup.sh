#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with the pinned dependencies, and
# the compiled kernels (C++ always; CUDA wherever nvcc is found). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST for the examples and the training tests (Debian's package; MNIST itself can only
# be downloaded). Installed when we are root and it is missing; otherwise say how to get it.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
      (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null)) ||
      echo "warning: could not install dataset-fashion-mnist" >&2
  else
    echo "note: 'apt-get install dataset-fashion-mnist' (as root) provides Fashion-MNIST offline" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt

# The compiled kernels: rebuilt when a C++/CUDA source or setup.py changed since the last build
# (the stamp is the hash of those files), so running this script again costs seconds.
stamp=.venv/lowp-build-stamp
sources_hash=$(cat setup.py cpp/* | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sources_hash" ] && .venv/bin/python -c "import lightning_lowp" 2>/dev/null; then
  echo "lightning_lowp kernels are up to date"
  exit 0
fi
# torch finds nvcc through CUDA_HOME; the nvcc on PATH may be a wrapper script.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
# Without a GPU to detect, build for Hopper (and PTX, which later GPUs compile at load time);
# torch would otherwise build every arch.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && ! nvidia-smi >/dev/null 2>&1; then export TORCH_CUDA_ARCH_LIST="9.0+PTX"; fi
export MAX_JOBS=${MAX_JOBS:-2}
echo "building lightning_lowp (CUDA_HOME=${CUDA_HOME:-none}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-auto})"
.venv/bin/python -m pip install --quiet --no-build-isolation -e .
.venv/bin/python -c "import lightning_lowp.ops as o; print('lightning_lowp ready; CUDA kernels built:', o.BUILT_WITH_CUDA)"
echo "$sources_hash" > "$stamp"
