#!/usr/bin/env bash
# Build mamba-ssm's CUDA selective-scan kernel (`selective_scan_cuda`) as a
# COMPARISON BASELINE for benchmarks on the GPU machine (sm_90, no network).
#
# What: downloads the mamba-ssm 2.3.2.post1 sdist from PyPI into a temp dir,
# compiles only csrc/selective_scan (10 sources) as one torch CUDAExtension for
# sm_90 with mamba-ssm's own nvcc flags, strips debug info and writes
#   .device/mamba_ssm/selective_scan_cuda.so.gz      (git-ignored)
# Why: the GPU machine cannot build or download it; benchmarks/mamba_ssm_baseline.py
# (our own shim) loads this file. Baseline only: neither the mamba-ssm source nor
# the built module is ever committed to this repo.
#
# Usage: benchmarks/build_mamba_ssm.sh [PYTHON]   (FORCE=1 rebuilds)
# The python must have the same torch as the GPU machine (2.11.0+cu130, py3.12).
# Takes ~5 min on 2 cores.
set -euo pipefail

PYTHON=${1:-/work/venvs/gpu312/bin/python}
VERSION=2.3.2.post1
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR="$REPO_ROOT/.device/mamba_ssm"
OUT="$OUT_DIR/selective_scan_cuda.so.gz"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"

if [[ -f "$OUT" && "${FORCE:-0}" != 1 ]]; then
    echo "exists: $OUT (FORCE=1 to rebuild)"; exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mamba_ssm_build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# sdist only; MAMBA_SKIP_CUDA_BUILD keeps pip's metadata step from compiling.
MAMBA_SKIP_CUDA_BUILD=TRUE "$PYTHON" -m pip download --quiet --no-deps \
    --no-binary :all: --no-build-isolation "mamba-ssm==$VERSION" -d "$WORK"
tar xzf "mamba_ssm-$VERSION.tar.gz"
SRC="$WORK/mamba_ssm-$VERSION/csrc/selective_scan"

# Minimal setup script (temp dir only). Flags follow mamba-ssm's setup.py,
# minus --ptxas-options=-v and -lineinfo (log noise / size only).
cat > "$WORK/setup_ss.py" <<EOF
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension
src = "$SRC"
names = ["selective_scan.cpp"] + ["selective_scan_fwd_%s.cu" % t for t in ("fp32", "fp16", "bf16")] + [
    "selective_scan_bwd_%s_%s.cu" % (t, k) for t in ("fp32", "fp16", "bf16") for k in ("real", "complex")]
setup(
    name="selective_scan_cuda_baseline",
    ext_modules=[CUDAExtension(
        name="selective_scan_cuda",
        sources=[f"{src}/{n}" for n in names],
        include_dirs=[src],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
                     "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
                     "--threads", "2"],
        },
    )],
    cmdclass={"build_ext": BuildExtension},
)
EOF

start=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} \
    "$PYTHON" setup_ss.py build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp"
echo "build took $(( $(date +%s) - start )) s"

SO=$(ls "$WORK"/lib/selective_scan_cuda*.so)
strip --strip-debug "$SO"
mkdir -p "$OUT_DIR"
gzip -c "$SO" > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
# import check (no GPU needed)
( cd "$WORK/lib" && "$PYTHON" -c "import torch, selective_scan_cuda; print('import ok', selective_scan_cuda.__file__)" )
ls -l "$SO" "$OUT"
