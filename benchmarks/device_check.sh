#!/usr/bin/env bash
# The whole GPU verification run, in one call on the lent GPU machine (python3.12, torch 2.11.0+cu130,
# no network, no compiler use): installs the artefacts prebuilt by benchmarks/prepare_device.sh, prints
# the card, runs the CUDA tests (scan, GSSM, modules, analysis), the GPU benchmarks (scan vs mamba-ssm,
# gssm vs the unfused composition), a profile of gssm, the analysis CLI, a memory check of the kernels,
# optionally the CPU tests and an Nsight Compute profile of the scan; everything it prints and measures
# lands in $OUT (JSON + Markdown + logs; only 8 files come back, so bundle the JSON in the call).
# Knobs (seconds; 0 skips a step): T_CUDA_TESTS (150), T_BENCH (90), T_GSSM_BENCH (150), T_MEMSTAGES (45:
# benchmarks/memory_stages_gssm.py --trail), T_PROFILE (60),
# T_AB_BWD (0; 45 when wanted: benchmarks/ab_scan_bwd_gpu.py, decided in run 21), T_AB_BWD16 (0; the same at
# d_state 16, decided in run 25), T_AB_L1 (45: lane vs lane_l1, channels-first), T_GRAPH (40: benchmarks/graph_gssm_gpu.py), T_CHUNK_BWD (0: the CUDA tests and the scan benchmark
# once more with GMAMBA_CUDA_SCAN_BWD=chunk, the backward's other gradient kernel, each under this limit), T_ANALYSIS (40), T_SANITIZER (40), T_CPU_TESTS (0: the CPU suite on torch 2.11 also runs on our machines
# with /work/venvs/gpu312), T_NCU (0); BENCH_ARGS (e.g. --quick) and PLOT=0 (no PNG) for bench_scan_gpu.py,
# GSSM_ARGS / GSSM_DTYPES for bench_gssm.py. Exporting GMAMBA_CUDA_SCAN_BWD=chunk (or =lane) runs every step
# with that gradient kernel of the scan backward (see csrc/cuda/selective_scan_cuda.cu). Each step usually ends well before its limit (run 7: 91 s in
# all without the scan benchmark); the default limits sum to 660 s (runs 20-25 took 190-250 s in all).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/benchmarks/out/device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step environment
{ nvidia-smi; echo "wheel built from commit $(cat "$REPO/.device/commit" 2>/dev/null || echo unknown)"; date -u;
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/env.txt"

step install
$PY -m pip install --no-deps --no-index --force-reinstall "$REPO"/.device/wheels/gmamba_ext-*.whl 2>&1 | tail -2
cd /tmp  # import the installed package, not the source tree
$PY -m gmamba_ext 2>&1 | tee -a "$OUT/env.txt"

step "CUDA tests"
timeout ${T_CUDA_TESTS:-150} $PY -m pytest "$REPO/python_tests/test_selective_scan_cuda.py" \
  "$REPO/python_tests/test_gssm_cuda.py" "$REPO/python_tests/test_gssm_fused.py" "$REPO/python_tests/test_gssm_lowpass.py" \
  "$REPO/python_tests/test_finite_checks.py" "$REPO/python_tests/test_functorch.py" "$REPO/python_tests/test_higher_order.py" \
  "$REPO/python_tests/test_analysis.py::test_cuda_matches_cpu" -q -rs -p no:cacheprovider -n 4 \
  2>&1 | grep -v "DEBUG    torch" | tee "$OUT/tests_cuda.txt" | tail -25 || status=1

step "GPU benchmarks"
if [ "${T_BENCH:-90}" != 0 ]; then
  timeout ${T_BENCH:-90} $PY "$REPO/benchmarks/bench_scan_gpu.py" --out "$OUT" ${BENCH_ARGS:-} $([ "${PLOT:-1}" = 0 ] && echo --no-plot) \
    --mamba-ssm "$REPO/.device/mamba_ssm/selective_scan_cuda.so.gz" 2>&1 | tail -30 || status=1
fi

step "GSSM benchmark (fused gssm vs the unfused composition with mamba-ssm's scan; fused_keep: GMAMBA_GSSM_SAVE=keep; fused_dft_lowpass: GMAMBA_GSSM_LOWPASS=dft)"
if [ "${T_GSSM_BENCH:-150}" != 0 ]; then
  timeout ${T_GSSM_BENCH:-150} $PY "$REPO/benchmarks/bench_gssm.py" --device cuda --out "$OUT" \
    --dtypes ${GSSM_DTYPES:-float32,bfloat16} --other-save-policy --other-lowpass ${GSSM_ARGS:-} \
    --mamba-ssm "$REPO/.device/mamba_ssm/selective_scan_cuda.so.gz" 2>&1 | tail -30 || status=1
fi

step "gssm memory by stage (forward, bwd_scan, bwd_front; recompute and keep): where the peak is, and which ops made it"
if [ "${T_MEMSTAGES:-45}" != 0 ]; then
  timeout ${T_MEMSTAGES:-45} $PY "$REPO/benchmarks/memory_stages_gssm.py" --device cuda --out "$OUT" \
    --dtypes float32,bfloat16 --trail 10 2>&1 | grep -v "^ " | tail -20 || status=1
fi

step "gssm forward + backward eagerly and replayed from a CUDA graph (fused vs the unfused composition)"
if [ "${T_GRAPH:-40}" != 0 ]; then
  timeout ${T_GRAPH:-40} $PY "$REPO/benchmarks/graph_gssm_gpu.py" --out "$OUT" \
    --mamba-ssm "$REPO/.device/mamba_ssm/selective_scan_cuda.so.gz" 2>&1 | grep -v Warning | tail -12 || status=1
fi

step "A/B of the CUDA scan backward's gradient kernels (chunk vs lane) on gssm's scan shapes, both layouts"
if [ "${T_AB_BWD:-0}" != 0 ]; then
  timeout ${T_AB_BWD} $PY "$REPO/benchmarks/ab_scan_bwd_gpu.py" --out "$OUT" 2>&1 | tail -12 || status=1
fi
step "A/B of the gradient kernels at d_state 16 (lane_backward<16>), both layouts"
if [ "${T_AB_BWD16:-0}" != 0 ]; then
  timeout ${T_AB_BWD16} $PY "$REPO/benchmarks/ab_scan_bwd_gpu.py" --out "$OUT/ab_n16" --layouts cl,cf \
    --shapes 8:2048:1536:16,8:3136:1536:16,8:196:1536:16,8:49:1536:16 2>&1 | tail -12 || status=1
fi

step "A/B of the channels-first lane kernel with blocks sized for L1 (GMAMBA_CUDA_SCAN_BWD=lane_l1, opt-in until measured)"
if [ "${T_AB_L1:-45}" != 0 ]; then
  timeout ${T_AB_L1:-45} $PY "$REPO/benchmarks/ab_scan_bwd_gpu.py" --out "$OUT/ab_l1" --layouts cf --variants lane,lane_l1 \
    --shapes 8:16384:48:8,8:4096:96:8,8:1024:192:8,8:2048:1536:16,8:3136:1536:16,8:196:1536:16 2>&1 | tail -16 || status=1
fi

if [ "${T_CHUNK_BWD:-0}" != 0 ]; then
  step "CUDA tests and scan benchmark again, every backward through bwd_chunk_grads (GMAMBA_CUDA_SCAN_BWD=chunk)"
  GMAMBA_CUDA_SCAN_BWD=chunk timeout ${T_CHUNK_BWD} $PY -m pytest "$REPO/python_tests/test_selective_scan_cuda.py" \
    "$REPO/python_tests/test_gssm_cuda.py" "$REPO/python_tests/test_gssm_fused.py" -q -rs -p no:cacheprovider -n 4 \
    2>&1 | grep -v "DEBUG    torch" | tee "$OUT/tests_cuda_chunk_bwd.txt" | tail -5 || status=1
  mkdir -p "$OUT/chunk_bwd"
  GMAMBA_CUDA_SCAN_BWD=chunk timeout ${T_CHUNK_BWD} $PY "$REPO/benchmarks/bench_scan_gpu.py" --out "$OUT/chunk_bwd" \
    --no-plot ${BENCH_ARGS:-} --mamba-ssm "$REPO/.device/mamba_ssm/selective_scan_cuda.so.gz" 2>&1 | tail -30 || status=1
fi

step "where gssm's time goes (torch.profiler: device busy time, kernels and host ops per call)"
if [ "${T_PROFILE:-60}" != 0 ]; then
  timeout ${T_PROFILE:-60} $PY "$REPO/benchmarks/profile_gssm.py" --device cuda --out "$OUT" \
    --mamba-ssm "$REPO/.device/mamba_ssm/selective_scan_cuda.so.gz" 2>&1 | grep -E "^## |^wall|^device busy|^host:" || status=1
fi

step "global-perception analysis on the GPU (python -m gmamba_ext.analysis --device cuda)"
if [ "${T_ANALYSIS:-40}" != 0 ]; then
  timeout ${T_ANALYSIS:-40} $PY -m gmamba_ext.analysis --device cuda --out /tmp/analysis_cuda 2>&1 | tail -15 || status=1
  cp /tmp/analysis_cuda/*.json "$OUT/analysis_cuda.json" 2>/dev/null
fi

step "memory check (compute-sanitizer memcheck, small shapes)"
if [ "${T_SANITIZER:-40}" != 0 ] && command -v compute-sanitizer >/dev/null; then
  timeout ${T_SANITIZER:-40} compute-sanitizer --tool memcheck --error-exitcode 9 $PY "$REPO/benchmarks/sanitize_scan.py" \
    2>&1 | tail -8 | tee "$OUT/sanitizer.txt" || status=1
fi

if [ "${T_CPU_TESTS:-0}" != 0 ]; then
  step "CPU tests on torch $($PY -c 'import torch; print(torch.__version__)') (oldest supported)"
  timeout ${T_CPU_TESTS:-120} $PY -m pytest "$REPO/python_tests" -q -p no:cacheprovider -n 8 \
    --ignore="$REPO/python_tests/test_selective_scan_cuda.py" --ignore="$REPO/python_tests/test_gssm_cuda.py" 2>&1 | tail -5 | tee "$OUT/tests_cpu.txt" || status=1
fi
if [ "${T_NCU:-0}" != 0 ]; then
  step "kernel profile (Nsight Compute)"
  T_NCU=${T_NCU} bash "$REPO/benchmarks/profile_scan.sh" | grep -E "^  void|Duration|Registers Per|Achieved Occ" | head -60
fi

echo "device check finished with status $status"
exit $status
