#!/usr/bin/env bash
# The main job: builds gmamba_ext and runs the benchmark suite on whatever device is present.
# On a machine without torch it makes .venv-bench (torch from the registry) first.
#   bash benchmarks/run.sh            # CPU quick sizes (2 cores: minutes); GPU full sizes when a GPU is seen
#   FULL=1 bash benchmarks/run.sh     # DESIGN.md's full CPU sizes too (long on 2 cores)
# Results (scan and gssm): benchmarks/out/*.json and *.md (git-ignored); committed runs live in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch' 2>/dev/null; then
  [ -x .venv-bench/bin/python ] || python3 -m venv .venv-bench
  PY=$PWD/.venv-bench/bin/python  # absolute: the benchmarks run from benchmarks/out
  "$PY" -m pip install -q "torch>=2.11,<=2.14.1" numpy ninja
fi
"$PY" -m pip install -q mambapy matplotlib || echo "mambapy/matplotlib unavailable: those columns are skipped"
"$PY" -m pip install -q "setuptools>=77" wheel  # the build runs without isolation, on these
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation .
mkdir -p benchmarks/out
cd benchmarks/out  # import the installed package, not the source tree
"$PY" -m gmamba_ext
"$PY" ../bench_scan_cpu.py --out scan_cpu.json $([ "${FULL:-0}" = 1 ] || echo --quick)
"$PY" ../bench_gssm.py --device cpu --out . $([ "${FULL:-0}" = 1 ] || echo --quick)
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  mamba=()
  [ -f ../../.device/mamba_ssm/selective_scan_cuda.so.gz ] && mamba=(--mamba-ssm ../../.device/mamba_ssm/selective_scan_cuda.so.gz)
  "$PY" ../bench_scan_gpu.py --out . "${mamba[@]}"
  "$PY" ../bench_gssm.py --device cuda --out . --dtypes float32,bfloat16 "${mamba[@]}"
fi
