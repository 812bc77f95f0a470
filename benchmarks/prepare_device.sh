#!/usr/bin/env bash
# Prebuilds, on a machine without a GPU, everything the GPU machine's check needs (it must never compile):
# our wheel for python3.12 + torch 2.11.0 + sm_90, and mamba-ssm's scan module for comparison, both into
# the git-ignored folder .device/ that the device run carries. Usage: benchmarks/prepare_device.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-/work/venvs/gpu312/bin/python}
"$PYTHON" -c 'import sys, torch; assert sys.version_info[:2] == (3, 12), sys.version; print("torch", torch.__version__)'
rm -rf .device/wheels build
mkdir -p .device/wheels
# Generic CPU code (the GPU machine's CPU is not this one); CUDA for Hopper only.
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} GMAMBA_CUDA=1 GMAMBA_NATIVE=0 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
  "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w .device/wheels . 
rm -rf build
benchmarks/build_mamba_ssm.sh "$PYTHON"
du -sh .device/*
