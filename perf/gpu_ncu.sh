#!/usr/bin/env bash
# ncu (hardware counters, clocks left alone) over one launch of each selection kernel at 64k.
# Usage on the GPU machine, repo root, package installed: bash perf/gpu_ncu.sh [T]
# (NCU_KERNELS=<regex> profiles only those kernels, e.g. NCU_KERNELS=_dkv_kernel)
# The memory tables and instruction statistics (shared-memory wavefronts by instruction kind) are
# asked for first; if this ncu refuses them, the run is repeated with the basic sections.
OUT=${OUT:-perf/results/tmp}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
KERNELS=${NCU_KERNELS:-'_select_topn_kernel_v2|_topn_kernel|_selected_fwd_kernel|_selected_fwd_union_kernel|_dq_kernel|_dq_union_kernel|_dkv_kernel'}
BASIC="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
EXTRA="--section MemoryWorkloadAnalysis_Tables --section InstructionStats"
# shellcheck disable=SC2086
"$NCU" --clock-control none --kernel-name regex:"$KERNELS" $BASIC $EXTRA \
  python3 perf/gpu_ncu_target.py "${1:-65536}" > "$OUT/ncu.txt" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  echo "ncu rc=$rc with the extra sections; again with the basic ones"
  # shellcheck disable=SC2086
  "$NCU" --clock-control none --kernel-name regex:"$KERNELS" $BASIC \
    python3 perf/gpu_ncu_target.py "${1:-65536}" > "$OUT/ncu.txt" 2>&1
  rc=$?
fi
echo "ncu rc=$rc"; grep -E "^  [_a-z]|Duration|Warp Cycles Per Issued|Issue Slots Busy|Compute \(SM\) Throughput|Memory Throughput|L1/TEX Cache Throughput|L2 Hit|Achieved Occupancy|Registers Per|Stall|Theoretical Occ|Shared" "$OUT/ncu.txt" | head -400
