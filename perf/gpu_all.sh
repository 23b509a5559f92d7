#!/usr/bin/env bash
# One device call: install flexnsa, then run the named GPU stages, each with its own time limit.
# Usage (on the GPU machine, repo root):  bash perf/gpu_all.sh tests flex:200 ops decode train report
# (a report stage needs fla-core: the call must carry .whl, else the script stops before any stage;
#  the device copy's git metadata can be stale: pass FLEXNSA_COMMIT=<hash> for the report's header)
# (a stage's time limit in seconds after the colon; extra arguments through ARGS_<stage>, e.g.
#  ARGS_ops="--no-256k").
# Everything lands in $OUT/<stage>/ and is packed into $OUT/results.tar.gz (the device returns at
# most 8 files); a summary of exit codes is printed last.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-perf/results/tmp}
mkdir -p "$OUT"
# compile caches inside the (git-ignored) checkout: a warm device machine keeps them between calls
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
# the report compares fla-core in the same run: without its wheel (carry .whl) it is a wasted call
if [[ " $* " == *" report"* ]] && [ "${ALLOW_NO_FLA:-0}" != 1 ] && ! python3 -c "import fla.ops.nsa" 2>/dev/null; then
  echo "fla-core is not importable: carry .whl (run's carry: [\".whl\"]) or set ALLOW_NO_FLA=1"; exit 3
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv > "$OUT/gpu.csv" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.csv"

declare -A CMD LIMIT
CMD[tests]="python3 -m pytest tests -q -m gpu -p no:cacheprovider"; LIMIT[tests]=480  # ~7-8 min cold (compiles; H200, 2026-11-29)
CMD[flex]="python3 perf/gpu_check_flex.py";  LIMIT[flex]=240
CMD[ops]="python3 perf/gpu_check_ops.py";    LIMIT[ops]=240
CMD[decode]="python3 perf/gpu_decode.py";    LIMIT[decode]=180
CMD[train]="python3 perf/gpu_train_check.py"; LIMIT[train]=180
CMD[report]="python3 perf/report.py";        LIMIT[report]=450  # ~350 s at 8k+64k, +~45 s since 10 samples per row
CMD[profile]="python3 perf/gpu_profile.py";  LIMIT[profile]=200
CMD[sweep]="python3 perf/gpu_sweep.py";    LIMIT[sweep]=240
CMD[ncu]="bash perf/gpu_ncu.sh";             LIMIT[ncu]=150
CMD[overhead]="python3 perf/gpu_overhead.py"; LIMIT[overhead]=150
CMD[streams]="python3 perf/gpu_streams.py"; LIMIT[streams]=200
CMD[locality]="python3 perf/gpu_locality.py"; LIMIT[locality]=200  # 38 s at 8k (H200, session 13)
summary=""
for stage in "$@"; do
  name=${stage%%:*}; limit=${stage#*:}; [ "$limit" = "$stage" ] && limit=${LIMIT[$name]}
  mkdir -p "$OUT/$name"
  start=$(date +%s)
  extra_var="ARGS_$name"
  OUT="$OUT/$name" timeout -k 10 "$limit" ${CMD[$name]} ${!extra_var:-} > "$OUT/$name/log.txt" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  echo "=== $name rc=$rc ${took}s (limit ${limit}s); last lines:"; tail -n 25 "$OUT/$name/log.txt"
  summary+="$name rc=$rc ${took}s; "
  if [ "$name" = ops ] && [ $rc -ne 0 ] && [ -z "${FLEXNSA_SELECT_IMPL:-}" ]; then
    export FLEXNSA_SELECT_IMPL=v1  # the ops check failed: later stages use the previous select kernel
    echo "ops failed: FLEXNSA_SELECT_IMPL=v1 for the stages after it"; summary+="(then select v1) "
  fi
done
(cd "$OUT" && tar czf results.tar.gz --exclude=results.tar.gz . )
echo "SUMMARY: $summary"
