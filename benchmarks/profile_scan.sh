#!/usr/bin/env bash
# Nsight Compute look at the scan kernels (ours and mamba-ssm's) on the GPU machine: occupancy, issue
# stalls, throughput. Clocks are left alone (--clock-control none). Writes $OUT/ncu_scan.txt.
# NCU_KERNELS (regex) and NCU_LAUNCHES pick the kernels; PROFILE_CASES / PROFILE_FWD_ONLY: see profile_scan.py.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/benchmarks/out/device}
mkdir -p "$OUT"
cd /tmp
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout ${T_NCU:-150} "$NCU" --clock-control none --target-processes all \
  -k "regex:${NCU_KERNELS:-chunk|chain|rows_forward|channels_forward|selective_scan}" --launch-count ${NCU_LAUNCHES:-16} \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
  --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  python3 "$REPO/benchmarks/profile_scan.py" "$REPO/.device/mamba_ssm/selective_scan_cuda.so.gz" \
  > "$OUT/ncu_scan.txt" 2>&1
echo "ncu exit $?"
grep -E "^  [a-z_].*\(|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Issued Ipc|Compute \(SM\) Throughput|Memory Throughput|Stall|No Eligible" "$OUT/ncu_scan.txt" | head -150
