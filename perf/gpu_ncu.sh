#!/usr/bin/env bash
# ncu (hardware counters, clocks left alone) over one launch of each selection kernel at 64k.
# Usage on the GPU machine, repo root, package installed: bash perf/gpu_ncu.sh [T]
OUT=${OUT:-perf/results/tmp}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
"$NCU" --clock-control none --kernel-name regex:'_select_topn_kernel_v2|_topn_kernel|_selected_fwd_kernel|_selected_fwd_union_kernel|_dq_kernel|_dq_union_kernel|_dkv_kernel' \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
  python3 perf/gpu_ncu_target.py "${1:-65536}" > "$OUT/ncu.txt" 2>&1
echo "ncu rc=$?"; grep -E "^  [_a-z]|Duration|Warp Cycles Per Issued|Issue Slots Busy|Compute \(SM\) Throughput|Memory Throughput|L2 Hit|Achieved Occupancy|Registers Per|Stall|Theoretical Occ" "$OUT/ncu.txt" | head -300
